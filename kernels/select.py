"""Triton building blocks of the LoLA chunk boundary: self-recall error (plain or leave-one-out), top-λ with ties to the
earlier position, the canonical placement of the kept pairs, and the fold of the others into the memory.

The candidates of a boundary are ``G ∪ W`` in one index space of ``BL + BT`` rows: index ``i < BL`` is slot ``i`` of
the cache's reference list (the valid pairs of ``G`` first, in ascending position; ``-1`` past them), index
``BL + t`` is pair ``t`` of the previous chunk ``W`` (valid for ``t < η``). Every position of ``W`` is later than
every position of ``G``, so the candidate index *is* position order, and the kernels never need the positions
themselves to break ties.

Nothing of size ``F × Dv`` or ``(λ+η)²`` is ever held in registers: the memory ``H``, ``s`` is read from and written to
global memory (the caller's per-chunk snapshot buffers), candidates are visited in row blocks of ``BR``, the value
dimension in tiles of ``TV`` and the feature dimension in chunks of ``TK`` (every ``tl.dot`` of float32 operands is an
FMA loop whose operands a thread holds whole along K, hence the small K chunks). Intermediate results a later phase
reads in another block shape (scores, the leave-one-out Gram rows, fold flags, the new reference list) go through a
small per-program scratch in global memory, separated by ``tl.debug_barrier()`` (a CTA barrier, which orders the
program's global memory accesses; the interpreter runs a program's blocks in order anyway).
"""

import triton
import triton.language as tl


@triton.jit
def slot_valid(slot, seen, end, ETA: tl.constexpr):
    """Grid slot holds a real pair: the state's W (slot < η, once η tokens were seen) or P / a new token."""
    # (scalar conditions enter as bounds, not as `block & scalar_bool`, which the interpreter mistypes)
    w_end = tl.where(seen >= ETA, ETA, 0)
    return (slot >= 0) & ((slot < w_end) | ((slot >= ETA) & (slot - ETA < end)))


@triton.jit
def load_grid(x, xw, slot, valid, i_n, i_x, tok_base, phase,
              HX: tl.constexpr, DX: tl.constexpr, ETA: tl.constexpr, o_d, m_d):
    """Rows ``[len(slot), len(o_d)]`` of grid slots, zero where not ``valid``.

    ``x``: the input ``[tokens, HX, DX]``; ``xw``: the state's window ``[N, HX, 2η, DX]``; ``i_x`` the head.
    """
    from_state = valid & (slot < ETA + phase)
    from_input = valid & (slot >= ETA + phase)
    p_w = xw + ((i_n * HX + i_x).to(tl.int64) * (2 * ETA) + slot[:, None]) * DX + o_d[None, :]
    p_x = x + ((tok_base + slot[:, None]) * HX + i_x) * DX + o_d[None, :]
    b_w = tl.load(p_w, mask=from_state[:, None] & m_d[None, :], other=0.)
    b_x = tl.load(p_x, mask=from_input[:, None] & m_d[None, :], other=0.)
    return tl.where(from_state[:, None], b_w, b_x)


@triton.jit
def load_refs(x, xw, xc, ref, i_n, i_h, i_x, tok_base, phase,
              H: tl.constexpr, HX: tl.constexpr, DX: tl.constexpr, LAM: tl.constexpr, ETA: tl.constexpr,
              o_d, m_d):
    """Rows of cache references: the initial cache ``xc`` [N, H, λ, DX] (per query head) for ``ref < λ``,
    grid slot ``ref - λ`` for ``ref ≥ λ``, zeros for ``ref < 0``."""
    in_cache = (ref >= 0) & (ref < LAM)
    p_c = xc + ((i_n * H + i_h).to(tl.int64) * LAM + ref[:, None]) * DX + o_d[None, :]
    b_c = tl.load(p_c, mask=in_cache[:, None] & m_d[None, :], other=0.)
    b_g = load_grid(x, xw, ref - LAM, ref >= LAM, i_n, i_x, tok_base, phase, HX, DX, ETA, o_d, m_d)
    return tl.where(in_cache[:, None], b_c, b_g)


