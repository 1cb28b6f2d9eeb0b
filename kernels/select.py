"""Triton building blocks of the LoLA chunk boundary: self-recall error (plain or leave-one-out), top-λ with ties to the earlier
position, and the canonical placement of the kept pairs.

The candidates of a boundary are ``G ∪ W``, held in two register blocks: the cache block (``BL`` rows,
the valid pairs of ``G`` first, in ascending position) and the window block (``BT`` rows, the η pairs of
the previous chunk ``W``, in ascending position). Every position of ``W`` is later than every position of
``G``, so "cache block before window block, then row order" *is* position order, and the kernels never
need the positions themselves to break ties.
"""

import triton
import triton.language as tl


@triton.jit
def sre_score(b_v, b_f, b_h, b_s, valid, EPS: tl.constexpr):
    """``‖v − Hᵀφk / (sᵀφk + ε)‖₂`` per row; ``-inf`` where ``valid`` is false.

    b_v: [BC, BV] values, b_f: [BC, BF] key features, b_h: [BF, BV], b_s: [BF], all in the accumulation
    dtype; padded columns hold zeros so they add nothing to the norm. The recall product is IEEE float32
    (never TF32): a score that loses the low mantissa bits reorders near-tied candidates.
    """
    recall = tl.dot(b_f, b_h, input_precision="ieee")                     # [BC, BV]
    z = tl.sum(b_f * b_s[None, :], 1) + EPS                              # [BC]
    err = b_v - recall / z[:, None]
    score = tl.sqrt(tl.sum(err * err, 1))
    return tl.where(valid, score, float('-inf'))


@triton.jit
def boundary_scores(b_vc, b_fc, valid_c, b_vw, b_fw, valid_w, b_h, b_s, BL: tl.constexpr, BT: tl.constexpr,
                    EPS: tl.constexpr, LOO: tl.constexpr):
    """Scores of the cache block and the window block: self-recall error, or with ``LOO`` its leave-one-out
    form, each candidate read against ``H + Σ_{c≠j} φ_c v_cᵀ`` (and ``s + Σ_{c≠j} φ_c``).

    The leave-one-out sums are formed through the Gram matrix of the candidates' features with its
    diagonal zeroed (as the torch backend does), never by subtracting ``φ_j`` from a total: the features
    are non-negative, so the denominator has no cancellation. Invalid rows hold zero features and add
    nothing. Every product is IEEE float32, as for the self-recall error. Returns ``score_c, score_w``
    (``-inf`` where invalid).
    """
    if LOO:
        o_c = tl.arange(0, BL)
        o_w = tl.arange(0, BT)
        g_cc = tl.dot(b_fc, tl.trans(b_fc), input_precision="ieee")              # [BL, BL]
        g_cc = tl.where(o_c[:, None] == o_c[None, :], 0., g_cc)
        g_cw = tl.dot(b_fc, tl.trans(b_fw), input_precision="ieee")              # [BL, BT]
        g_wc = tl.dot(b_fw, tl.trans(b_fc), input_precision="ieee")              # [BT, BL]
        g_ww = tl.dot(b_fw, tl.trans(b_fw), input_precision="ieee")              # [BT, BT]
        g_ww = tl.where(o_w[:, None] == o_w[None, :], 0., g_ww)
        r_c = tl.dot(b_fc, b_h, input_precision="ieee") + tl.dot(g_cc, b_vc, input_precision="ieee") + \
            tl.dot(g_cw, b_vw, input_precision="ieee")
        r_w = tl.dot(b_fw, b_h, input_precision="ieee") + tl.dot(g_wc, b_vc, input_precision="ieee") + \
            tl.dot(g_ww, b_vw, input_precision="ieee")
        z_c = tl.sum(b_fc * b_s[None, :], 1) + tl.sum(g_cc, 1) + tl.sum(g_cw, 1) + EPS
        z_w = tl.sum(b_fw * b_s[None, :], 1) + tl.sum(g_wc, 1) + tl.sum(g_ww, 1) + EPS
        err_c = b_vc - r_c / z_c[:, None]
        err_w = b_vw - r_w / z_w[:, None]
        score_c = tl.where(valid_c, tl.sqrt(tl.sum(err_c * err_c, 1)), float('-inf'))
        score_w = tl.where(valid_w, tl.sqrt(tl.sum(err_w * err_w, 1)), float('-inf'))
    else:
        score_c = sre_score(b_vc, b_fc, b_h, b_s, valid_c, EPS)
        score_w = sre_score(b_vw, b_fw, b_h, b_s, valid_w, EPS)
    return score_c, score_w


@triton.jit
def rank_and_place(score_c, valid_c, score_w, valid_w, LAM: tl.constexpr, BL: tl.constexpr, BT: tl.constexpr):
    """Top-``LAM`` of the candidates by score, ties to the earlier position.

    The rank of a candidate is the number of valid candidates that beat it: a larger score, or the same
    score at an earlier position. Kept = valid and rank < LAM. Each kept candidate's new cache slot is the
    number of kept candidates before it in position order, which is the canonical layout (kept pairs
    first, ascending position). O((λ+η)²) comparisons, once per chunk per (row, head).

    Returns ``keep_c, slot_c, keep_w, slot_w`` (slots are meaningful where kept).
    """
    o_c = tl.arange(0, BL)
    o_w = tl.arange(0, BT)
    # beats[i, j]: candidate j ranks before candidate i
    cc = valid_c[None, :] & ((score_c[None, :] > score_c[:, None]) |
                             ((score_c[None, :] == score_c[:, None]) & (o_c[None, :] < o_c[:, None])))
    cw = valid_w[None, :] & (score_w[None, :] > score_c[:, None])      # window pairs are later than cache pairs
    wc = valid_c[None, :] & (score_c[None, :] >= score_w[:, None])     # cache pairs are earlier than window pairs
    ww = valid_w[None, :] & ((score_w[None, :] > score_w[:, None]) |
                             ((score_w[None, :] == score_w[:, None]) & (o_w[None, :] < o_w[:, None])))
    rank_c = tl.sum(cc.to(tl.int32), 1) + tl.sum(cw.to(tl.int32), 1)
    rank_w = tl.sum(wc.to(tl.int32), 1) + tl.sum(ww.to(tl.int32), 1)
    keep_c = valid_c & (rank_c < LAM)
    keep_w = valid_w & (rank_w < LAM)
    n_keep_c = tl.sum(keep_c.to(tl.int32), 0)
    slot_c = tl.cumsum(keep_c.to(tl.int32), 0) - 1
    slot_w = n_keep_c + tl.cumsum(keep_w.to(tl.int32), 0) - 1
    return keep_c, slot_c, keep_w, slot_w


@triton.jit
def place(ref_c, keep_c, slot_c, ref_w, keep_w, slot_w, BL: tl.constexpr):
    """The new cache as a [BL] block of references: slot j holds the reference of the kept candidate whose
    new slot is j, and -1 where no candidate lands (a register "scatter" done as a masked reduction)."""
    o_l = tl.arange(0, BL)
    from_c = tl.where(keep_c[:, None] & (slot_c[:, None] == o_l[None, :]), ref_c[:, None] + 1, 0)
    from_w = tl.where(keep_w[:, None] & (slot_w[:, None] == o_l[None, :]), ref_w[:, None] + 1, 0)
    return tl.sum(from_c, 0) + tl.sum(from_w, 0) - 1
