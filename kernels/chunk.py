"""Chunked LoLA prefill in Triton: a sequential selection pass, then a parallel output pass.

The split mirrors fla's chunked linear attention (``chunk_fwd_h`` then ``chunk_fwd_o`` in
``fla/ops/common/``):

1. :func:`lola_fwd_kernel_select`, one program per (row, query head), walks the row's chunks in order.
   The memory ``H`` [F, Dv], ``s`` [F] lives in global memory, in the per-chunk snapshot buffers the output
   pass reads: chunk ``i``'s snapshot is the memory before its boundary, and the boundary writes the memory
   after it into chunk ``i + 1``'s snapshot (the last one into the final state). Before each chunk it stores
   the chunk's cache as λ *references*; at each boundary it scores ``G ∪ W`` by self-recall error, keeps the
   top λ (ties → earlier position) and folds the rest, all in row blocks of candidates and tiles of ``H``
   (:func:`fla_lola.kernels.select.boundary`), so no register block grows with F·Dv or (λ+η)². At the end
   it writes the final :class:`~fla_lola.ops.state.LoLAState` in the canonical layout.
2. :func:`lola_fwd_kernel_o`, one program per (chunk, query head, tile of value columns), all in parallel:
   a FlashAttention-style online softmax over the chunk's sparse cache (in blocks), the previous chunk and
   the causal current chunk, merged with the linear read-out ``φq·H``, ``φq·s`` (features in chunks) under
   the spec's single normalizer; with ``mix="lola"`` the running max starts at 0, which is the spec's
   overflow guard ``c = max(0, max a)``.

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

from fla_lola.kernels.select import (boundary, copy_memory, load_grid, load_refs, slot_valid, store_cache,
                                    store_grid)
from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS

NUM_WARPS = [4, 8]
# bytes of per-chunk snapshots one prefill launch may allocate (longer prefills run in segments)
SNAPSHOT_BUDGET = 256 * 2**20


def block(n: int) -> int:
    """A power-of-two block of at least 16 rows/columns (the smallest ``tl.dot`` operand)."""
    return max(16, triton.next_power_of_2(max(int(n), 1)))


# Tiles of the kernels (docs: kernels/select.py): candidates in row blocks of ROWS, features in chunks of KCHUNK
# (the K of every float32 FMA dot), the memory's value columns in tiles of VTILE (sequential kernels) and of
# OUT_VTILE (output pass, one program per tile; its features in chunks of OUT_KCHUNK), rank comparisons against
# RANKCOLS candidates at a time.
ROWS, KCHUNK, VTILE, OUT_VTILE, OUT_KCHUNK, RANKCOLS = 32, 32, 32, 64, 16, 8


def tiles(D: int, Dv: int, F: int, eta: int, lam: int) -> dict:
    """Block and tile sizes of the sequential kernels (select, decode) for these widths."""
    BL, BT = block(lam), block(eta)
    return dict(BT=BT, BL=BL, BR=min(ROWS, BL, BT), BJ=RANKCOLS, TD=min(KCHUNK, block(max(D, Dv, F))),
                TK=min(KCHUNK, block(F)), TV=min(VTILE, block(Dv)))


def scratch(n: int, t: dict, extra_refs: int, acc: torch.dtype, device):
    """Per-program scratch of :func:`fla_lola.kernels.select.boundary`: int32 reference lists and fold flags
    (plus ``extra_refs`` lists of BL), and scores with the leave-one-out Gram rows in the accumulation dtype."""
    BL, BT, BR = t['BL'], t['BT'], t['BR']
    return (torch.empty(n, (2 + extra_refs) * BL + BT, dtype=torch.int32, device=device),
            torch.empty(n, (BL + BT) * (1 + BR), dtype=acc, device=device))


def tl_acc(dtype: torch.dtype):
    return tl.float64 if accumulation_dtype(dtype) == torch.float64 else tl.float32


# Precision: every ``tl.dot`` of these kernels asks for ``input_precision="ieee"``. Dots over float32 operands
# (the memory H, s, the self-recall score, fp32 inputs) are then IEEE float32, never TF32 (Triton's default,
# whose 10-bit mantissa reorders near-tied selection scores); dots over bf16/fp16 operands (q·k and P·V of
# low-precision inputs) are native bf16/fp16 MMAs with float32 accumulation, which the flag does not change.


# ---------------------------------------------------------------------------------------------------
# 1. sequential pass: snapshots, selection, fold, final state
# ---------------------------------------------------------------------------------------------------

@triton.heuristics({'STORE_FINAL': lambda args: args['cpos_t'] is not None})
@triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=1) for w in NUM_WARPS],
    key=['H', 'HKV', 'D', 'DV', 'F', 'ETA', 'LAM', 'ACC', 'LOO'],
)
@triton.jit
def lola_fwd_kernel_select(
    k, v, fk,
    h0, s0, ck, cv, cfk, cpos, wk, wv, wfk,
    seen_ptr, lens_ptr, tok_base_ptr, chunk_offsets,
    hs, ss, cidx, iscr, fscr,
    ht, st, ck_t, cv_t, cfk_t, cpos_t, wk_t, wv_t, wfk_t,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    ETA: tl.constexpr, LAM: tl.constexpr, LAMP: tl.constexpr,
    BT: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
    TD: tl.constexpr, TK: tl.constexpr, TV: tl.constexpr,
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

    o_l, o_r = tl.arange(0, BL), tl.arange(0, BR)
    i_nh64 = i_nh.to(tl.int64)
    # this program's scratch: the new reference list, fold flags, scores and Gram rows
    newrefp = iscr + i_nh64 * (2 * BL + BT)
    flagp = newrefp + BL
    scp = fscr + i_nh64 * ((BL + BT) * (1 + BR))
    # the memory lives in global memory: chunk i_c's snapshot (H, s before its boundary) in hs, ss; the boundary
    # writes the memory after it into the next chunk's snapshot, the last one into (ht, st)
    h_fin = ht + i_nh64 * F * DV
    s_fin = st + i_nh64 * F
    if NC > 0:
        copy_memory(h0 + i_nh64 * F * DV, s0 + i_nh64 * F, hs + (boc * H + i_h) * F * DV, ss + (boc * H + i_h) * F,
                    DV, F, TK, TV)
    else:
        copy_memory(h0 + i_nh64 * F * DV, s0 + i_nh64 * F, h_fin, s_fin, DV, F, TK, TV)
    b_cp = tl.load(cpos + i_nh64 * LAM + o_l, mask=o_l < LAM, other=-1)
    b_ref = tl.where(b_cp >= 0, o_l, -1).to(tl.int32)

    for i_c in range(NC):
        i_tg = (boc + i_c).to(tl.int64)
        # what chunk i_c's queries read: the memory (already in hs, ss) and the cache before its boundary
        refp = cidx + (i_tg * H + i_h) * LAMP
        tl.store(refp + o_l, b_ref, mask=o_l < LAM)
        tl.debug_barrier()
        h_cur = hs + (i_tg * H + i_h) * F * DV
        s_cur = ss + (i_tg * H + i_h) * F
        last = i_c + 1 == NC
        h_nxt = tl.where(last, h_fin, h_cur + H * F * DV)
        s_nxt = tl.where(last, s_fin, s_cur + H * F)
        # boundary after chunk i_c: it is complete and a previous chunk W (grid chunk i_c) exists
        if (end >= (i_c + 1) * ETA) & ((i_c > 0) | (seen >= ETA)):
            boundary(v, fk, wv, wfk, cv, cfk, refp, newrefp, flagp, scp, h_cur, s_cur, h_nxt, s_nxt,
                     i_c, i_n, i_h, i_g, tok_base, phase, H, HKV, DV, F, LAM, ETA, BL, BT, BR, BJ, TK, TV,
                     EPS, ACC, LOO)
            b_ref = tl.load(newrefp + o_l)
        else:
            copy_memory(h_cur, s_cur, h_nxt, s_nxt, DV, F, TK, TV)

    if STORE_FINAL:
        # the cache, canonical: valid references first (ascending position), empty slots zero; in row blocks
        tl.store(newrefp + o_l, b_ref)
        tl.debug_barrier()
        store_cache(k, v, fk, wk, wv, wfk, ck, cv, cfk, cpos, ck_t, cv_t, cfk_t, cpos_t, newrefp,
                    i_nh64, i_n, i_h, i_g, tok_base, phase, seen, H, HKV, D, DV, F, LAM, ETA, BL, BR, TD)
        # the window: W = grid chunk end // η, P = the next one (its first end % η slots are valid)
        w0 = (end // ETA) * ETA
        for i_w in tl.static_range(2):
            for t0 in range(0, BT, BR):
                o_t = t0 + o_r
                slot = w0 + i_w * ETA + o_t
                m_t = o_t < ETA
                valid = m_t & slot_valid(slot, seen, end, ETA)
                p_w = (i_nh64 * (2 * ETA) + i_w * ETA + o_t)
                store_grid(fk, wfk, slot, valid, wfk_t, p_w, m_t, i_n, i_h, tok_base, phase, H, F, ETA, TD)
                if i_h % (H // HKV) == 0:  # one writer per key head
                    p_g = ((i_n * HKV + i_g).to(tl.int64) * (2 * ETA) + i_w * ETA + o_t)
                    store_grid(k, wk, slot, valid, wk_t, p_g, m_t, i_n, i_g, tok_base, phase, HKV, D, ETA, TD)
                    store_grid(v, wv, slot, valid, wv_t, p_g, m_t, i_n, i_g, tok_base, phase, HKV, DV, ETA, TD)


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
    BD: tl.constexpr, BT: tl.constexpr, TK: tl.constexpr, TVO: tl.constexpr, BLK: tl.constexpr,
    EPS: tl.constexpr, MIX_LOLA: tl.constexpr, ACC: tl.constexpr,
):
    # one program per (chunk, query head, tile of TVO value columns)
    i_tg, i_h, i_vt = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_indices + i_tg * 2).to(tl.int32)
    i_c = tl.load(chunk_indices + i_tg * 2 + 1).to(tl.int32)
    i_g = i_h // (H // HKV)
    seen = tl.load(seen_ptr + i_n)
    length = tl.load(lens_ptr + i_n)
    tok_base = tl.load(tok_base_ptr + i_n)
    phase = seen % ETA
    end = phase + length
    scale = tl.load(scale_ptr)

    o_d, o_t, o_k = tl.arange(0, BD), tl.arange(0, BT), tl.arange(0, TK)
    o_v = i_vt * TVO + tl.arange(0, TVO)
    m_d, m_v = o_d < D, o_v < DV

    # the chunk's new tokens (the state's P tokens before them were answered by an earlier call)
    q_slot = (i_c + 1) * ETA + o_t
    m_q = (o_t < ETA) & (q_slot - ETA >= phase) & (q_slot - ETA < end)
    p_tok = tok_base + q_slot
    b_q = tl.load(q + ((p_tok[:, None] * H + i_h) * D + o_d[None, :]), mask=m_q[:, None] & m_d[None, :], other=0.)

    if MIX_LOLA:
        b_m = tl.zeros([BT], dtype=ACC)  # the running max starts at 0: c = max(0, max a)
    else:
        b_m = tl.full([BT], -1e30, dtype=ACC)
    b_l = tl.zeros([BT], dtype=ACC)
    b_acc = tl.zeros([BT, TVO], dtype=ACC)

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

    # linear read-out of the chunk's snapshot, in chunks of TK features
    lin_num = tl.zeros([BT, TVO], dtype=ACC)
    lin_den = tl.zeros([BT], dtype=ACC)
    p_hs = hs + (i_tg * H + i_h) * F * DV
    p_ss = ss + (i_tg * H + i_h) * F
    for k0 in range(0, F, TK):
        m_k = (k0 + o_k) < F
        b_fq = tl.load(fq + ((p_tok[:, None] * H + i_h) * F + k0 + o_k[None, :]), mask=m_q[:, None] & m_k[None, :],
                       other=0.).to(ACC)
        b_h = tl.load(p_hs + (k0 + o_k)[:, None] * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.)
        b_s = tl.load(p_ss + k0 + o_k, mask=m_k, other=0.)
        lin_num += tl.dot(b_fq, b_h.to(ACC), input_precision="ieee")
        lin_den += tl.sum(b_fq * b_s[None, :].to(ACC), 1)
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
    consts = dict(H=H, HKV=Hkv, D=D, DV=Dv, F=F, ETA=eta, LAM=lam, LAMP=lamp, EPS=EPS,
                  ACC=tl_acc(q.dtype))

    if N * H > 0:
        t = tiles(D, Dv, F, eta, lam)
        iscr, fscr = scratch(N * H, t, 0, acc, dev)
        # the memory after the last chunk: the final state's, or a temporary one
        h_fin = f['h'] if final is not None else torch.empty(N, H, F, Dv, dtype=acc, device=dev)
        s_fin = f['s'] if final is not None else torch.empty(N, H, F, dtype=acc, device=dev)
        lola_fwd_kernel_select[(N * H,)](
            k, v, fk,
            state.h, state.s, state.cache_k, state.cache_v, state.cache_fk, state.cache_pos,
            state.window_k, state.window_v, state.window_fk,
            seen, lengths, tok_base, chunk_offsets,
            hs, ss, cidx, iscr, fscr,
            h_fin, s_fin, f.get('cache_k'), f.get('cache_v'), f.get('cache_fk'), f.get('cache_pos'),
            f.get('window_k'), f.get('window_v'), f.get('window_fk'),
            LOO=(selection == 'loo'), **t, **consts,
        )
    if NT > 0:
        scale_t = torch.full((1,), scale, dtype=acc, device=dev)
        tvo = min(OUT_VTILE, block(Dv))
        lola_fwd_kernel_o[(NT, H, triton.cdiv(Dv, tvo))](
            q, k, v, fq, o,
            state.cache_k, state.cache_v, state.window_k, state.window_v,
            seen, lengths, tok_base, chunk_indices,
            hs, ss, cidx, gate, scale_t,
            BD=block(D), BT=block(eta), TK=min(OUT_KCHUNK, block(F)), TVO=tvo, MIX_LOLA=(mix == 'lola'), **consts,
        )
    if final is not None:
        final.seen = seen + lengths
    return final