@triton.jit
def store_refs(x, xw, xc, ref, dst, p_c, m_l, i_n, i_h, i_x, tok_base, phase,
               H: tl.constexpr, HX: tl.constexpr, DX: tl.constexpr, LAM: tl.constexpr, ETA: tl.constexpr,
               TD: tl.constexpr):
    """Rows ``p_c`` of ``dst`` [·, DX] (where ``m_l``) written from the cache references ``ref`` (as
    :func:`load_refs` reads them), ``TD`` columns at a time."""
    for c0 in range(0, DX, TD):
        o_x = c0 + tl.arange(0, TD)
        b_x = load_refs(x, xw, xc, ref, i_n, i_h, i_x, tok_base, phase, H, HX, DX, LAM, ETA, o_x, o_x < DX)
        tl.store(dst + p_c[:, None] * DX + o_x[None, :], b_x.to(dst.dtype.element_ty),
                 mask=m_l[:, None] & (o_x < DX)[None, :])


@triton.jit
def store_grid(x, xw, slot, valid, dst, p_w, m_t, i_n, i_x, tok_base, phase,
               HX: tl.constexpr, DX: tl.constexpr, ETA: tl.constexpr, TD: tl.constexpr):
    """Rows ``p_w`` of ``dst`` [·, DX] (where ``m_t``) written from grid slots ``slot`` (as :func:`load_grid`
    reads them: zero where not ``valid``), ``TD`` columns at a time."""
    for c0 in range(0, DX, TD):
        o_x = c0 + tl.arange(0, TD)
        b_x = load_grid(x, xw, slot, valid, i_n, i_x, tok_base, phase, HX, DX, ETA, o_x, o_x < DX)
        tl.store(dst + p_w[:, None] * DX + o_x[None, :], b_x.to(dst.dtype.element_ty),
                 mask=m_t[:, None] & (o_x < DX)[None, :])


