"""The chunk-boundary update of LoLA, batched: score ``G ∪ W``, keep the top λ, fold the rest into H, s."""

from __future__ import annotations

import torch

from fla_lola.ops.utils import EPS, random_score


def selection_scores(
    selection: str,
    h: torch.Tensor,
    s: torch.Tensor,
    v: torch.Tensor,
    fk: torch.Tensor,
    pos: torch.Tensor,
    head: torch.Tensor,
) -> torch.Tensor:
    """Scores ``[M, C]`` of ``C`` candidates in ``M`` independent (row, head) memories; larger is kept.

    ``h`` [M, F, Dv], ``s`` [M, F], ``v`` [M, C, Dv], ``fk`` [M, C, F], ``pos`` [M, C], ``head`` [M].
    "sre" is the spec's self-recall error ``‖v − Hᵀφk / (sᵀφk + ε)‖``.
    """
    if selection == 'sre':
        fk = fk.to(h.dtype)
        recall = torch.bmm(fk, h) / (torch.bmm(fk, s.unsqueeze(-1)) + EPS)
        return torch.linalg.vector_norm(v.to(h.dtype) - recall, dim=-1)
    if selection == 'recency':
        return pos.to(h.dtype)
    if selection == 'value_norm':
        return torch.linalg.vector_norm(v.to(h.dtype), dim=-1)
    return random_score(pos, head[:, None].expand_as(pos)).to(h.dtype)


def select_and_fold(
    selection: str,
    cache_size: int,
    h: torch.Tensor,
    s: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fk: torch.Tensor,
    pos: torch.Tensor,
    head: torch.Tensor,
):
    """One boundary for ``M`` memories whose candidates ``G ∪ W`` are given in ascending position order.

    Args:
        h, s: ``[M, F, Dv]``, ``[M, F]`` the linear memory before the boundary.
        k, v, fk: ``[M, C, D]``, ``[M, C, Dv]``, ``[M, C, F]`` the candidates (invalid ones hold zeros).
        pos: ``[M, C]`` int64 positions, ``-1`` for an invalid candidate; valid ones ascend along ``C``.
        head: ``[M]`` int64 query-head index of each memory (for the "random" score).

    Returns:
        ``(h, s, cache_k, cache_v, cache_fk, cache_pos)``: the memory after folding and the new cache in
        the canonical layout (valid slots first in ascending position, then empty slots).
    """
    valid = pos >= 0
    C = pos.shape[1]  # λ cache slots + η window slots, so never fewer than λ
    scores = selection_scores(selection, h, s, v, fk, pos, head)
    scores = scores.masked_fill(~valid, float('-inf'))
    # a stable sort on the negated score: largest first, and among equal scores the earlier position
    # (candidates ascend in position), exactly the spec's tie rule
    order = torch.sort(-scores, dim=1, stable=True).indices
    top = order[:, :cache_size]
    keep = torch.zeros_like(valid).scatter_(1, top, True) & valid
    fold = (valid & ~keep).to(h.dtype)
    fk_fold = fk.to(h.dtype) * fold.unsqueeze(-1)
    h_new = h + torch.bmm(fk_fold.transpose(1, 2), v.to(h.dtype))
    s_new = s + fk_fold.sum(1)
    # canonical cache: kept pairs in ascending position, then the empty slots
    top_valid = valid.gather(1, top)
    top = top.gather(1, torch.where(top_valid, top, top + C).argsort(dim=1))
    top_valid = valid.gather(1, top)

    def take(x):
        out = x.gather(1, top.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return out * top_valid.unsqueeze(-1).to(out.dtype)

    new_k, new_v, new_fk = take(k), take(v), take(fk)
    new_pos = torch.where(top_valid, pos.gather(1, top), torch.full_like(top, -1))
    return h_new, s_new, new_k, new_v, new_fk, new_pos
