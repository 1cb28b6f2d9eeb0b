"""The one-token step of LoLA in PyTorch: attention over the fixed slots of a :class:`LoLAState`.

No grid, no concatenation that grows with T: the token is written into its P slot, one softmax runs over
λ cache slots + 2η window slots next to the linear read-out, and at a chunk boundary the state's
``G ∪ W`` goes through :func:`select_and_fold` before ``P`` moves into ``W``.

Two ways to the same numbers: on CPU, where reading the rows' token counts back costs nothing, rows that all sit
at one position and all take their token (the usual decode loop) read one contiguous slice of valid window slots,
with no masks and no scatter; otherwise (CUDA, padding, rows at different positions) every row is masked on its
own. ``tests/test_ops.py`` checks both against the naive reference.
"""

from __future__ import annotations

import torch

from fla_lola.ops.selection import select_and_fold
from fla_lola.ops.state import LoLAState
from fla_lola.ops.utils import EPS


def decode_lola_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
    *,
    window_size: int,
    cache_size: int,
    scale: float,
    mix: str,
    selection: str,
    attention_mask: torch.Tensor | None,
    initial_state: LoLAState | None,
    output_final_state: bool,
    inplace: bool = False,
) -> tuple[torch.Tensor, LoLAState | None]:
    """``T == 1``; inputs already checked by :func:`fla_lola.lola_attention`.

    ``inplace=True`` (with ``output_final_state``) writes the new state into ``initial_state``'s own tensors and
    returns that object; otherwise ``initial_state`` is left untouched and a new state comes back.
    """
    B, _, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], fq.shape[3]
    eta, lam, grp = window_size, cache_size, H // k.shape[2]
    dev = q.device
    inplace = inplace and initial_state is not None and output_final_state
    st = initial_state if initial_state is not None else \
        LoLAState.empty(B, H, Hkv, D, Dv, F, eta, lam, dtype=q.dtype, device=dev)
    # the token goes into slot η + phase of the window; in place, the state's own window is the buffer, else a copy
    wk, wv, wfk = (st.window_k, st.window_v, st.window_fk) if inplace else \
        (st.window_k.clone(), st.window_v.clone(), st.window_fk.clone())

    def window_positions():  # [B, 2η]: slot j of the window holds absolute position (seen // η - 1)·η + j
        return ((st.seen // eta - 1) * eta)[:, None] + torch.arange(2 * eta, device=dev)[None]

    # the contiguous path (module docstring): on CPU only, where reading `seen` back does not stall a device
    uniform = None
    if not q.is_cuda and (attention_mask is None or bool(attention_mask.all())):
        seen = st.seen.tolist()
        uniform = seen[0] if all(x == seen[0] for x in seen) else None
    if uniform is not None:
        active, step = None, 1
        phase = uniform % eta
        slot = eta + phase
        for buf, x in ((wk, k), (wv, v), (wfk, fk)):
            buf[:, :, slot] = x[:, 0]
        lo = 0 if uniform >= eta else eta  # W is valid once a chunk is complete; P up to this token
        o = _read_out(q, fq, gate, wk[:, :, lo:slot + 1], wv[:, :, lo:slot + 1], None, st, scale, mix, lam)
        boundary = torch.ones(B, dtype=torch.bool, device=dev) if phase + 1 == eta else None  # every row or none
    else:
        active = None if attention_mask is None else attention_mask[:, 0] != 0
        phase = st.seen % eta
        step = 1 if active is None else active.long()  # tokens each row takes

        # rows that take no token keep what their slot holds
        rows, slot = torch.arange(B, device=dev), eta + phase
        for buf, x in ((wk, k), (wv, v), (wfk, fk)):
            buf[rows, :, slot] = x[:, 0] if active is None else \
                torch.where(active[:, None, None], x[:, 0], buf[rows, :, slot])
        wpos = window_positions()                             # valid slots hold positions in [0, seen + step)
        wvalid = (wpos >= 0) & (wpos < (st.seen + step)[:, None])
        o = _read_out(q, fq, gate, wk, wv, wvalid, st, scale, mix, lam)
        if active is not None:
            o = torch.where(active[:, None, None, None], o, torch.zeros_like(o))
        boundary = phase + 1 == eta if active is None else active & (phase + 1 == eta)
        if not bool(boundary.any()):
            boundary = None
    if not output_final_state:
        return o, None

    h, s = st.h, st.s
    ck, cv, cfk, cpos = st.cache_k, st.cache_v, st.cache_fk, st.cache_pos

    def put(old, new, where):  # rows `where` take `new`: written into `old` in place, else a new tensor
        if inplace:
            return old.copy_(new) if everywhere else old.copy_(torch.where(where, new, old))
        return new if everywhere else torch.where(where, new, old)

    if boundary is not None:
        if uniform is not None:
            wpos = window_positions()
        # rows with a previous chunk W: select from G ∪ W and fold the rest
        sel = boundary & (st.seen >= eta)
        if bool(sel.any()):
            everywhere = bool(sel.all())

            def heads(x):  # [B, Hkv, η, d] -> [B*H, η, d]
                return x.repeat_interleave(grp, dim=1).reshape(B * H, eta, x.shape[-1])
            w_pos = wpos[:, :eta]                                                  # [B, η], all valid here
            hs = torch.cat([h, s.unsqueeze(-1)], -1).reshape(B * H, F, Dv + 1)
            w_valid = (w_pos >= 0).to(wv.dtype)[:, None, :, None].expand(B, Hkv, eta, 1)
            w_pairs = torch.cat([heads(wk[:, :, :eta]), heads(torch.cat([wv[:, :, :eta], w_valid], -1)),
                                 wfk[:, :, :eta].reshape(B * H, eta, F)], -1)
            c_pairs = torch.cat([ck, cv, (cpos >= 0).unsqueeze(-1).to(cv.dtype), cfk], -1) \
                .reshape(B * H, lam, D + Dv + 1 + F)
            cand_pos = torch.cat([cpos.reshape(B * H, lam), w_pos.repeat_interleave(H, 0)], 1)
            new_hs, new_cache, new_pos = select_and_fold(
                selection, lam, hs, torch.cat([c_pairs, w_pairs], 1), cand_pos,
                torch.arange(H, device=dev).repeat(B), D)
            u, u3 = sel[:, None, None, None], sel[:, None, None]
            new_hs, new_cache = new_hs.view(B, H, F, Dv + 1), new_cache.view(B, H, lam, D + Dv + 1 + F)
            h, s = put(h, new_hs[..., :-1], u), put(s, new_hs[..., -1], u3)
            ck = put(ck, new_cache[..., :D], u)
            cv = put(cv, new_cache[..., D:D + Dv], u)
            cfk = put(cfk, new_cache[..., D + Dv + 1:], u)
            cpos = put(cpos, new_pos.view(B, H, lam), u3)
        # then W <- P and P <- ∅ (the window buffers are this call's own: the state's when in place, else copies)
        b4 = boundary[:, None, None, None]
        for x in (wk, wv, wfk):
            if bool(boundary.all()):
                x[:, :, :eta] = x[:, :, eta:]
                x[:, :, eta:] = 0
            else:
                x[:, :, :eta] = torch.where(b4, x[:, :, eta:], x[:, :, :eta])
                x[:, :, eta:].masked_fill_(b4, 0)

    if inplace:
        st.seen.add_(step)
        return o, st
    final = LoLAState(h=h, s=s, cache_k=ck, cache_v=cv, cache_fk=cfk, cache_pos=cpos,
                      window_k=wk, window_v=wv, window_fk=wfk, seen=st.seen + step)
    return o, final


def _read_out(q, fq, gate, wk, wv, wvalid, st, scale, mix, lam):
    """The output ``[B, 1, H, Dv]`` of one token: one softmax over the cache and the window slots ``wk``/``wv``
    (masked by ``wvalid`` [B, n] unless every slot given is valid), next to the linear read-out of ``st``.

    Every product is a plain ``bmm`` over ``B·Hkv`` (window: a group's queries share its keys) or ``B·H`` (cache,
    memory) batches of 3-d views: a step is a few dozen small ops, so each op saved counts."""
    B, _, H, D = q.shape
    Hkv, n, Dv = wk.shape[1], wk.shape[2], wv.shape[-1]
    grp, acc = H // Hkv, st.h.dtype
    F = fq.shape[-1]
    qh = q[:, 0].to(acc) * scale                                                   # [B, H, D]
    s_w = torch.bmm(qh.reshape(B * Hkv, grp, D), wk.to(acc).reshape(B * Hkv, n, D).transpose(1, 2)).view(B, H, n)
    if wvalid is not None:
        s_w = s_w.masked_fill_(~wvalid[:, None], float('-inf'))
    m = s_w.amax(-1)                                                               # [B, H]
    if lam > 0:
        s_c = torch.bmm(qh.reshape(B * H, 1, D), st.cache_k.to(acc).reshape(B * H, lam, D).transpose(1, 2))
        s_c = s_c.view(B, H, lam).masked_fill_(st.cache_pos < 0, float('-inf'))
        m = torch.maximum(m, s_c.amax(-1))
    m = m.clamp(min=0) if mix == 'lola' else torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p_w = torch.exp(s_w - m[..., None])
    num = torch.bmm(p_w.reshape(B * Hkv, grp, n), wv.to(acc).reshape(B * Hkv, n, Dv)).view(B, H, Dv)
    den = p_w.sum(-1)
    if lam > 0:
        p_c = torch.exp(s_c - m[..., None])
        num = num.view(B * H, 1, Dv).baddbmm_(p_c.reshape(B * H, 1, lam), st.cache_v.to(acc).reshape(B * H, lam, Dv))
        num = num.view(B, H, Dv)
        den = den.add_(p_c.sum(-1))
    fqh = fq[:, 0].to(acc)                                                         # [B, H, F]
    lin_num = torch.bmm(fqh.reshape(B * H, 1, F), st.h.reshape(B * H, F, Dv)).view(B, H, Dv)
    lin_den = torch.bmm(fqh.reshape(B * H, 1, F), st.s.reshape(B * H, F, 1)).view(B, H)
    g = gate.to(acc)[None, :]
    if mix == 'lola':
        e = torch.exp(-m)
        ge = (1 - g) * e                                                           # (1-γ)·e^{-c}
        y = torch.addcmul(lin_num * ge[..., None], g[..., None], num) / \
            torch.addcmul(torch.addcmul(e * EPS, ge, lin_den), g, den)[..., None]
    else:
        den = g * den + lin_den  # zero only for a padding row with an empty state
        y = (g[..., None] * num + lin_num) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return y.unsqueeze(1).to(q.dtype)
