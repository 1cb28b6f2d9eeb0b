"""The LoLA reference: ``docs/SPEC.md`` token by token, a loop anyone can read against it.

Slow on purpose (Python loops over rows, heads and tokens). Every faster backend is tested against it.
It computes in float32, or in float64 when the inputs are float64.
"""

from __future__ import annotations

import torch

from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS, check_inputs, random_score, token_rows


def naive_lola_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
    *,
    window_size: int,
    cache_size: int,
    scale: float | None = None,
    mix: str = 'lola',
    selection: str = 'sre',
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: LoLAState | None = None,
    output_final_state: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, LoLAState | None]:
    """The spec, literally. Same arguments and results as :func:`fla_lola.lola_attention` (minus ``backend``)."""
    scale = check_inputs(q, k, v, fq, fk, gate, window_size, cache_size, scale, mix, selection,
                         attention_mask, cu_seqlens, initial_state, validate)
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], fq.shape[3]
    eta, lam = window_size, cache_size
    acc = accumulation_dtype(q.dtype)
    rows = token_rows(B, T, attention_mask, cu_seqlens, q.device)
    N = rows.num_rows
    state = initial_state if initial_state is not None else \
        LoLAState.empty(N, H, Hkv, D, Dv, F, eta, lam, dtype=q.dtype, device=q.device)
    new = state.clone()
    o = q.new_zeros(B, T, H, Dv, dtype=acc)

    for r in range(N):
        # the (b, t) coordinates of row r's real tokens, in order
        tokens = (rows.row == r).nonzero().tolist()
        seen0 = int(state.seen[r])
        for h in range(H):
            g = h // (H // Hkv)
            mem = _load(state, r, h, g, acc)
            for i, (b, t) in enumerate(tokens):
                pos = seen0 + i
                pair = dict(pos=pos, k=k[b, t, g].to(acc), v=v[b, t, g].to(acc), fk=fk[b, t, h].to(acc))
                o[b, t, h] = _step(mem, pair, q[b, t, h].to(acc), fq[b, t, h].to(acc), gate[h].to(acc),
                                   scale, mix, selection, eta, lam, h)
            _store(new, mem, r, h, g, eta, lam)
        new.seen[r] = seen0 + len(tokens)
    return o.to(q.dtype), (new if output_final_state else None)


def _step(mem, pair, q, fq, gamma, scale, mix, selection, eta, lam, head):
    """Spec steps 1-4 for one token of one (row, head)."""
    # 1. append to P
    mem['P'].append(pair)
    # 2. the exact pairs S = G ∪ W ∪ P and their logits
    S = mem['G'] + mem['W'] + mem['P']
    a = torch.stack([scale * (q @ p['k']) for p in S])
    Vs = torch.stack([p['v'] for p in S])
    lin_num, lin_den = mem['H'].T @ fq, mem['s'] @ fq
    # 3. the output under one normalizer
    if mix == 'lola':
        c = torch.clamp(a.max(), min=0)
        w = torch.exp(a - c)
        num = gamma * (w @ Vs) + (1 - gamma) * torch.exp(-c) * lin_num
        den = gamma * w.sum() + (1 - gamma) * torch.exp(-c) * lin_den + EPS * torch.exp(-c)
    else:  # 'lolcats'
        w = torch.exp(a - a.max())
        num = gamma * (w @ Vs) + lin_num
        den = gamma * w.sum() + lin_den
    y = num / den
    # 4. chunk boundary: select the cache from G ∪ W, fold the rest, then W <- P
    if len(mem['P']) == eta:
        if mem['W']:
            cand = mem['G'] + mem['W']
            scores = [_score(mem, p, selection, head, cand) for p in cand]
            # largest score first; ties go to the earlier position
            order = sorted(range(len(cand)), key=lambda j: (-scores[j], cand[j]['pos']))
            keep = set(order[:min(lam, len(cand))])
            for j, p in enumerate(cand):
                if j not in keep:
                    mem['H'] = mem['H'] + torch.outer(p['fk'], p['v'])
                    mem['s'] = mem['s'] + p['fk']
            mem['G'] = sorted((cand[j] for j in keep), key=lambda p: p['pos'])
        mem['W'], mem['P'] = mem['P'], []
    return y


@torch.no_grad()
def _score(mem, p, selection, head, cand):
    if selection == 'sre':  # self-recall error against the memory as it is now
        recall = (mem['H'].T @ p['fk']) / (mem['s'] @ p['fk'] + EPS)
        return float(torch.linalg.vector_norm(p['v'] - recall))
    if selection == 'loo':  # self-recall error against the memory plus every other candidate
        H, s = mem['H'], mem['s']
        for c in cand:
            if c is not p:
                H, s = H + torch.outer(c['fk'], c['v']), s + c['fk']
        recall = (H.T @ p['fk']) / (s @ p['fk'] + EPS)
        return float(torch.linalg.vector_norm(p['v'] - recall))
    if selection == 'recency':
        return float(p['pos'])
    if selection == 'value_norm':
        return float(torch.linalg.vector_norm(p['v']))
    return float(random_score(torch.tensor(p['pos']), torch.tensor(head)))


def _load(state: LoLAState, r, h, g, acc):
    """One (row, head) of a LoLAState as the spec's sets: G, W, P lists of pairs, and H, s."""
    eta, seen = state.window_size, int(state.seen[r])

    def pair(pos, key, value, feat):
        return dict(pos=pos, k=key.to(acc), v=value.to(acc), fk=feat.to(acc))

    G = [pair(int(state.cache_pos[r, h, j]), state.cache_k[r, h, j], state.cache_v[r, h, j], state.cache_fk[r, h, j])
         for j in range(state.cache_size) if state.cache_pos[r, h, j] >= 0]
    start = (seen // eta) * eta
    W = [pair(start - eta + j, state.window_k[r, g, j], state.window_v[r, g, j], state.window_fk[r, h, j])
         for j in range(eta)] if seen >= eta else []
    P = [pair(start + j, state.window_k[r, g, eta + j], state.window_v[r, g, eta + j],
              state.window_fk[r, h, eta + j]) for j in range(seen % eta)]
    return dict(G=G, W=W, P=P, H=state.h[r, h].to(acc), s=state.s[r, h].to(acc))


def _store(state: LoLAState, mem, r, h, g, eta, lam):
    """Writes one (row, head) back in the canonical layout (see LoLAState)."""
    state.h[r, h], state.s[r, h] = mem['H'], mem['s']
    for name in ('cache_k', 'cache_v', 'cache_fk'):
        getattr(state, name)[r, h].zero_()
    state.cache_pos[r, h] = -1
    for j, p in enumerate(mem['G']):
        state.cache_k[r, h, j], state.cache_v[r, h, j], state.cache_fk[r, h, j] = p['k'], p['v'], p['fk']
        state.cache_pos[r, h, j] = p['pos']
    state.window_k[r, g].zero_()
    state.window_v[r, g].zero_()
    state.window_fk[r, h].zero_()
    for offset, pairs in ((0, mem['W']), (eta, mem['P'])):
        for j, p in enumerate(pairs):
            state.window_k[r, g, offset + j], state.window_v[r, g, offset + j] = p['k'], p['v']
            state.window_fk[r, h, offset + j] = p['fk']
