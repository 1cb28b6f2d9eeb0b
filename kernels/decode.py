"""The single-token LoLA step in Triton: one program per (row, query head) over the fixed-capacity state.

The program reads the state (λ cache slots, 2η window slots, ``H``, ``s``) and the new token, and

1. answers the token: one softmax over the valid cache slots, ``W``, ``P`` and the token itself, next to
   the linear read-out, under the spec's normalizer (running max clamped at 0 for ``mix="lola"``);
2. writes the next state out of place (the input state is never modified, so programs of a GQA group
   can read the shared key/value window while one of them writes its successor): the token goes into
   its ``P`` slot; at a chunk boundary ``G ∪ W`` is scored by self-recall error, the top λ are scattered
   to their canonical cache slots, the rest folded into ``H``, ``s`` with one ``tl.dot``, and ``P``
   moves to ``W``.

No allocation grows with T: the outputs are one token and one state of the same fixed size.
Rows whose ``attention_mask`` entry is 0 get a zero output and an unchanged state.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fla_lola.kernels.chunk import alloc_state_like, block, empty_state_like, tl_acc
from fla_lola.kernels.select import boundary_scores, rank_and_place
from fla_lola.ops.state import LoLAState, accumulation_dtype
from fla_lola.ops.utils import EPS


@triton.heuristics({'STORE_FINAL': lambda args: args['ht'] is not None})
@triton.jit
def lola_decode_kernel(
    q, k, v, fq, fk, o, active_ptr, gate, scale_ptr,
    h0, s0, ck, cv, cfk, cpos, wk, wv, wfk, seen_ptr,
    ht, st, ck_t, cv_t, cfk_t, cpos_t, wk_t, wv_t, wfk_t,
    H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    ETA: tl.constexpr, LAM: tl.constexpr,
    BD: tl.constexpr, BV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr, BL: tl.constexpr,
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

    o_d, o_v, o_f = tl.arange(0, BD), tl.arange(0, BV), tl.arange(0, BF)
    m_d, m_v, m_f = o_d < D, o_v < DV, o_f < F
    o_t, o_l = tl.arange(0, BT), tl.arange(0, BL)
    m_t = o_t < ETA

    # ---- the new token and the state -------------------------------------------------------
    b_q = tl.load(q + i_nh * D + o_d, mask=m_d, other=0.).to(ACC)
    b_fq = tl.load(fq + i_nh * F + o_f, mask=m_f, other=0.).to(ACC)
    b_kn = tl.load(k + i_ng * D + o_d, mask=m_d, other=0.)
    b_vn = tl.load(v + i_ng * DV + o_v, mask=m_v, other=0.)
    b_fn = tl.load(fk + i_nh * F + o_f, mask=m_f, other=0.)

    b_cp = tl.load(cpos + i_nh * LAM + o_l, mask=o_l < LAM, other=-1)
    valid_c = b_cp >= 0
    p_c = i_nh * LAM + o_l
    b_kc = tl.load(ck + p_c[:, None] * D + o_d[None, :], mask=valid_c[:, None] & m_d[None, :], other=0.)
    b_vc = tl.load(cv + p_c[:, None] * DV + o_v[None, :], mask=valid_c[:, None] & m_v[None, :], other=0.)
    b_fc = tl.load(cfk + p_c[:, None] * F + o_f[None, :], mask=valid_c[:, None] & m_f[None, :], other=0.)

    valid_w = o_t < w_end
    p_w = i_ng * (2 * ETA) + o_t
    p_wf = i_nh * (2 * ETA) + o_t
    b_kw = tl.load(wk + p_w[:, None] * D + o_d[None, :], mask=valid_w[:, None] & m_d[None, :], other=0.)
    b_vw = tl.load(wv + p_w[:, None] * DV + o_v[None, :], mask=valid_w[:, None] & m_v[None, :], other=0.)
    b_fw = tl.load(wfk + p_wf[:, None] * F + o_f[None, :], mask=valid_w[:, None] & m_f[None, :], other=0.)

    # P with the token written into its slot
    old_p = o_t < phase
    b_kp = tl.load(wk + (p_w + ETA)[:, None] * D + o_d[None, :], mask=old_p[:, None] & m_d[None, :], other=0.)
    b_vp = tl.load(wv + (p_w + ETA)[:, None] * DV + o_v[None, :], mask=old_p[:, None] & m_v[None, :], other=0.)
    b_fp = tl.load(wfk + (p_wf + ETA)[:, None] * F + o_f[None, :], mask=old_p[:, None] & m_f[None, :], other=0.)
    is_new = o_t == new_slot
    b_kp = tl.where(is_new[:, None], b_kn[None, :], b_kp)
    b_vp = tl.where(is_new[:, None], b_vn[None, :], b_vp)
    b_fp = tl.where(is_new[:, None], b_fn[None, :], b_fp)
    valid_p = old_p | is_new

    h_mask = m_f[:, None] & m_v[None, :]
    b_h = tl.load(h0 + (i_nh * F + o_f[:, None]) * DV + o_v[None, :], mask=h_mask, other=0.).to(ACC)
    b_s = tl.load(s0 + i_nh * F + o_f, mask=m_f, other=0.).to(ACC)

    # ---- 1. the output -------------------------------------------------------------------------
    a_c = tl.where(valid_c, tl.sum(b_q[None, :] * b_kc.to(ACC), 1) * scale, float('-inf'))
    a_w = tl.where(valid_w, tl.sum(b_q[None, :] * b_kw.to(ACC), 1) * scale, float('-inf'))
    a_p = tl.where(valid_p, tl.sum(b_q[None, :] * b_kp.to(ACC), 1) * scale, float('-inf'))
    b_m = tl.maximum(tl.maximum(tl.max(a_c, 0), tl.max(a_w, 0)), tl.max(a_p, 0))
    if MIX_LOLA:
        b_m = tl.maximum(b_m, 0.)
    else:
        b_m = tl.where(b_m > float('-inf'), b_m, 0.)   # only for a padding row of an empty state
    e_c, e_w, e_p = tl.exp(a_c - b_m), tl.exp(a_w - b_m), tl.exp(a_p - b_m)
    num = tl.sum(e_c[:, None] * b_vc.to(ACC), 0) + tl.sum(e_w[:, None] * b_vw.to(ACC), 0) + \
        tl.sum(e_p[:, None] * b_vp.to(ACC), 0)
    den = tl.sum(e_c, 0) + tl.sum(e_w, 0) + tl.sum(e_p, 0)
    lin_num = tl.sum(b_fq[:, None] * b_h, 0)
    lin_den = tl.sum(b_fq * b_s, 0)
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
        boundary = (active > 0) & (phase == ETA - 1)
        # without a boundary the cache stays as it is (valid slots first, so slot i stays slot i)
        keep_c = valid_c
        slot_c = o_l
        keep_w = o_t < 0
        slot_w = o_t
        if boundary & (seen >= ETA):
            b_vc32, b_fc32 = b_vc.to(ACC), b_fc.to(ACC)
            b_vw32, b_fw32 = b_vw.to(ACC), b_fw.to(ACC)
            score_c, score_w = boundary_scores(b_vc32, b_fc32, valid_c, b_vw32, b_fw32, valid_w, b_h, b_s, BL, BT,
                                               EPS, LOO)
            keep_c, slot_c, keep_w, slot_w = rank_and_place(score_c, valid_c, score_w, valid_w, LAM, BL, BT)
            b_fc32 = b_fc32 * (valid_c & ~keep_c).to(ACC)[:, None]
            b_fw32 = b_fw32 * (valid_w & ~keep_w).to(ACC)[:, None]
            b_h += tl.dot(tl.trans(b_fc32), b_vc32, input_precision="ieee")
            b_h += tl.dot(tl.trans(b_fw32), b_vw32, input_precision="ieee")
            b_s += tl.sum(b_fc32, 0) + tl.sum(b_fw32, 0)
        tl.store(ht + (i_nh * F + o_f[:, None]) * DV + o_v[None, :], b_h.to(ht.dtype.element_ty), mask=h_mask)
        tl.store(st + i_nh * F + o_f, b_s.to(st.dtype.element_ty), mask=m_f)

        # the cache: kept pairs scattered to their canonical slots, the remaining slots emptied
        n_keep = tl.sum(keep_c.to(tl.int32), 0) + tl.sum(keep_w.to(tl.int32), 0)
        q_c = i_nh * LAM + slot_c
        q_w = i_nh * LAM + slot_w
        tl.store(ck_t + q_c[:, None] * D + o_d[None, :], b_kc, mask=keep_c[:, None] & m_d[None, :])
        tl.store(cv_t + q_c[:, None] * DV + o_v[None, :], b_vc, mask=keep_c[:, None] & m_v[None, :])
        tl.store(cfk_t + q_c[:, None] * F + o_f[None, :], b_fc, mask=keep_c[:, None] & m_f[None, :])
        tl.store(cpos_t + q_c, b_cp, mask=keep_c)
        tl.store(ck_t + q_w[:, None] * D + o_d[None, :], b_kw, mask=keep_w[:, None] & m_d[None, :])
        tl.store(cv_t + q_w[:, None] * DV + o_v[None, :], b_vw, mask=keep_w[:, None] & m_v[None, :])
        tl.store(cfk_t + q_w[:, None] * F + o_f[None, :], b_fw, mask=keep_w[:, None] & m_f[None, :])
        tl.store(cpos_t + q_w, (seen // ETA - 1) * ETA + o_t, mask=keep_w)
        empty = (o_l >= n_keep) & (o_l < LAM)
        tl.store(ck_t + p_c[:, None] * D + o_d[None, :], tl.zeros([BL, BD], dtype=ck_t.dtype.element_ty),
                 mask=empty[:, None] & m_d[None, :])
        tl.store(cv_t + p_c[:, None] * DV + o_v[None, :], tl.zeros([BL, BV], dtype=cv_t.dtype.element_ty),
                 mask=empty[:, None] & m_v[None, :])
        tl.store(cfk_t + p_c[:, None] * F + o_f[None, :], tl.zeros([BL, BF], dtype=cfk_t.dtype.element_ty),
                 mask=empty[:, None] & m_f[None, :])
        tl.store(cpos_t + p_c, tl.full([BL], -1, dtype=tl.int64), mask=empty)

        # the window: at a boundary P (with the token) becomes W and P empties
        if boundary:
            b_kw, b_vw, b_fw = b_kp, b_vp, b_fp
            b_kp = tl.zeros([BT, BD], dtype=b_kp.dtype)
            b_vp = tl.zeros([BT, BV], dtype=b_vp.dtype)
            b_fp = tl.zeros([BT, BF], dtype=b_fp.dtype)
        tl.store(wfk_t + p_wf[:, None] * F + o_f[None, :], b_fw, mask=m_t[:, None] & m_f[None, :])
        tl.store(wfk_t + (p_wf + ETA)[:, None] * F + o_f[None, :], b_fp, mask=m_t[:, None] & m_f[None, :])
        if i_h % (H // HKV) == 0:  # one writer per key head
            tl.store(wk_t + p_w[:, None] * D + o_d[None, :], b_kw, mask=m_t[:, None] & m_d[None, :])
            tl.store(wv_t + p_w[:, None] * DV + o_v[None, :], b_vw, mask=m_t[:, None] & m_v[None, :])
            tl.store(wk_t + (p_w + ETA)[:, None] * D + o_d[None, :], b_kp, mask=m_t[:, None] & m_d[None, :])
            tl.store(wv_t + (p_w + ETA)[:, None] * DV + o_v[None, :], b_vp, mask=m_t[:, None] & m_v[None, :])


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
        lola_decode_kernel[(B * H,)](
            q, k, v, fq, fk, o, active, gate, torch.full((1,), scale, dtype=acc, device=dev),
            state.h, state.s, state.cache_k, state.cache_v, state.cache_fk, state.cache_pos,
            state.window_k, state.window_v, state.window_fk, state.seen,
            f.get('h'), f.get('s'), f.get('cache_k'), f.get('cache_v'), f.get('cache_fk'), f.get('cache_pos'),
            f.get('window_k'), f.get('window_v'), f.get('window_fk'),
            H=H, HKV=Hkv, D=D, DV=Dv, F=F, ETA=eta, LAM=lam, BD=block(D), BV=block(Dv), BF=block(F),
            BT=block(eta), BL=block(lam), EPS=EPS, MIX_LOLA=(mix == 'lola'), LOO=(selection == 'loo'),
            ACC=tl_acc(q.dtype), num_warps=4,
        )
    if final is not None:
        final.seen = state.seen + active.long()
    return o, final