@triton.jit
def store_cache(k, v, fk, wk, wv, wfk, ck, cv, cfk, cpos, ck_t, cv_t, cfk_t, cpos_t, refp,
                i_nh, i_n, i_h, i_g, tok_base, phase, seen,
                H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
                LAM: tl.constexpr, ETA: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr, TD: tl.constexpr):
    """The new state's cache of (row, query head) ``i_nh`` from its reference list ``refp`` [BL] (kept references
    first, then -1): slot ``j`` holds the pair reference ``refp[j]`` names (a slot of the old cache, or λ + a grid
    slot) and its position; empty slots are zero, at position -1."""
    o_l = tl.arange(0, BL)
    b_ref = tl.load(refp + o_l)
    b_oldpos = tl.load(cpos + i_nh * LAM + b_ref, mask=(b_ref >= 0) & (b_ref < LAM), other=-1)
    b_pos = tl.where(b_ref < 0, -1, tl.where(b_ref < LAM, b_oldpos, (seen // ETA - 1) * ETA + (b_ref - LAM)))
    tl.store(cpos_t + i_nh * LAM + o_l, b_pos, mask=o_l < LAM)
    o_r = tl.arange(0, BR)
    for r0 in range(0, BL, BR):
        ref = tl.load(refp + r0 + o_r)
        m_l = (r0 + o_r) < LAM
        p_c = i_nh * LAM + r0 + o_r
        store_refs(k, wk, ck, ref, ck_t, p_c, m_l, i_n, i_h, i_g, tok_base, phase, H, HKV, D, LAM, ETA, TD)
        store_refs(v, wv, cv, ref, cv_t, p_c, m_l, i_n, i_h, i_g, tok_base, phase, H, HKV, DV, LAM, ETA, TD)
        store_refs(fk, wfk, cfk, ref, cfk_t, p_c, m_l, i_n, i_h, i_h, tok_base, phase, H, H, F, LAM, ETA, TD)


@triton.jit
def cand_valid(refp, r0, LAM: tl.constexpr, ETA: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr):
    """Which of the candidates ``r0 .. r0 + BR`` are real pairs (``refp``: the cache's reference list)."""
    o_r = r0 + tl.arange(0, BR)
    ref = tl.load(refp + o_r, mask=o_r < LAM, other=-1)
    return tl.where(o_r < BL, ref >= 0, o_r - BL < ETA)


@triton.jit
def cand_rows(x, xw, xc, refp, r0, col0, i_c, i_n, i_h, i_x, tok_base, phase,
              H: tl.constexpr, HX: tl.constexpr, DX: tl.constexpr, LAM: tl.constexpr, ETA: tl.constexpr,
              BL: tl.constexpr, BR: tl.constexpr, TC: tl.constexpr):
    """Columns ``col0 .. col0 + TC`` of candidates ``r0 .. r0 + BR`` (a block lies wholly in the cache part or the
    window part: ``BR`` divides ``BL``), zero where a candidate or a column does not exist."""
    o_r = tl.arange(0, BR)
    o_x = col0 + tl.arange(0, TC)
    m_x = o_x < DX
    if r0 < BL:
        ref = tl.load(refp + r0 + o_r, mask=r0 + o_r < LAM, other=-1)
        b = load_refs(x, xw, xc, ref, i_n, i_h, i_x, tok_base, phase, H, HX, DX, LAM, ETA, o_x, m_x)
    else:
        t = r0 - BL + o_r
        b = load_grid(x, xw, i_c * ETA + t, t < ETA, i_n, i_x, tok_base, phase, HX, DX, ETA, o_x, m_x)
    return b


@triton.jit
def boundary(v, fk, wv, wfk, cv, cfk, refp, newrefp, flagp, scp,
             h_src, s_src, h_dst, s_dst,
             i_c, i_n, i_h, i_g, tok_base, phase,
             H: tl.constexpr, HKV: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
             LAM: tl.constexpr, ETA: tl.constexpr, BL: tl.constexpr, BT: tl.constexpr,
             BR: tl.constexpr, BJ: tl.constexpr, TK: tl.constexpr, TV: tl.constexpr,
             EPS: tl.constexpr, ACC: tl.constexpr, LOO: tl.constexpr):
    """One chunk boundary: score ``G ∪ W`` against the memory ``(h_src, s_src)`` ([F, Dv] and [F], row-major),
    keep the top λ (ties to the earlier position), write the new reference list to ``newrefp`` ([BL] int32, kept
    references in candidate order, then -1) and the memory with every other candidate folded in to
    ``(h_dst, s_dst)``.

    Scores: self-recall error ``‖v − Hᵀφk / (sᵀφk + ε)‖₂``, or with ``LOO`` its leave-one-out form, each candidate
    read against ``H + Σ_{c≠j} φ_c v_cᵀ`` (and ``s + Σ_{c≠j} φ_c``) through the Gram matrix of the candidates'
    features with its diagonal zeroed, never by subtracting ``φ_j`` from a total: the features are non-negative, so
    the denominator has no cancellation. The denominator does not depend on the value columns, so the squared
    error is summed tile by tile. Every product is IEEE (never TF32): a score that loses the low mantissa bits
    reorders near-tied candidates. Invalid candidates hold zero features and values and add nothing.

    ``flagp`` ([BL + BT] int32) and ``scp`` ([(BL + BT)·(1 + BR)] accumulation dtype) are this program's scratch.
    """
    NCAND: tl.constexpr = BL + BT
    o_r = tl.arange(0, BR)
    o_k = tl.arange(0, TK)
    o_v = tl.arange(0, TV)

    # ---- 1. scores, one row block of candidates at a time ---------------------------------------------------
    for r0 in range(0, NCAND, BR):
        z = tl.zeros([BR], dtype=ACC)
        for k0 in range(0, F, TK):
            b_f = cand_rows(fk, wfk, cfk, refp, r0, k0, i_c, i_n, i_h, i_h, tok_base, phase,
                            H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
            b_s = tl.load(s_src + k0 + o_k, mask=k0 + o_k < F, other=0.)
            z += tl.sum(b_f * b_s[None, :], 1)
        if LOO:
            # this row block's Gram rows against every candidate, diagonal zeroed, kept in the scratch
            for c0 in range(0, NCAND, BR):
                b_g = tl.zeros([BR, BR], dtype=ACC)
                for k0 in range(0, F, TK):
                    b_fr = cand_rows(fk, wfk, cfk, refp, r0, k0, i_c, i_n, i_h, i_h, tok_base, phase,
                                     H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
                    b_fc = cand_rows(fk, wfk, cfk, refp, c0, k0, i_c, i_n, i_h, i_h, tok_base, phase,
                                     H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
                    b_g += tl.dot(b_fr, tl.trans(b_fc), input_precision="ieee")
                b_g = tl.where((r0 + o_r)[:, None] == (c0 + o_r)[None, :], 0., b_g)
                z += tl.sum(b_g, 1)
                tl.store(scp + NCAND + o_r[:, None] * NCAND + c0 + o_r[None, :], b_g)
            tl.debug_barrier()
        z += EPS
        err = tl.zeros([BR], dtype=ACC)
        for j0 in range(0, DV, TV):
            b_r = tl.zeros([BR, TV], dtype=ACC)
            for k0 in range(0, F, TK):
                b_f = cand_rows(fk, wfk, cfk, refp, r0, k0, i_c, i_n, i_h, i_h, tok_base, phase,
                                H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
                b_h = tl.load(h_src + (k0 + o_k)[:, None] * DV + j0 + o_v[None, :],
                              mask=((k0 + o_k) < F)[:, None] & ((j0 + o_v) < DV)[None, :], other=0.)
                b_r += tl.dot(b_f, b_h, input_precision="ieee")
            if LOO:
                for c0 in range(0, NCAND, BR):
                    b_g = tl.load(scp + NCAND + o_r[:, None] * NCAND + c0 + o_r[None, :])
                    b_vc = cand_rows(v, wv, cv, refp, c0, j0, i_c, i_n, i_h, i_g, tok_base, phase,
                                     H, HKV, DV, LAM, ETA, BL, BR, TV).to(ACC)
                    b_r += tl.dot(b_g, b_vc, input_precision="ieee")
            b_v = cand_rows(v, wv, cv, refp, r0, j0, i_c, i_n, i_h, i_g, tok_base, phase,
                            H, HKV, DV, LAM, ETA, BL, BR, TV).to(ACC)
            b_e = b_v - b_r / z[:, None]
            err += tl.sum(b_e * b_e, 1)
        valid = cand_valid(refp, r0, LAM, ETA, BL, BR)
        tl.store(scp + r0 + o_r, tl.where(valid, tl.sqrt(err), float('-inf')))
        tl.debug_barrier()   # (the next row block overwrites the Gram rows)

    # ---- 2. ranks: how many valid candidates beat each one (a larger score, or the same at an earlier index) ----
    o_c = tl.arange(0, BL)
    o_w = tl.arange(0, BT)
    ref_c = tl.load(refp + o_c, mask=o_c < LAM, other=-1)
    valid_c = ref_c >= 0
    valid_w = o_w < ETA
    sc_c = tl.load(scp + o_c)
    sc_w = tl.load(scp + BL + o_w)
    rank_c = tl.zeros([BL], dtype=tl.int32)
    rank_w = tl.zeros([BT], dtype=tl.int32)
    for j0 in range(0, NCAND, BJ):
        o_j = j0 + tl.arange(0, BJ)
        s_j = tl.load(scp + o_j)
        valid_j = cand_valid(refp, j0, LAM, ETA, BL, BJ)
        beats_c = valid_j[None, :] & ((s_j[None, :] > sc_c[:, None]) |
                                      ((s_j[None, :] == sc_c[:, None]) & (o_j[None, :] < o_c[:, None])))
        beats_w = valid_j[None, :] & ((s_j[None, :] > sc_w[:, None]) |
                                      ((s_j[None, :] == sc_w[:, None]) & (o_j[None, :] < (BL + o_w)[:, None])))
        rank_c += tl.sum(beats_c.to(tl.int32), 1)
        rank_w += tl.sum(beats_w.to(tl.int32), 1)
    keep_c = valid_c & (rank_c < LAM)
    keep_w = valid_w & (rank_w < LAM)
    # the new cache: kept candidates in candidate (= position) order, then empty slots
    n_keep_c = tl.sum(keep_c.to(tl.int32), 0)
    n_keep = n_keep_c + tl.sum(keep_w.to(tl.int32), 0)
    slot_c = tl.cumsum(keep_c.to(tl.int32), 0) - 1
    slot_w = n_keep_c + tl.cumsum(keep_w.to(tl.int32), 0) - 1
    tl.store(newrefp + slot_c, ref_c, mask=keep_c)
    tl.store(newrefp + slot_w, (LAM + i_c * ETA + o_w).to(tl.int32), mask=keep_w)
    tl.store(newrefp + o_c, tl.full([BL], -1, dtype=tl.int32), mask=o_c >= n_keep)
    tl.store(flagp + o_c, (valid_c & ~keep_c).to(tl.int32))
    tl.store(flagp + BL + o_w, (valid_w & ~keep_w).to(tl.int32))
    tl.debug_barrier()

    # ---- 3. fold: H += Σ φ_j v_jᵀ, s += Σ φ_j over the candidates not kept, in [TK, TV] tiles of H ----
    for f0 in range(0, F, TK):
        m_k = (f0 + o_k) < F
        b_s = tl.load(s_src + f0 + o_k, mask=m_k, other=0.)
        for r0 in range(0, NCAND, BR):
            fold = tl.load(flagp + r0 + o_r).to(ACC)
            b_f = cand_rows(fk, wfk, cfk, refp, r0, f0, i_c, i_n, i_h, i_h, tok_base, phase,
                            H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
            b_s += tl.sum(b_f * fold[:, None], 0)
        tl.store(s_dst + f0 + o_k, b_s, mask=m_k)
        for j0 in range(0, DV, TV):
            m_hv = m_k[:, None] & ((j0 + o_v) < DV)[None, :]
            p_hv = (f0 + o_k)[:, None] * DV + j0 + o_v[None, :]
            b_h = tl.load(h_src + p_hv, mask=m_hv, other=0.)
            for r0 in range(0, NCAND, BR):
                fold = tl.load(flagp + r0 + o_r).to(ACC)
                b_f = cand_rows(fk, wfk, cfk, refp, r0, f0, i_c, i_n, i_h, i_h, tok_base, phase,
                                H, H, F, LAM, ETA, BL, BR, TK).to(ACC)
                b_v = cand_rows(v, wv, cv, refp, r0, j0, i_c, i_n, i_h, i_g, tok_base, phase,
                                H, HKV, DV, LAM, ETA, BL, BR, TV).to(ACC)
                b_h += tl.dot(tl.trans(b_f * fold[:, None]), b_v, input_precision="ieee")
            tl.store(h_dst + p_hv, b_h, mask=m_hv)
    tl.debug_barrier()


@triton.jit
def copy_memory(h_src, s_src, h_dst, s_dst, DV: tl.constexpr, F: tl.constexpr, TK: tl.constexpr,
                TV: tl.constexpr):
    """``(h_dst, s_dst) = (h_src, s_src)`` in [TK, TV] tiles (the memory across a chunk without a boundary)."""
    o_k = tl.arange(0, TK)
    o_v = tl.arange(0, TV)
    for f0 in range(0, F, TK):
        m_k = (f0 + o_k) < F
        tl.store(s_dst + f0 + o_k, tl.load(s_src + f0 + o_k, mask=m_k, other=0.), mask=m_k)
        for j0 in range(0, DV, TV):
            m_hv = m_k[:, None] & ((j0 + o_v) < DV)[None, :]
            p_hv = (f0 + o_k)[:, None] * DV + j0 + o_v[None, :]
            tl.store(h_dst + p_hv, tl.load(h_src + p_hv, mask=m_hv, other=0.), mask=m_hv)
    tl.debug_barrier()
