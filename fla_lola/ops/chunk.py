"""The chunked PyTorch backend of LoLA: batched over rows × heads, a loop over chunks of η.

Layout. Each row's real tokens are laid on a chunk-aligned grid so that every row's chunk boundaries
fall at the same grid slots, whatever its padding or how many tokens its state has already seen::

    grid chunk:   [ W from the state | chunk 0: state's P, then new tokens | chunk 1 | ... | (empty) ]

A row whose state has consumed ``seen`` tokens puts its ``i``-th new token at slot ``seen % η + i`` of
chunk 0 onwards; the slots before are the state's partial chunk. Padding never enters the grid. When every row
takes all its tokens at the same phase (no padding, no packing: every prefill of ``generate``), queries are read
chunk by chunk straight from ``q`` and ``φq`` and outputs written straight into ``o``; otherwise they go through a
query grid laid out like the pairs. In that uniform case without autograd the grid is only ever held a segment of
chunks at a time (``SEGMENT_ELEMENTS``), refilled from the inputs as the loop moves on: same values, no
whole-sequence buffer to allocate and fault in.

Work per chunk ``c`` (all rows and heads at once; the grid stores each pair as one row ``[k | v | 1 | φk]``):

1. softmax logits of the chunk's queries against its window ``W ∪ P`` (grid chunks ``c`` and ``c+1``, which
   are adjacent rows in memory, so a strided view with no copy) and against the λ cached pairs;
2. one max over both, numerators and denominators in one product each (the ``1`` column), and the
   linear read-out ``φq·[H | s]`` under the spec's normalizer. With mix="lola" no mask is needed but the causal
   one: empty slots are zero rows (logit 0 ≤ the max, which is clamped at 0, and a zero ``[v | 1]`` row), so they
   add exactly nothing; no ``-inf`` ever reaches ``exp``, whose vectorized CPU kernel is several times slower
   on underflowing inputs;
3. boundary, for rows whose chunk is complete: :func:`select_and_fold` on ``G ∪ W``.
"""

from __future__ import annotations

import torch

from fla_lola.ops.selection import select_and_fold
from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS, token_rows

# without autograd, the uniform layout's packed grid is held a segment of chunks at a time, of about this many
# elements (8 MiB in float32)
SEGMENT_ELEMENTS = 2 ** 21


