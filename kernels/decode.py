"""The single-token LoLA step in Triton: one program per (row, query head) over the fixed-capacity state.

The program reads the state (λ cache slots, 2η window slots, ``H``, ``s``) and the new token, and

1. answers the token: one softmax over the valid cache slots, ``W``, ``P`` and the token itself (rows in
   blocks: the largest logit first, then the sums against it), next to the linear read-out, under the spec's
   normalizer (maximum clamped at 0 for ``mix="lola"``);
2. writes the next state out of place (the input state is never modified, so programs of a GQA group
   can read the shared key/value window while one of them writes its successor): the token goes into
   its ``P`` slot; at a chunk boundary ``G ∪ W`` is scored by self-recall error, the top λ kept and the rest
   folded into ``H``, ``s`` by the prefill's own boundary (:func:`fla_lola.kernels.select.boundary`, reading
   the state's memory and writing the next state's, in tiles), the kept pairs are copied to their canonical
   cache slots, and ``P`` moves to ``W``.

No allocation grows with T: the outputs are one token and one state of the same fixed size.
Rows whose ``attention_mask`` entry is 0 get a zero output and an unchanged state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_lola.kernels.chunk import alloc_state_like, block, empty_state_like, scratch, tiles, tl_acc
from fla_lola.kernels.select import boundary, copy_memory, store_cache
from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS


@triton.jit
def state_rows(x, xc, xw, xn, part: tl.constexpr, r0, cols, i_nh, i_ng, cpos, phase, new_slot, w_end,
               DX: tl.constexpr, LAM: tl.constexpr, ETA: tl.constexpr, BR: tl.constexpr):
    """Rows ``r0 .. r0 + BR`` (columns ``cols``) of one part of what the token attends to, and which are real:
    ``part`` 0 the cache (``xc``, per query head), 1 the window ``W``, 2 the partial chunk ``P`` with the token
    ``xn`` written into its slot (``xw``: the state's window; ``x``, for keys and values, per key head)."""
    o_r = r0 + tl.arange(0, BR)
    m_x = cols < DX
    if part == 0:
        valid = tl.load(cpos + i_nh * LAM + o_r, mask=o_r < LAM, other=-1) >= 0
        b = tl.load(xc + (i_nh * LAM + o_r)[:, None] * DX + cols[None, :], mask=valid[:, None] & m_x[None, :],
                    other=0.)
    elif part == 1:
        valid = o_r < w_end
        b = tl.load(xw + (i_ng * (2 * ETA) + o_r)[:, None] * DX + cols[None, :], mask=valid[:, None] & m_x[None, :],
                    other=0.)
    else:
        old_p = o_r < phase
        is_new = o_r == new_slot
        valid = old_p | is_new
        b = tl.load(xw + (i_ng * (2 * ETA) + ETA + o_r)[:, None] * DX + cols[None, :],
                    mask=old_p[:, None] & m_x[None, :], other=0.)
        b_n = tl.load(x + i_ng * DX + cols, mask=m_x, other=0.)
        b = tl.where(is_new[:, None], b_n[None, :], b)
    return b, valid


@triton.jit
def shift_window(x, xc, xw, dst, t0, moved, i_nh, i_ng, cpos, phase, new_slot, w_end,
                 DX: tl.constexpr, LAM: tl.constexpr, ETA: tl.constexpr, BR: tl.constexpr, TD: tl.constexpr):
    """Window rows ``t0 .. t0 + BR`` of one field into ``dst`` (the new state's ``[·, 2η, DX]`` window of head
    ``i_ng``): ``W ← P`` and ``P`` emptied where ``moved`` (at a boundary), else ``W`` and ``P`` with the token in
    ``P``; ``TD`` columns at a time."""
    o_t = t0 + tl.arange(0, BR)
    m_t = o_t < ETA
    for c0 in range(0, DX, TD):
        o_x = c0 + tl.arange(0, TD)
        b_w, _ = state_rows(x, xc, xw, x, 1, t0, o_x, i_nh, i_ng, cpos, phase, new_slot, w_end, DX, LAM, ETA, BR)
        b_p, _ = state_rows(x, xc, xw, x, 2, t0, o_x, i_nh, i_ng, cpos, phase, new_slot, w_end, DX, LAM, ETA, BR)
        m_s = m_t[:, None] & (o_x < DX)[None, :]
        p_w = (i_ng * (2 * ETA) + o_t)[:, None] * DX + o_x[None, :]
        tl.store(dst + p_w, tl.where(moved[:, None], b_p, b_w), mask=m_s)
        tl.store(dst + p_w + ETA * DX, tl.where(moved[:, None], 0., b_p), mask=m_s)


@triton.heuristics({'STORE_FINAL': lambda args: args['cpos_t'] is not None})
@triton.jit
def lola_decode_kernel(
    q, k, v, fq, fk, o, active_ptr, gate, scale_ptr,
    h0, s0, ck, cv, cfk, cpos, wk, wv, wfk, seen_ptr,
    iscr, fscr,
    ht, st, ck_t, cv_t, cfk_t, cpos_t, wk_t, wv_t, wfk_t,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    ETA: tl.constexpr, LAM: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr, BR: tl.constexpr, BJ: tl.constexpr,
    TD: tl.constexpr, TK: tl.constexpr, TV: tl.constexpr,
    EPS: tl.constexpr, MIX_LOLA: tl.constexpr, ACC: tl.constexpr, LOO: tl.constexpr,
    STORE_FINAL: tl.constexpr,
):
    i_nh = tl.program_id(0).to(tl.int64)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // HKV)
    i_ng = i_n * HKV + i_g
    active = tl.load(active_ptr + i_n).to(tl.int32)   # 1: the row takes the token, 0: padding
    seen = tl.load(seen_ptr + i_n)
    phase = seen % ETA
    scale = tl.load(scale_ptr)
    # scalar conditions enter blocks as bounds (`o < bound`), not as `block & scalar_bool`
    w_end = tl.where(seen >= ETA, ETA, 0)              # W slots [0, w_end) are valid
    new_slot = tl.where(active > 0, phase, -1)         # the token's P slot, -1 if it takes none

    o_d, o_v, o_k, o_r = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, TK), tl.arange(0, BR)
    m_d, m_v = o_d < D, o_v < DV

    # ---- 1. the output: one softmax over the cache, W and P (with the token), next to the linear read-out ----
    b_q = tl.load(q + i_nh * D + o_d, mask=m_d, other=0.).to(ACC)
    # the largest logit first, then the sums (every exponent against the same maximum)
    b_m = tl.full([], float('-inf'), dtype=ACC)
    for part in tl.static_range(3):
        for r0 in range(0, BL if part == 0 else BT, BR):
            b_k, valid = state_rows(k, ck, wk, k, part, r0, o_d, i_nh, i_ng, cpos, phase, new_slot, w_end,
                                    D, LAM, ETA, BR)
            a = tl.where(valid, tl.sum(b_q[None, :] * b_k.to(ACC), 1) * scale, float('-inf'))
            b_m = tl.maximum(b_m, tl.max(a, 0))
    if MIX_LOLA:
        b_m = tl.maximum(b_m, 0.)
    else:
        b_m = tl.where(b_m > float('-inf'), b_m, 0.)   # only for a padding row of an empty state
    num = tl.zeros([BV], dtype=ACC)
    den = tl.zeros([], dtype=ACC)
    for part in tl.static_range(3):
        for r0 in range(0, BL if part == 0 else BT, BR):
            b_k, valid = state_rows(k, ck, wk, k, part, r0, o_d, i_nh, i_ng, cpos, phase, new_slot, w_end,
                                    D, LAM, ETA, BR)
            a = tl.where(valid, tl.sum(b_q[None, :] * b_k.to(ACC), 1) * scale, float('-inf'))
            b_v, _ = state_rows(v, cv, wv, v, part, r0, o_v, i_nh, i_ng, cpos, phase, new_slot, w_end,
                                DV, LAM, ETA, BR)
            e = tl.exp(a - b_m)
            num += tl.sum(e[:, None] * b_v.to(ACC), 0)
            den += tl.sum(e, 0)
    lin_num = tl.zeros([BV], dtype=ACC)
    lin_den = tl.zeros([], dtype=ACC)
    for k0 in range(0, F, TK):
        m_k = (k0 + o_k) < F
        b_fq = tl.load(fq + i_nh * F + k0 + o_k, mask=m_k, other=0.).to(ACC)
        b_h = tl.load(h0 + (i_nh * F + k0 + o_k)[:, None] * DV + o_v[None, :], mask=m_k[:, None] & m_v[None, :],
                      other=0.).to(ACC)
        b_s = tl.load(s0 + i_nh * F + k0 + o_k, mask=m_k, other=0.).to(ACC)
        lin_num += tl.sum(b_fq[:, None] * b_h, 0)
        lin_den += tl.sum(b_fq * b_s, 0)
    gamma = tl.load(gate + i_h).to(ACC)
    if MIX_LOLA:
        e = tl.exp(-b_m)
        num = gamma * num + (1 - gamma) * e * lin_num
        den = gamma * den + (1 - gamma) * e * lin_den + EPS * e
    else:
        num = gamma * num + lin_num
        den = gamma * den + lin_den
    b_o = num / tl.where(active > 0, den, 1.)  # (a padding row of an empty state would divide 0 by 0)
    b_o = tl.where(o_v < DV * active, b_o, 0.)
    tl.store(o + i_nh * DV + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

    # ---- 2. the next state ---------------------------------------------------------------------
    if STORE_FINAL:
        boundary_now = (active > 0) & (phase == ETA - 1)
        o_l = tl.arange(0, BL)
        # this program's scratch: the current and the new reference lists, fold flags, scores, Gram rows
        refp = iscr + i_nh * (3 * BL + BT)
        newrefp = refp + BL
        flagp = newrefp + BL
        scp = fscr + i_nh * ((BL + BT) * (1 + BR))
        b_cp = tl.load(cpos + i_nh * LAM + o_l, mask=o_l < LAM, other=-1)
        b_ref = tl.where(b_cp >= 0, o_l, -1).to(tl.int32)   # valid cache slots come first
        tl.store(refp + o_l, b_ref)
        tl.debug_barrier()
        if boundary_now & (seen >= ETA):
            # G ∪ W scored against the memory, the top λ kept, the rest folded into (ht, st); the token's grid
            # (no input slot is a candidate) is the state's: W is slots [0, η) of the state's window
            boundary(v, fk, wv, wfk, cv, cfk, refp, newrefp, flagp, scp,
                     h0 + i_nh * F * DV, s0 + i_nh * F, ht + i_nh * F * DV, st + i_nh * F,
                     0, i_n, i_h, i_g, 0, phase, H, HKV, DV, F, LAM, ETA, BL, BT, BR, BJ, TK, TV, EPS, ACC, LOO)
        else:
            # without a boundary the memory and the cache stay as they are
            copy_memory(h0 + i_nh * F * DV, s0 + i_nh * F, ht + i_nh * F * DV, st + i_nh * F, DV, F, TK, TV)
            tl.store(newrefp + o_l, b_ref)
            tl.debug_barrier()

        # the cache: slot j holds reference newref[j] (a state cache slot, or λ + a W slot), empty slots zero
        store_cache(k, v, fk, wk, wv, wfk, ck, cv, cfk, cpos, ck_t, cv_t, cfk_t, cpos_t, newrefp,
                    i_nh, i_n, i_h, i_g, 0, phase, seen, H, HKV, D, DV, F, LAM, ETA, BL, BR, TD)

        # the window: at a boundary P (with the token) becomes W and P empties
        shift = tl.where(boundary_now, ETA, 0)
        for t0 in range(0, BT, BR):
            o_t = t0 + o_r
            moved = o_t < shift                                # every row at a boundary, none otherwise
            shift_window(fk, cfk, wfk, wfk_t, t0, moved, i_nh, i_nh, cpos, phase, new_slot, w_end,
                         F, LAM, ETA, BR, TD)
            if i_h % (H // HKV) == 0:  # one writer per key head
                shift_window(k, ck, wk, wk_t, t0, moved, i_nh, i_ng, cpos, phase, new_slot, w_end,
                             D, LAM, ETA, BR, TD)
                shift_window(v, cv, wv, wv_t, t0, moved, i_nh, i_ng, cpos, phase, new_slot, w_end,
                             DV, LAM, ETA, BR, TD)


def decode_lola_fwd(
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
    initial_state: LoLAState | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, LoLAState | None]:
    """``T == 1``: one token per batch row; shapes as in :func:`fla_lola.lola_attention`, tensors contiguous."""
    B, T, H, D = q.shape
    assert T == 1, T
    Hkv, Dv, F = k.shape[2], v.shape[3], fq.shape[3]
    eta, lam = window_size, cache_size
    dev = q.device
    acc = accumulation_dtype(q.dtype)
    state = initial_state if initial_state is not None else empty_state_like(q, k, v, fq, B, eta, lam)
    state = LoLAState(**{name: x.contiguous() for name, x in vars(state).items()})
    active = torch.ones(B, dtype=torch.int32, device=dev) if attention_mask is None else \
        (attention_mask[:, 0] != 0).to(torch.int32)
    o = torch.empty(B, 1, H, Dv, dtype=q.dtype, device=dev)
    final = alloc_state_like(state) if output_final_state else None
    f = vars(final) if final is not None else {}
    if B * H > 0:
        t = tiles(D, Dv, F, eta, lam)
        iscr, fscr = scratch(B * H, t, 1, acc, dev)
        lola_decode_kernel[(B * H,)](
            q, k, v, fq, fk, o, active, gate, torch.full((1,), scale, dtype=acc, device=dev),
            state.h, state.s, state.cache_k, state.cache_v, state.cache_fk, state.cache_pos,
            state.window_k, state.window_v, state.window_fk, state.seen,
            iscr, fscr,
            f.get('h'), f.get('s'), f.get('cache_k'), f.get('cache_v'), f.get('cache_fk'), f.get('cache_pos'),
            f.get('window_k'), f.get('window_v'), f.get('window_fk'),
            H=H, HKV=Hkv, D=D, DV=Dv, F=F, ETA=eta, LAM=lam, BD=block(D), BV=block(Dv), **t,
            EPS=EPS, MIX_LOLA=(mix == 'lola'), LOO=(selection == 'loo'), ACC=tl_acc(q.dtype), num_warps=4,
            num_stages=1,
        )
    if final is not None:
        final.seen = state.seen + active.long()
    return o, final
