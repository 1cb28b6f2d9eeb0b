"""Chunked LoLA prefill in Triton: a sequential selection pass, then a parallel output pass.

The split mirrors fla's chunked linear attention (``chunk_fwd_h`` then ``chunk_fwd_o`` in
``fla/ops/common/``):

1. :func:`lola_fwd_kernel_select`, one program per (row, query head), walks the row's chunks in order
   carrying ``H`` [F, Dv] and ``s`` [F] in registers. Before each chunk it stores the snapshot
   ``(H, s)`` the chunk's queries read and the chunk's cache as λ *references*; at each boundary it scores
   ``G ∪ W`` by self-recall error, keeps the top λ (ties → earlier position) and folds the rest with one
   ``tl.dot``. At the end it writes the final :class:`~fla_lola.ops.state.LoLAState` in the canonical layout.
2. :func:`lola_fwd_kernel_o`, one program per (chunk, query head), all chunks in parallel: a
   FlashAttention-style online softmax over the chunk's sparse cache (in blocks), the previous chunk and
   the causal current chunk, merged with the linear read-out ``φq·H``, ``φq·s`` under the spec's single
   normalizer; with ``mix="lola"`` the running max starts at 0, which is the spec's overflow guard
   ``c = max(0, max a)``.

**The grid.** Every row (batch row or packed sequence) is addressed on a chunk-aligned grid of slots:
slots ``[0, η)`` are the state's ``W``, slots ``[η, η + seen % η)`` the state's partial chunk ``P``, and
the row's ``i``-th new token sits at slot ``η + seen % η + i``. Chunk boundaries of every row thus fall at
multiples of η on the grid, whatever its padding or how many tokens its state has seen. The grid is never
materialized: a slot is read from the state's window (slots before ``η + seen % η``) or from the input
tensor at token ``tok_base + slot``, so left/right padding, ``cu_seqlens`` and arbitrary initial states
cost no copy. A cache entry is a reference ``r``: ``r < λ`` is slot ``r`` of the initial state's cache,
``r ≥ λ`` is grid slot ``r - λ``, ``-1`` is empty; the output pass resolves references with gathers, so
cached pairs are never copied either, and keys and values of a GQA group are read from their shared
key head (``h // (H / Hkv)``) instead of being repeated.

Memory: per chunk a snapshot of ``H`` and ``s`` (F×(Dv+1), accumulation dtype) like fla's ``h``, and λ int32
references: ``4·H·(F·(Dv+1) + λ) / η`` bytes per token (33 KB at H = 32, F = Dv = 128, η = λ = 64; 2.1 GB at 64K).
:func:`chunk_lola_fwd` bounds it: a prefill whose snapshots would exceed :data:`SNAPSHOT_BUDGET` bytes runs as
consecutive segments of whole chunks along T, each continuing the previous one's state (exact: the streaming
split is invariant), so a prefill of any length allocates at most ``SNAPSHOT_BUDGET`` of snapshots.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets

from fla_lola.kernels.select import boundary_scores, place, rank_and_place
from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS

NUM_WARPS = [4, 8]
# bytes of per-chunk snapshots one prefill launch may allocate (longer prefills run in segments)
SNAPSHOT_BUDGET = 256 * 2**20


def block(n: int) -> int:
    """A power-of-two block of at least 16 rows/columns (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


def tl_acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


# Precision: every ``tl.dot`` of these kernels asks for ``input_precision="ieee"``. Dots over float32 operands
# (the memory H, s, the self-recall score, fp32 inputs) are then IEEE float32, never TF32 (Triton's default,
# whose 10-bit mantissa reorders near-tied selection scores); dots over bf16/fp16 operands (q·k and P·V of
# low-precision inputs) are native bf16/fp16 MMAs with float32 accumulation, which the flag does not change.


# ---------------------------------------------------------------------------------------------------
# slot addressing
# ---------------------------------------------------------------------------------------------------

@triton.jit
def slot_valid(slot, seen, end, ETA: tl.constexpr):
    """Grid slot holds a real pair: the state's W (slot < η, once η tokens were seen) or P / a new token."""
    # (scalar conditions enter as bounds, not as `block & scalar_bool`, which the interpreter mistypes)
    w_end = tl.where(seen >= ETA, ETA, 0)
    return (slot >= 0) & ((slot < w_end) | ((slot >= ETA) & (slot - ETA < end)))


@triton.jit
def load_grid(x, xw, slot, valid, i_n, i_x, tok_base, phase,
              HX: tl.constexpr, DX: tl.constexpr, ETA: tl.constexpr, o_d, m_d):
    """Rows ``[len(slot), BD]`` of grid slots, zero where not ``valid``.

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


# ---------------------------------------------------------------------------------------------------
# 1. sequential pass: snapshots, selection, fold, final state
# ---------------------------------------------------------------------------------------------------

@triton.heuristics({'STORE_FINAL': lambda args: args['ht'] is not None})
@triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in NUM_WARPS],
    key=['H', 'HKV', 'D', 'DV', 'F', 'ETA', 'LAM', 'ACC', 'LOO'],
)
@triton.jit
def lola_fwd_kernel_select(
    k, v, fk,
    h0, s0, ck, cv, cfk, cpos, wk, wv, wfk,
    seen_ptr, lens_ptr, tok_base_ptr, chunk_offsets,
    hs, ss, cidx,
    ht, st, ck_t, cv_t, cfk_t, cpos_t, wk_t, wv_t, wfk_t,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    ETA: tl.constexpr, LAM: tl.constexpr, LAMP: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr,
    EPS: tl.constexpr, ACC: tl.constexpr, LOO: tl.constexpr, STORE_FINAL: tl.constexpr,
):
    i_nh = tl.program_id(0)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // HKV)
    seen = tl.load(seen_ptr + i_n)
    length = tl.load(lens_ptr + i_n)
    tok_base = tl.load(tok_base_ptr + i_n)
    phase = seen % ETA
    end = phase + length
    boc = tl.load(chunk_offsets + i_n)
    NC = (tl.load(chunk_offsets + i_n + 1) - boc).to(tl.int32)

    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    o_t, o_l = tl.arange(0, BT), tl.arange(0, BL)
    m_hv = m_f[:, None] & m_v[None, :]
    i_nh64 = i_nh.to(tl.int64)

    b_h = tl.load(h0 + (i_nh64 * F + o_f[:, None]) * DV + o_v[None, :], mask=m_hv, other=0.).to(ACC)
    b_s = tl.load(s0 + i_nh64 * F + o_f, mask=m_f, other=0.).to(ACC)
    b_cp = tl.load(cpos + i_nh64 * LAM + o_l, mask=o_l < LAM, other=-1)
    b_ref = tl.where(b_cp >= 0, o_l, -1).to(tl.int32)

    for i_c in range(NC):
        i_tg = (boc + i_c).to(tl.int64)
        # what chunk i_c's queries read: the memory and cache before its boundary
        tl.store(hs + ((i_tg * H + i_h) * F + o_f[:, None]) * DV + o_v[None, :], b_h.to(hs.dtype.element_ty),
                 mask=m_hv)
        tl.store(ss + (i_tg * H + i_h) * F + o_f, b_s.to(ss.dtype.element_ty), mask=m_f)
        tl.store(cidx + (i_tg * H + i_h) * LAMP + o_l, b_ref, mask=o_l < LAM)
        # boundary after chunk i_c: it is complete and a previous chunk W (grid chunk i_c) exists
        if (end >= (i_c + 1) * ETA) & ((i_c > 0) | (seen >= ETA)):
            valid_c = b_ref >= 0
            b_vc = load_refs(v, wv, cv, b_ref, i_n, i_h, i_g, tok_base, phase, H, HKV, DV, LAM, ETA,
                             o_v, m_v).to(ACC)
            b_fc = load_refs(fk, wfk, cfk, b_ref, i_n, i_h, i_h, tok_base, phase, H, H, F, LAM, ETA,
                             o_f, m_f).to(ACC)
            w_slot = i_c * ETA + o_t
            valid_w = o_t < ETA
            b_vw = load_grid(v, wv, w_slot, valid_w, i_n, i_g, tok_base, phase, HKV, DV, ETA, o_v, m_v).to(ACC)
            b_fw = load_grid(fk, wfk, w_slot, valid_w, i_n, i_h, tok_base, phase, H, F, ETA, o_f, m_f).to(ACC)
            score_c, score_w = boundary_scores(b_vc, b_fc, valid_c, b_vw, b_fw, valid_w, b_h, b_s, BL, BT,
                                               EPS, LOO)
            keep_c, slot_c, keep_w, slot_w = rank_and_place(score_c, valid_c, score_w, valid_w, LAM, BL, BT)
            fold_c = (valid_c & ~keep_c).to(ACC)
            fold_w = (valid_w & ~keep_w).to(ACC)
            b_fc = b_fc * fold_c[:, None]
            b_fw = b_fw * fold_w[:, None]
            b_h += tl.dot(tl.trans(b_fc), b_vc, input_precision="ieee")
            b_h += tl.dot(tl.trans(b_fw), b_vw, input_precision="ieee")
            b_s += tl.sum(b_fc, 0) + tl.sum(b_fw, 0)
            b_ref = place(b_ref, keep_c, slot_c, (LAM + w_slot).to(tl.int32), keep_w, slot_w, BL).to(tl.int32)

    if STORE_FINAL:
        tl.store(ht + (i_nh64 * F + o_f[:, None]) * DV + o_v[None, :], b_h.to(ht.dtype.element_ty), mask=m_hv)
        tl.store(st + i_nh64 * F + o_f, b_s.to(st.dtype.element_ty), mask=m_f)
        # the cache, canonical: valid references first (ascending position), empty slots zero
        m_l = o_l < LAM
        p_c = i_nh64 * LAM + o_l
        b_k = load_refs(k, wk, ck, b_ref, i_n, i_h, i_g, tok_base, phase, H, HKV, D, LAM, ETA, o_d, m_d)
        b_v = load_refs(v, wv, cv, b_ref, i_n, i_h, i_g, tok_base, phase, H, HKV, DV, LAM, ETA, o_v, m_v)
        b_f = load_refs(fk, wfk, cfk, b_ref, i_n, i_h, i_h, tok_base, phase, H, H, F, LAM, ETA, o_f, m_f)
        tl.store(ck_t + p_c[:, None] * D + o_d[None, :], b_k.to(ck_t.dtype.element_ty), mask=m_l[:, None] & m_d)
        tl.store(cv_t + p_c[:, None] * DV + o_v[None, :], b_v.to(cv_t.dtype.element_ty), mask=m_l[:, None] & m_v)
        tl.store(cfk_t + p_c[:, None] * F + o_f[None, :], b_f.to(cfk_t.dtype.element_ty), mask=m_l[:, None] & m_f)
        b_oldpos = tl.load(cpos + i_nh64 * LAM + b_ref, mask=(b_ref >= 0) & (b_ref < LAM), other=-1)
        b_gridpos = (seen // ETA - 1) * ETA + (b_ref - LAM)
        b_pos = tl.where(b_ref < 0, -1, tl.where(b_ref < LAM, b_oldpos, b_gridpos))
        tl.store(cpos_t + p_c, b_pos, mask=m_l)
        # the window: W = grid chunk end // η, P = the next one (its first end % η slots are valid)
        w0 = (end // ETA) * ETA
        for i_w in tl.static_range(2):
            slot = w0 + i_w * ETA + o_t
            valid = (o_t < ETA) & slot_valid(slot, seen, end, ETA)
            m_t = o_t < ETA
            # (new names: the cache's b_k, b_v, b_f are [BL, ·] and a compiler refuses a block that changes shape)
            b_fx = load_grid(fk, wfk, slot, valid, i_n, i_h, tok_base, phase, H, F, ETA, o_f, m_f)
            p_w = (i_nh64 * (2 * ETA) + i_w * ETA + o_t)
            tl.store(wfk_t + p_w[:, None] * F + o_f[None, :], b_fx.to(wfk_t.dtype.element_ty),
                     mask=m_t[:, None] & m_f[None, :])
            if i_h % (H // HKV) == 0:  # one writer per key head
                b_kx = load_grid(k, wk, slot, valid, i_n, i_g, tok_base, phase, HKV, D, ETA, o_d, m_d)
                b_vx = load_grid(v, wv, slot, valid, i_n, i_g, tok_base, phase, HKV, DV, ETA, o_v, m_v)
                p_w = ((i_n * HKV + i_g).to(tl.int64) * (2 * ETA) + i_w * ETA + o_t)
                tl.store(wk_t + p_w[:, None] * D + o_d[None, :], b_kx.to(wk_t.dtype.element_ty),
                         mask=m_t[:, None] & m_d[None, :])
                tl.store(wv_t + p_w[:, None] * DV + o_v[None, :], b_vx.to(wv_t.dtype.element_ty),
                         mask=m_t[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------------------------------
# 2. parallel pass: outputs
# ---------------------------------------------------------------------------------------------------

@triton.jit
def attend(b_q, b_k, b_v, mask, b_m, b_l, b_acc, scale):
    """One FlashAttention step: logits of a key block, running max, rescaled numerator and denominator."""
    b_a = tl.dot(b_q, tl.trans(b_k), input_precision="ieee") * scale
    b_a = tl.where(mask, b_a, float('-inf'))
    b_m_new = tl.maximum(b_m, tl.max(b_a, 1))
    alpha = tl.exp(b_m - b_m_new)
    b_p = tl.exp(b_a - b_m_new[:, None])
    b_l = b_l * alpha + tl.sum(b_p, 1)
    b_acc = b_acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision="ieee")
    return b_m_new, b_l, b_acc


@triton.autotune(
    configs=[triton.Config({'BLK': blk}, num_warps=w) for blk in [64, 32] for w in NUM_WARPS],
    key=['H', 'HKV', 'D', 'DV', 'F', 'ETA', 'LAM', 'ACC'],
)
@triton.jit
def lola_fwd_kernel_o(
    q, k, v, fq, o,
    ck, cv, wk, wv,
    seen_ptr, lens_ptr, tok_base_ptr, chunk_indices,
    hs, ss, cidx, gate, scale_ptr,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    ETA: tl.constexpr, LAM: tl.constexpr, LAMP: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, BLK: tl.constexpr,
    EPS: tl.constexpr, MIX_LOLA: tl.constexpr, ACC: tl.constexpr,
):
    i_tg, i_h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_n = tl.load(chunk_indices + i_tg * 2).to(tl.int32)
    i_c = tl.load(chunk_indices + i_tg * 2 + 1).to(tl.int32)
    i_g = i_h // (H // HKV)
    seen = tl.load(seen_ptr + i_n)
    length = tl.load(lens_ptr + i_n)
    tok_base = tl.load(tok_base_ptr + i_n)
    phase = seen % ETA
    end = phase + length
    scale = tl.load(scale_ptr)

    o_d, o_v, o_f, o_t = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF), tl.arange(0, BT)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F

    # the chunk's new tokens (the state's P tokens before them were answered by an earlier call)
    q_slot = (i_c + 1) * ETA + o_t
    m_q = (o_t < ETA) & (q_slot - ETA >= phase) & (q_slot - ETA < end)
    p_tok = tok_base + q_slot
    b_q = tl.load(q + ((p_tok[:, None] * H + i_h) * D + o_d[None, :]), mask=m_q[:, None] & m_d[None, :], other=0.)
    b_fq = tl.load(fq + ((p_tok[:, None] * H + i_h) * F + o_f[None, :]), mask=m_q[:, None] & m_f[None, :],
                   other=0.).to(ACC)

    if MIX_LOLA:
        b_m = tl.zeros([BT], dtype=ACC)  # the running max starts at 0: c = max(0, max a)
    else:
        b_m = tl.full([BT], -1e30, dtype=ACC)
    b_l = tl.zeros([BT], dtype=ACC)
    b_acc = tl.zeros([BT, BV], dtype=ACC)

    # sparse cache, in blocks of BLK references
    for i_l in range(0, LAM, BLK):
        o_lk = i_l + tl.arange(0, BLK)
        ref = tl.load(cidx + (i_tg * H + i_h) * LAMP + o_lk, mask=o_lk < LAM, other=-1)
        b_k = load_refs(k, wk, ck, ref, i_n, i_h, i_g, tok_base, phase, H, HKV, D, LAM, ETA, o_d, m_d)
        b_v = load_refs(v, wv, cv, ref, i_n, i_h, i_g, tok_base, phase, H, HKV, DV, LAM, ETA, o_v, m_v)
        b_m, b_l, b_acc = attend(b_q, b_k, b_v, (ref >= 0)[None, :], b_m, b_l, b_acc, scale)
    # previous chunk W, then the current chunk, causally
    for i_w in tl.static_range(2):
        k_slot = (i_c + i_w) * ETA + o_t
        valid = (o_t < ETA) & slot_valid(k_slot, seen, end, ETA)
        b_k = load_grid(k, wk, k_slot, valid, i_n, i_g, tok_base, phase, HKV, D, ETA, o_d, m_d)
        b_v = load_grid(v, wv, k_slot, valid, i_n, i_g, tok_base, phase, HKV, DV, ETA, o_v, m_v)
        mask = valid[None, :] & ((i_w == 0) | (k_slot[None, :] <= q_slot[:, None]))
        b_m, b_l, b_acc = attend(b_q, b_k, b_v, mask, b_m, b_l, b_acc, scale)

    # linear read-out of the chunk's snapshot
    b_h = tl.load(hs + ((i_tg * H + i_h) * F + o_f[:, None]) * DV + o_v[None, :],
                  mask=m_f[:, None] & m_v[None, :], other=0.).to(ACC)
    b_s = tl.load(ss + (i_tg * H + i_h) * F + o_f, mask=m_f, other=0.).to(ACC)
    lin_num = tl.dot(b_fq, b_h, input_precision="ieee")
    lin_den = tl.sum(b_fq * b_s[None, :], 1)
    gamma = tl.load(gate + i_h).to(ACC)
    if MIX_LOLA:
        e = tl.exp(-b_m)
        num = gamma * b_acc + ((1 - gamma) * e)[:, None] * lin_num
        den = gamma * b_l + (1 - gamma) * e * lin_den + EPS * e
    else:
        num = gamma * b_acc + lin_num
        den = gamma * b_l + lin_den
    b_o = num / tl.where(m_q, den, 1.)[:, None]  # rows that are no query may have nothing to attend to
    tl.store(o + ((p_tok[:, None] * H + i_h) * DV + o_v[None, :]), b_o.to(o.dtype.element_ty),
             mask=m_q[:, None] & m_v[None, :])


# ---------------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------------

def row_layout(B: int, T: int, attention_mask, cu_seqlens, device, start: int = 0, stop: int | None = None):
    """``(first, lengths)``: each row's first token in columns ``[start, stop)`` as a flat index into ``[B*T]``,
    and its token count there.

    Rows are batch rows, or packed sequences with ``cu_seqlens``; a padded row is one contiguous block
    (left or right padding, as :func:`fla_lola.ops.utils.check_inputs` enforces), so it starts after its
    leading zeros, in any range of columns too.
    """
    stop = T if stop is None else stop
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long).clamp(start, stop)
        return cu[:-1], cu[1:] - cu[:-1]
    rows = torch.arange(B, device=device, dtype=torch.long) * T + start
    if attention_mask is None:
        return rows, torch.full((B,), stop - start, dtype=torch.long, device=device)
    valid = (attention_mask[:, start:stop] != 0).long()
    leading = (valid.cumsum(1) == 0).sum(1)
    return rows + leading, valid.sum(1)


def segment_length(N: int, H: int, F: int, Dv: int, eta: int, lam: int, acc_bytes: int,
                   budget: int | None = None) -> int:
    """Tokens per row one prefill launch takes so its snapshots fit ``budget`` (whole chunks, at least one)."""
    budget = SNAPSHOT_BUDGET if budget is None else budget
    per_chunk = H * (F * (Dv + 1) * acc_bytes + max(lam, 1) * 4)
    # a row's S tokens start mid-chunk at worst: S / η + 1 chunks
    return eta * max(1, budget // max(1, N * per_chunk) - 1)


def empty_state_like(q, k, v, fq, N, window_size, cache_size):
    return LoLAState.empty(N, q.shape[2], k.shape[2], q.shape[3], v.shape[3], fq.shape[3], window_size,
                           cache_size, dtype=q.dtype, device=q.device)


def alloc_state_like(state: LoLAState) -> LoLAState:
    return LoLAState(**{name: torch.empty_like(x) for name, x in vars(state).items()})


def chunk_lola_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
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
    """Prefill of any length; shapes as in :func:`fla_lola.lola_attention`, tensors contiguous.

    Runs in segments of :func:`segment_length` tokens along T when the snapshots of one launch would exceed
    :data:`SNAPSHOT_BUDGET`, each segment continuing the state of the one before.
    """
    B, T, H, D = q.shape
    Dv, F = v.shape[3], fq.shape[3]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    acc_bytes = torch.empty((), dtype=accumulation_dtype(q.dtype)).element_size()
    step = segment_length(N, H, F, Dv, window_size, cache_size, acc_bytes)
    o = torch.zeros(B, T, H, Dv, dtype=q.dtype, device=q.device)   # padding positions stay zero
    state, final = initial_state, None
    for start in range(0, max(T, 1), step):
        stop = min(T, start + step)
        first, lengths = row_layout(B, T, attention_mask, cu_seqlens, q.device, start, stop)
        last = stop == T
        final = chunk_lola_fwd_segment(q, k, v, fq, fk, gate, o, first, lengths, window_size, cache_size, scale,
                                       mix, state, output_final_state or not last, selection)
        state = final
    return o, final


def chunk_lola_fwd_segment(q, k, v, fq, fk, gate, o, first, lengths, window_size, cache_size, scale, mix,
                           initial_state, output_final_state, selection='sre'):
    """One launch of both kernels for the rows' tokens ``first[r] ..< first[r] + lengths[r]``; writes ``o`` there."""
    B, T, H, D = q.shape
    Hkv, Dv, F = k.shape[2], v.shape[3], fq.shape[3]
    eta, lam = window_size, cache_size
    dev = q.device
    acc = accumulation_dtype(q.dtype)
    N = lengths.shape[0]
    state = initial_state if initial_state is not None else empty_state_like(q, k, v, fq, N, eta, lam)
    state = LoLAState(**{name: x.contiguous() for name, x in vars(state).items()})
    seen = state.seen
    phase = seen % eta
    tok_base = first - eta - phase                         # flat token index of grid slot 0
    # query chunks per row: those holding new tokens, i.e. ceil((phase + len) / η), none for an empty row
    ends = torch.where(lengths > 0, phase + lengths, torch.zeros_like(lengths))
    cu_ends = torch.nn.functional.pad(ends.cumsum(0), (1, 0))
    chunk_offsets = prepare_chunk_offsets(cu_ends, eta)
    chunk_indices = prepare_chunk_indices(cu_ends, eta)
    NT = chunk_indices.shape[0]

    lamp = max(lam, 1)
    hs = torch.empty(NT, H, F, Dv, dtype=acc, device=dev)
    ss = torch.empty(NT, H, F, dtype=acc, device=dev)
    cidx = torch.empty(NT, H, lamp, dtype=torch.int32, device=dev)
    final = alloc_state_like(state) if output_final_state else None
    f = vars(final) if final is not None else {}
    consts = dict(H=H, HKV=Hkv, D=D, DV=Dv, F=F, ETA=eta, LAM=lam, LAMP=lamp, BD=block(D), BV=block(Dv),
                  BF=block(F), BT=block(eta), EPS=EPS, ACC=tl_acc(q.dtype))

    if N * H > 0:
        lola_fwd_kernel_select[(N * H,)](
            k, v, fk,
            state.h, state.s, state.cache_k, state.cache_v, state.cache_fk, state.cache_pos,
            state.window_k, state.window_v, state.window_fk,
            seen, lengths, tok_base, chunk_offsets,
            hs, ss, cidx,
            f.get('h'), f.get('s'), f.get('cache_k'), f.get('cache_v'), f.get('cache_fk'), f.get('cache_pos'),
            f.get('window_k'), f.get('window_v'), f.get('window_fk'),
            BL=block(lam), LOO=(selection == 'loo'), **consts,
        )
    if NT > 0:
        scale_t = torch.full((1,), scale, dtype=acc, device=dev)
        lola_fwd_kernel_o[(NT, H)](
            q, k, v, fq, o,
            state.cache_k, state.cache_v, state.window_k, state.window_v,
            seen, lengths, tok_base, chunk_indices,
            hs, ss, cidx, gate, scale_t,
            MIX_LOLA=(mix == 'lola'), **consts,
        )
    if final is not None:
        final.seen = seen + lengths
    return final
