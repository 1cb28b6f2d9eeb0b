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
) -> torch.Tensor:
    """Scores ``[M, C]`` of ``C`` candidates in ``M`` independent (row, head) memories; larger is kept.

    ``hs`` [M, F, Dv+1] is the memory ``[H | s]``, ``v`` [M, C, Dv], ``fk`` [M, C, F], ``pos`` [M, C],
    ``head`` [M]. "sre" is the spec's self-recall error ``‖v − Hᵀφk / (sᵀφk + ε)‖``.
    """
    if selection == 'sre':
        r = torch.bmm(fk.to(hs.dtype), hs)
        return torch.linalg.vector_norm(v.to(hs.dtype) - r[..., :-1] / (r[..., -1:] + EPS), dim=-1)
    if selection == 'recency':
        return pos.to(hs.dtype)
    if selection == 'value_norm':
        return torch.linalg.vector_norm(v.to(hs.dtype), dim=-1)
    return random_score(pos, head[:, None].expand_as(pos)).to(hs.dtype)


def select_and_fold(
    selection: str,
    cache_size: int,
    hs: torch.Tensor,
    k: torch.Tensor,
    v1: torch.Tensor,
    fk: torch.Tensor,
    pos: torch.Tensor,
    head: torch.Tensor,
):
    """One boundary for ``M`` memories whose candidates ``G ∪ W`` are given in ascending position order.

    Args:
        hs: ``[M, F, Dv+1]`` the linear memory ``[H | s]`` before the boundary.
        k, v1, fk: ``[M, C, D]``, ``[M, C, Dv+1]``, ``[M, C, F]`` the candidates; ``v1`` is ``[v | 1]``
            so that one product folds both ``H`` and ``s``. Invalid candidates hold zeros.
        pos: ``[M, C]`` int64 positions, ``-1`` for an invalid candidate; valid ones ascend along ``C``.
        head: ``[M]`` int64 query-head index of each memory (for the "random" score).

    Returns:
        ``(hs, cache_k, cache_v1, cache_fk, cache_pos)``: the memory after folding and the new cache in
        the canonical layout (valid slots first in ascending position, then empty slots).
    """
    valid = pos >= 0
    C = pos.shape[1]  # λ cache slots + η window slots, so never fewer than λ
    scores = selection_scores(selection, hs, v1[..., :-1], fk, pos, head)
    scores = scores.masked_fill(~valid, float('-inf'))
    # a stable sort on the negated score: largest first, and among equal scores the earlier position
    # (candidates ascend in position), exactly the spec's tie rule
    order = torch.sort(-scores, dim=1, stable=True).indices
    top = order[:, :cache_size]
    keep = torch.zeros_like(valid).scatter_(1, top, True) & valid
    fold = (valid & ~keep).to(hs.dtype)
    hs = torch.baddbmm(hs, (fk.to(hs.dtype) * fold.unsqueeze(-1)).transpose(1, 2), v1.to(hs.dtype))
    # canonical cache: kept pairs in ascending position, then the empty slots
    top_valid = valid.gather(1, top)
    top = top.gather(1, torch.where(top_valid, top, top + C).argsort(dim=1))
    top_valid = valid.gather(1, top)

    def take(x):
        out = x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return out * top_valid.unsqueeze(-1).to(out.dtype)

    new_pos = torch.where(top_valid, pos.gather(1, top), torch.full_like(top, -1))
    return hs, take(k), take(v1), take(fk), new_pos
