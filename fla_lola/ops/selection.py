"""The chunk-boundary update of LoLA, batched: score ``G ∪ W``, keep the top λ, fold the rest into H, s."""

from __future__ import annotations

import torch

from fla_lola.ops.utils import EPS, random_score


def selection_scores(
    selection: str,
    hs: torch.Tensor,
    v: torch.Tensor,
    fk: torch.Tensor,
    pos: torch.Tensor,
    head: torch.Tensor,
    total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores ``[M, C]`` of ``C`` candidates in ``M`` independent (row, head) memories; larger is kept.

    ``hs`` [M, F, Dv+1] is the memory ``[H | s]``, ``v`` [M, C, Dv], ``fk`` [M, C, F], ``pos`` [M, C],
    ``head`` [M]. Invalid candidates hold zeros. "sre" is the spec's self-recall error
    ``‖v − Hᵀφk / (sᵀφk + ε)‖``; "loo" the same against the memory plus every *other* candidate. For "loo" a
    caller that keeps the running total ``[Hₐ | sₐ]`` (memory plus every candidate, :func:`leave_one_out_recall`)
    passes it as ``total``, which makes the score cost no more than "sre"'s.
    """
    if selection in ('sre', 'loo'):
        fk, v = fk.to(hs.dtype), v.to(hs.dtype)
        if selection == 'loo':
            r = leave_one_out_recall(hs, fk, v, total)
        else:
            r = torch.bmm(fk, hs)                                               # φ_jᵀ[H | s]  [M, C, Dv+1]
        return torch.linalg.vector_norm(v - r[..., :-1] / (r[..., -1:] + EPS), dim=-1)
    if selection == 'recency':
        return pos.to(hs.dtype)
    if selection == 'value_norm':
        return torch.linalg.vector_norm(v.to(hs.dtype), dim=-1)
    return random_score(pos, head[:, None].expand_as(pos)).to(hs.dtype)


def leave_one_out_recall(hs: torch.Tensor, fk: torch.Tensor, v: torch.Tensor,
                         total: torch.Tensor | None = None) -> torch.Tensor:
    """``φ_jᵀ[H | s] + Σ_{c≠j} (φ_jᵀφ_c) [v_c | 1]`` for every candidate ``j``: ``[M, C, Dv+1]``.

    Two forms of the same sums (docs/SPEC.md, "Leave-one-out selection"):

    * with ``total`` = ``[Hₐ | sₐ]`` (the memory plus *every* candidate, which the chunked backend carries from
      boundary to boundary at the cost of adding the η new candidates): ``φ_jᵀ total − ‖φ_j‖² [v_j | 1]``, one
      product like "sre"'s. Subtracting candidate ``j``'s own term cancels when that term dominates, so a memory
      where some candidate's own term ``‖φ_j‖²`` exceeds the rest of its denominator ``φ_jᵀ(sₐ − φ_j)`` is
      recomputed in the direct form below. Elsewhere the subtraction keeps at least half of the total, so its
      rounding error is at most twice the direct form's.
    * without: through the candidates' Gram matrix with its diagonal zeroed, never by subtraction: features are
      non-negative, so the denominator is a sum of non-negative terms with no cancellation.
    """
    if total is None:
        gram = torch.bmm(fk, fk.transpose(1, 2))                               # [M, C, C]
        gram.diagonal(dim1=1, dim2=2).zero_()
        return torch.baddbmm(torch.cat([torch.bmm(gram, v), gram.sum(-1, keepdim=True)], -1), fk, hs)
    r = torch.bmm(fk, total.to(hs.dtype))                                      # φ_jᵀ[Hₐ | sₐ]
    own = torch.linalg.vector_norm(fk, dim=-1, keepdim=True).square_()         # ‖φ_j‖²  [M, C, 1]
    r[..., :-1].addcmul_(own, v, value=-1)
    r[..., -1:].sub_(own)
    cancels = (r[..., -1:] < own).flatten(1).any(1)                           # [M]
    if bool(cancels.any()):
        bad = cancels.nonzero().squeeze(1)
        r[bad] = leave_one_out_recall(hs[bad], fk[bad], v[bad])
    return r


def select_and_fold(selection: str, cache_size: int, hs: torch.Tensor, pairs: torch.Tensor, pos: torch.Tensor,
                    head: torch.Tensor, head_dim: int, total: torch.Tensor | None = None, sync_free: bool = False):
    """One boundary for ``M`` memories whose candidates ``G ∪ W`` are given in ascending position order.

    Args:
        hs: ``[M, F, Dv+1]`` the linear memory ``[H | s]`` before the boundary.
        pairs: ``[M, C, D + Dv + 1 + F]`` the candidates, each packed as ``[k | v | 1 | φk]`` (the ones column
            lets one product fold both ``H`` and ``s``); invalid candidates hold zeros.
        pos: ``[M, C]`` int64 positions, ``-1`` for an invalid candidate; valid ones ascend along ``C``.
        head: ``[M]`` int64 query-head index of each memory (for the "random" score).
        head_dim: ``D``, where the packed value starts.
        total: for "loo", optionally ``[M, F, Dv+1]`` the memory plus every candidate (see
            :func:`leave_one_out_recall`); ignored by the other scores.
        sync_free: never read a device value on the host (the CUDA decode step): the empty slots of the new cache
            are zeroed by a multiply whatever they hold instead of after checking whether there are any (``x · 1 ==
            x``: the same numbers).

    Returns:
        ``(hs, cache, cache_pos)``: the memory after folding and the new cache ``[M, λ, D + Dv + 1 + F]``
        in the canonical layout (valid slots first in ascending position, then empty slots).
    """
    D, Dv1 = head_dim, hs.shape[-1]
    if cache_size == 0:  # λ = 0 keeps nothing: every candidate is folded, in position order, and no score is needed
        pairs = pairs.to(hs.dtype)
        hs = torch.baddbmm(hs, pairs[..., D + Dv1:].transpose(1, 2), pairs[..., D:D + Dv1])
        return hs, pairs[:, :0], pos[:, :0]
    valid = pos >= 0
    C = pos.shape[1]  # λ cache slots + η window slots, so never fewer than λ
    with torch.no_grad():  # scores only order the candidates: no gradient flows through a choice
        scores = selection_scores(selection, hs, pairs[..., D:D + Dv1 - 1], pairs[..., D + Dv1:], pos, head, total)
    scores = scores.masked_fill(~valid, float('-inf'))
    # a stable sort on the negated score: largest first, and among equal scores the earlier position
    # (candidates ascend in position), exactly the spec's tie rule
    order = torch.sort(-scores, dim=1, stable=True).indices
    top, rest = order[:, :cache_size], order[:, cache_size:]
    # fold what is not kept: the other C - λ candidates (invalid ones hold zeros and add nothing)
    folded = take_rows(pairs, rest).to(hs.dtype)
    hs = torch.baddbmm(hs, folded[..., D + Dv1:].transpose(1, 2), folded[..., D:D + Dv1])
    # canonical cache: kept pairs in ascending position, then the empty slots
    top_valid = valid.gather(1, top)
    top = top.gather(1, torch.where(top_valid, top, top + C).argsort(dim=1))
    top_valid = valid.gather(1, top)
    cache = take_rows(pairs, top)
    if sync_free or not bool(top_valid.all()):  # fewer than λ candidates: the empty slots hold zeros
        cache = cache * top_valid.unsqueeze(-1).to(cache.dtype)
    return hs, cache, torch.where(top_valid, pos.gather(1, top), torch.full_like(top, -1))


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[m, index[m, j]]`` for ``x`` [M, C, E] and ``index`` [M, J]: whole rows, copied as rows (``gather`` would
    index every element, several times slower on CPU)."""
    M, C, E = x.shape
    flat = (index + torch.arange(M, device=index.device)[:, None] * C).reshape(-1)
    return x.reshape(M * C, E).index_select(0, flat).view(M, index.shape[1], E)
