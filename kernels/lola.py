"""``triton_lola_attention``: the entry point of the Triton backend (prefill kernel or single-token step)."""

from __future__ import annotations

import torch
from fla.utils import input_guard

from fla_lola.kernels.chunk import chunk_lola_fwd
from fla_lola.kernels.decode import decode_lola_fwd
from fla_lola.ops.state import LoLAState


@torch.compiler.disable
@input_guard
def triton_lola_attention(
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
    mix: str = 'lola',
    selection: str = 'sre',
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    initial_state: LoLAState | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, LoLAState | None]:
    r"""LoLA attention in Triton, for inputs already checked by :func:`fla_lola.lola_attention`.

    Args:
        q (torch.Tensor): queries ``[B, T, H, D]``.
        k (torch.Tensor): keys ``[B, T, Hkv, D]`` (GQA: query head ``h`` reads key head ``h // (H / Hkv)``).
        v (torch.Tensor): values ``[B, T, Hkv, Dv]``.
        fq (torch.Tensor): query features ``[B, T, H, F]``.
        fk (torch.Tensor): key features ``[B, T, H, F]``.
        gate (torch.Tensor): mixing weights ``γ`` ``[H]``.
        window_size (int): η, the window and chunk size.
        cache_size (int): λ, the sparse-cache capacity.
        scale (float): softmax scale.
        mix (str): ``"lola"`` or ``"lolcats"``.
        selection (str): ``"sre"`` (self-recall error) or ``"loo"`` (its leave-one-out form); the ablation
            scores live in "torch".
        attention_mask (Optional[torch.Tensor]): ``[B, T]`` 0/1, left or right padding.
        cu_seqlens (Optional[torch.Tensor]): ``[N+1]`` packed sequences (``B == 1``).
        initial_state (Optional[LoLAState]): one row per batch row / packed sequence, at any phase.
        output_final_state (bool): also return the state after this call (canonical layout).

    Returns:
        ``(o, state)``: ``o`` ``[B, T, H, Dv]`` in the dtype of ``q`` (zero at padding) and the final
        :class:`LoLAState` or ``None``.

    ``T == 1`` without ``cu_seqlens`` takes the single-token step kernel; everything else the chunked
    prefill. Both produce the same canonical state, so calls can alternate freely with each other and
    with the "torch" and "naive" backends.
    """
    if selection not in ('sre', 'loo'):
        raise ValueError(f"`selection`: the triton backend implements 'sre' and 'loo' only, got {selection!r}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, fq, fk, gate)):
        raise ValueError("the triton backend is inference-only; inputs require grad (use backend='torch' "
                         "or torch.no_grad())")
    kwargs = dict(window_size=window_size, cache_size=cache_size, scale=float(scale), mix=mix, selection=selection,
                  attention_mask=attention_mask, initial_state=initial_state,
                  output_final_state=output_final_state)
    with torch.no_grad():
        if q.shape[1] == 1 and cu_seqlens is None:
            return decode_lola_fwd(q, k, v, fq, fk, gate, **kwargs)
        return chunk_lola_fwd(q, k, v, fq, fk, gate, cu_seqlens=cu_seqlens, **kwargs)