def chunk_lola_attention(
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
    cu_seqlens: torch.Tensor | None,
    initial_state: LoLAState | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, LoLAState | None]:
    """Inputs already checked by :func:`fla_lola.lola_attention`; see there for shapes."""
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], fq.shape[3]
    eta, lam, grp = window_size, cache_size, H // k.shape[2]
    acc = accumulation_dtype(q.dtype)
    dev = q.device
    rows = token_rows(B, T, attention_mask, cu_seqlens, dev)
    N = rows.num_rows
    M = N * H
    state = initial_state if initial_state is not None else \
        LoLAState.empty(N, H, Hkv, D, Dv, F, eta, lam, dtype=q.dtype, device=dev)

    # ---- lay the tokens on the chunk-aligned grid ------------------------------------------
    phase = state.seen % eta                                     # [N] filled slots of the state's P
    end = phase + rows.lengths                                   # [N] grid slot after each row's last token
    C = max(1, -(-int(end.max()) // eta)) if N > 0 else 1        # query chunks
    G_len = (C + 2) * eta                                        # + the state's W in front, an empty chunk behind
    E = D + Dv + 1 + F
    g_idx = torch.arange(G_len, device=dev)
    kvalid = ((g_idx[None] >= eta) & (g_idx[None] < eta + end[:, None])) | \
        ((g_idx[None] < eta) & (state.seen[:, None] >= eta))     # [N, G_len]
    pos = (state.seen // eta - 1)[:, None] * eta + g_idx[None]   # absolute position of each slot
    pos = torch.where(kvalid, pos, torch.full_like(pos, -1))

    # each slot's pair packed as [k | v | 1 | φk] per query head (the 1 is 0 at invalid slots): one tensor to
    # concatenate and gather at boundaries, and [v | 1] gives a numerator and its denominator in one product.
    uniform = attention_mask is None and cu_seqlens is None and bool((phase == phase[0]).all())
    fields = ((0, D), (D, D + Dv), (D + Dv + 1, E))
    windows = (state.window_k, state.window_v, state.window_fk)
    needs_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (q, k, v, fq, fk, gate, state.h, state.s, state.cache_k, state.cache_v,
                                  state.cache_fk, *windows))

    def per_group(x):  # [..., H, ...] split into [..., Hkv, grp, ...] at dim 1 (k, v broadcast over the group)
        return x.unflatten(1, (Hkv, grp)) if x.shape[1] == H else x.unsqueeze(2)

    if uniform:
        # every row takes all T tokens at the same phase: plain slices, no scatter. Queries are read straight from
        # q and φq chunk by chunk (a view when B == 1) and outputs written straight into o: no query grid.
        p0 = int(phase[0])

        def fill(dst, s0):
            """Grid slots ``s0 ..`` into ``dst`` ``[N, Hkv, grp, n, E]``: token ``i`` at slot ``η + p0 + i``, the
            state's W and P at the slots below 2η that no token takes, zeros elsewhere."""
            n = dst.shape[3]
            t0, t1 = min(T, max(0, s0 - eta - p0)), min(T, max(0, s0 + n - eta - p0))
            a = min(max(t0 + eta + p0 - s0, 0), n)
            b = min(max(t1 + eta + p0 - s0, a), n)                 # dst[..., a:b] holds tokens t0:t1
            for lo_, hi_ in ((0, a), (b, n)):
                mid = min(hi_, max(lo_, 2 * eta - s0))              # dst[..., lo_:mid] from the state
                if mid > lo_:
                    for (lo, hi), w in zip(fields, windows):
                        dst[..., lo_:mid, lo:hi] = per_group(w)[..., s0 + lo_:s0 + mid, :]
                if hi_ > mid:
                    dst[..., mid:hi_, :].zero_()
            if b > a:
                for (lo, hi), x in zip(fields, (k, v, fk)):
                    dst[..., a:b, lo:hi] = per_group(x[:, t0:t1].transpose(1, 2))
            dst[..., D + Dv] = kvalid[:, None, None, s0:s0 + n].to(acc)

        # Without autograd the grid is laid out a segment of query chunks at a time (grid chunks g0 .. g0 + S + 1,
        # refilled in place): a long prefill never allocates the whole packed grid, whose fresh pages would cost
        # more to fault in than the copy itself, and the segment stays in cache. With autograd, one segment holds
        # the whole grid (the backward pass reads every chunk).
        S = C if needs_grad else max(1, min(C, SEGMENT_ELEMENTS // max(1, M * eta * E)))
        grid = torch.empty(N, Hkv, grp, (S + 2) * eta, E, dtype=acc, device=dev)

        def segment(g0):
            fill(grid[:, :, :, :min(S + 2, C + 2 - g0) * eta], g0 * eta)

        segment(0)
        o = q.new_empty(B, T, H, Dv, dtype=acc)

        def queries(c):  # (first query slot in chunk c, its tokens t0:t1, queries [M, n, D], features [M, n, F])
            t0, t1 = max(0, c * eta - p0), max(0, min(T, (c + 1) * eta - p0))
            return (t0 + p0 - c * eta, t0, t1, q[:, t0:t1].transpose(1, 2).reshape(M, t1 - t0, D).to(acc),
                    fq[:, t0:t1].transpose(1, 2).reshape(M, t1 - t0, F).to(acc))

        def emit(t0, t1, y):
            o[:, t0:t1] = y.view(B, H, t1 - t0, Dv).transpose(1, 2)

        def untangle():
            return o
    else:
        S = C   # one segment: the whole grid, written once, the state's W and P first, then the tokens
        grid = torch.zeros(N, Hkv, grp, G_len, E, dtype=acc, device=dev)
        for (lo, hi), w in zip(fields, windows):
            grid[:, :, :, :2 * eta, lo:hi] = per_group(w)
        qgrid = torch.zeros(N, H, C * eta, D + F, dtype=acc, device=dev)
        tb, tt = rows.valid.nonzero(as_tuple=True)               # real tokens, in (b, t) order
        tr = rows.row[tb, tt]
        slot = eta + phase[tr] + rows.index[tb, tt]              # grid slot of each real token
        for (lo, hi), x in zip(fields, (k, v, fk)):
            grid[tr, :, :, slot, lo:hi] = x[tb, tt].unflatten(1, (Hkv, -1)).to(acc)
        grid[..., D + Dv] = kvalid[:, None, None, :].to(acc)
        qgrid[tr, :, slot - eta] = torch.cat([q, fq], -1)[tb, tt].to(acc)
        qgrid = qgrid.view(M, C, eta, D + F)
        y_all = q.new_empty(M, C, eta, Dv, dtype=acc)

        def queries(c):
            return 0, c, c + 1, qgrid[:, c, :, :D], qgrid[:, c, :, D:]

        def emit(c, _, y):
            y_all[:, c] = y

        def untangle():
            y = y_all.view(N, H, C * eta, Dv).transpose(1, 2)
            return q.new_zeros(B, T, H, Dv, dtype=acc).index_put((tb, tt), y[tr, slot - eta])

    PAIRS = grid.view(M, S + 2, eta, E)   # grid chunks g0 .. g0 + S + 1 of the current segment
    K, V1 = PAIRS[..., :D], PAIRS[..., D:D + Dv + 1]                                 # [M, S+2, η, ·] views
    kval = kvalid.repeat_interleave(H, dim=0).view(M, C + 2, eta)
    kpos = pos.repeat_interleave(H, dim=0).view(M, C + 2, eta)
    heads = torch.arange(H, device=dev).repeat(N)                                    # [M] query head index
    gamma = gate.to(acc).repeat(N)[:, None, None]                                    # [M, 1, 1]
    row_end = end.repeat_interleave(H)                                               # [M]
    # which rows update at the boundary after each chunk (complete chunk, W exists), decided once for all chunks
    updates = (row_end[:, None] >= torch.arange(1, C + 1, device=dev)[None] * eta) & kval[:, :C, 0]  # [M, C]
    update_any, update_all = updates.any(0).tolist(), updates.all(0).tolist()
    # a query at slot i of its chunk sees all of W and slots 0..i of its own chunk
    hidden = ~torch.cat([torch.ones(eta, eta, dtype=torch.bool, device=dev),
                         torch.ones(eta, eta, dtype=torch.bool, device=dev).tril()], 1)   # [η, 2η]

    def window(x, c):  # [M, S+2, η, d] slice of PAIRS -> [M, 2η, d]: segment chunks c (W) and c+1, still a view
        return x[:, c:c + 2].reshape(M, 2 * eta, x.shape[-1])

    # the memory [H | s] and the cache, packed like the grid
    hs = torch.cat([state.h, state.s.unsqueeze(-1)], -1).reshape(M, F, Dv + 1)
    cpos = state.cache_pos.reshape(M, lam)
    cache = torch.cat([state.cache_k.reshape(M, lam, D).to(acc), state.cache_v.reshape(M, lam, Dv).to(acc),
                       (cpos >= 0).unsqueeze(-1).to(acc), state.cache_fk.reshape(M, lam, F).to(acc)], -1)
    # "loo" reads each candidate against the memory plus every candidate, [Hₐ | sₐ] = [H | s] + Σ_{G ∪ W}. After a
    # boundary the kept pairs are G and the folded ones are in H, so that total is the next boundary's [H | s] + Σ_G:
    # carried along, it costs the η new candidates per boundary (scores only: no autograd)
    loo_total = None
    if selection == 'loo' and lam > 0:
        with torch.no_grad():
            loo_total = torch.baddbmm(hs, cache[..., D + Dv + 1:].transpose(1, 2), cache[..., D:D + Dv + 1])
    # without autograd, the boundary's candidates G ∪ W are assembled in one reused buffer
    cand_buf = None if needs_grad else PAIRS.new_empty(M, lam + eta, PAIRS.shape[-1])
    logit_buf = grid.new_empty(M, eta, 2 * eta + lam)  # baddbmm's ignored input (beta=0): scaled logits in one op
    # without autograd, temporaries are overwritten in place (exp's backward would need its output)
    in_place = cand_buf is not None
    g0 = 0   # the current segment's first grid chunk
    for c in range(C):
        if c == g0 + S:   # past the segment: only in the uniform layout (otherwise one segment holds all C chunks)
            g0 = c
            segment(g0)
        # ---- 1. softmax logits over W ∪ (causal) current chunk, and over the cache --------------
        lo, t0, t1, Qc, FQc = queries(c)
        n = Qc.shape[1]
        hid = hidden[lo:lo + n]
        s_w = torch.baddbmm(logit_buf[:, :n, :2 * eta], Qc, window(K, c - g0).transpose(1, 2), beta=0,
                            alpha=scale)
        if lam > 0:                                                             # [M, n, 2η], [M, n, λ]
            s_g = torch.baddbmm(logit_buf[:, :n, 2 * eta:], Qc, cache[..., :D].transpose(1, 2), beta=0,
                                alpha=scale)
        if mix == 'lola':
            # ---- 2. mix="lola": c = max(0, max_j a_j). Empty slots (of the grid and of the cache) hold zero
            # rows, so their logit is 0 ≤ c and their [v | 1] row is zero: they add exactly nothing and need no
            # mask. Future keys of the current chunk are set to 0 before the max and zeroed after the exp. No
            # -inf ever reaches exp (whose vectorized CPU kernel takes a slow path on underflowing inputs).
            # The future keys are the upper triangle of the current-chunk half, hence `tril_` on that view
            # (~10× faster on CPU than a broadcast boolean mask).
            s_w[..., eta:].tril_(lo)
            m = s_w.amax(-1)
            if lam > 0:
                m = torch.maximum(m, s_g.amax(-1))
            m = m.clamp(min=0).unsqueeze(-1)
            if in_place:
                p_w = s_w.sub_(m).exp_()
                p_w[..., eta:].tril_(lo)
            else:
                p_w = torch.exp(s_w - m).masked_fill(hid, 0.)
            nd = torch.bmm(p_w, window(V1, c - g0))                             # [M, η, Dv+1]
            if lam > 0:
                nd = torch.baddbmm(nd, s_g.sub_(m).exp_() if in_place else torch.exp(s_g - m),
                                   cache[..., D:D + Dv + 1])
        else:
            s_w = s_w.masked_fill_(hid | ~kval[:, c:c + 2].reshape(M, 1, 2 * eta), float('-inf'))
            m = s_w.amax(-1)
            if lam > 0:
                s_g = s_g.masked_fill_((cpos < 0)[:, None, :], float('-inf'))
                m = torch.maximum(m, s_g.amax(-1))
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            nd = torch.bmm(torch.exp(s_w - m.unsqueeze(-1)), window(V1, c - g0))   # [M, η, Dv+1]
            if lam > 0:
                nd = torch.baddbmm(nd, torch.exp(s_g - m.unsqueeze(-1)), cache[..., D:D + Dv + 1])
        lin = torch.bmm(FQc, hs)                                           # [M, η, Dv+1]
        if mix == 'lola':
            e = torch.exp(-m)
            out = gamma * nd + (1 - gamma) * e * lin
            emit(t0, t1, out[..., :-1] / (out[..., -1:] + EPS * e))
        else:
            out = gamma * nd + lin
            # only padding slots (no key at all) can have a zero denominator: keep them finite, and their
            # gradients too
            den = out[..., -1:]
            emit(t0, t1, out[..., :-1] / torch.where(den > 0, den, torch.ones_like(den)))

        # ---- 3. boundary after chunk c: rows whose chunk is complete and whose W exists -----
        if not update_any[c]:
            continue
        new_total = None
        if loo_total is not None:
            with torch.no_grad():
                w = PAIRS[:, c - g0]
                new_total = torch.baddbmm(loo_total, w[..., D + Dv + 1:].transpose(1, 2), w[..., D:D + Dv + 1])
        new_hs, new_cache, new_pos = select_and_fold(
            selection, lam, hs, torch.cat([cache, PAIRS[:, c - g0]], 1, out=cand_buf),
            torch.cat([cpos, kpos[:, c]], 1), heads, D, total=new_total)
        if update_all[c]:
            hs, cache, cpos, loo_total = new_hs, new_cache, new_pos, new_total
        else:
            update = updates[:, c]
            u = update[:, None, None]
            hs, cache = torch.where(u, new_hs, hs), torch.where(u, new_cache, cache)
            cpos = torch.where(update[:, None], new_pos, cpos)
            if new_total is not None:
                loo_total = torch.where(u, new_total, loo_total)

    # ---- outputs back to [B, T, H, Dv] ------------------------------------------------------
    o = untangle().to(q.dtype)
    if not output_final_state:
        return o, None

    # ---- final state: W and P are the grid chunks around each row's end (in the last segment) ----
    last = end // eta                                                          # P = grid chunk `last`
    chunks = torch.stack([last, last + 1], 1) - g0                             # segment indices of W, P
    rows_idx = torch.arange(N, device=dev)[:, None]

    def window(x):  # [N, heads, (S+2)·η, d] -> [N, heads, 2η, d]: grid chunks W, P of each row
        x = x.unflatten(2, (S + 2, eta))[rows_idx, :, chunks]                  # [N, 2, heads, η, d]
        return x.transpose(1, 2).reshape(N, x.shape[2], 2 * eta, x.shape[-1]).to(q.dtype)

    hs = hs.view(N, H, F, Dv + 1)
    cache = cache.view(N, H, lam, D + Dv + 1 + F).to(q.dtype)
    final = LoLAState(
        h=hs[..., :-1].contiguous(), s=hs[..., -1].contiguous(),
        cache_k=cache[..., :D].contiguous(), cache_v=cache[..., D:D + Dv].contiguous(),
        cache_fk=cache[..., D + Dv + 1:].contiguous(), cache_pos=cpos.view(N, H, lam),
        window_k=window(grid[:, :, 0, :, :D]), window_v=window(grid[:, :, 0, :, D:D + Dv]),
        window_fk=window(grid[..., D + Dv + 1:].flatten(1, 2)),
        seen=state.seen + rows.lengths,
    )
    return o, final
