"""``lola_attention``: the public entry point, checking inputs and choosing a backend."""

from __future__ import annotations

import os
from dataclasses import fields

import torch

from fla_lola.ops.chunk import chunk_lola_attention
from fla_lola.ops.decode import decode_lola_attention
from fla_lola.ops.naive import naive_lola_attention
from fla_lola.ops.state import LoLAState
from fla_lola.ops.utils import BACKENDS, check_inputs

TRITON_SELECTIONS = ('sre', 'loo')  # the scores the Triton kernels implement; the ablation scores run in torch


@torch.compiler.disable
def lola_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
    *,
    window_size: int,
    cache_size: int,
    scale: float | None = None,
    mix: str = 'lola',
    selection: str = 'sre',
    attention_mask: torch.Tensor | None = None,
    cu_seqlens: torch.LongTensor | None = None,
    initial_state: LoLAState | None = None,
    output_final_state: bool = False,
    backend: str = 'auto',
    validate: bool = True,
    inplace_state: bool = False,
) -> tuple[torch.Tensor, LoLAState | None]:
    r"""LoLA attention: sliding window + sparse cache (exact softmax) + linear memory, one normalizer.

    Computes exactly what ``docs/SPEC.md`` defines, for every backend.

    Args:
        q (torch.Tensor): queries of shape ``[B, T, H, D]``.
        k (torch.Tensor): keys of shape ``[B, T, Hkv, D]``; ``H % Hkv == 0`` (GQA: key head ``g`` serves
            query heads ``g * H/Hkv`` to ``(g+1) * H/Hkv - 1``).
        v (torch.Tensor): values of shape ``[B, T, Hkv, Dv]``.
        fq (torch.Tensor): non-negative query features ``φ(q)`` of shape ``[B, T, H, F]``.
        fk (torch.Tensor): non-negative key features ``φ(k)`` of shape ``[B, T, H, F]`` (per query head).
        gate (torch.Tensor): mixing weights ``γ`` in ``(0, 1)`` of shape ``[H]``.
        window_size (int): η ≥ 1, the window and chunk size.
        cache_size (int): λ ≥ 0, the sparse-cache capacity.
        scale (Optional[float]): softmax scale. Default ``D ** -0.5``.
        mix (str): ``"lola"`` (the LoLA normalizer) or ``"lolcats"`` (what LoLCATs checkpoints use).
        selection (str): cache selection score: ``"sre"`` (self-recall error, the spec), ``"loo"``
            (leave-one-out self-recall error: each candidate read against the memory plus every other
            candidate, see ``docs/SPEC.md``) or, for ablations, ``"recency"``, ``"value_norm"``, ``"random"``
            (a fixed hash of position and head).
        attention_mask (Optional[torch.Tensor]): ``[B, T]`` of 0/1, left or right padding. Padding enters
            no memory, moves no chunk boundary, and its outputs are zero.
        cu_seqlens (Optional[torch.LongTensor]): ``[N+1]`` cumulative lengths of ``N`` sequences packed
            along ``T`` (``B == 1``), fla's varlen convention; each sequence has its own state row.
        initial_state (Optional[LoLAState]): the state to continue from, one row per batch row (or per
            packed sequence). Never modified, unless ``inplace_state=True``.
        output_final_state (bool): whether to return the state after this call.
        backend (str): ``"auto"`` (``"torch"`` for now, on every device: the Triton kernels have yet to pass on
            a GPU), ``"naive"``, ``"torch"`` or ``"triton"`` (CPU only under ``TRITON_INTERPRET=1``).
        validate (bool): check input values (NaN/Inf, feature signs, mask entries, gate range) and the canonical
            cache layout of ``initial_state``; these checks read values back to the host (a GPU sync). Shapes are
            always checked; a decode loop over trusted inputs may turn this off (:class:`LoLAAttention` validates
            a sequence's first call and runs its single-token continuations without).
        inplace_state (bool): for a caller that owns ``initial_state`` (the layer, whose state lives in fla's
            ``Cache``): write the final state into ``initial_state``'s tensors and return that same object
            instead of a copy. Needs ``output_final_state=True``. Every check runs before anything is written,
            so a call that raises leaves the state as it was. The one-token torch path then touches only the
            written slot (and ``H``, ``s``, the cache at a chunk boundary); other paths copy their result in.

    Returns:
        o (torch.Tensor): ``[B, T, H, Dv]`` in the dtype of ``q``, zero at padding.
        final_state (Optional[LoLAState]): the state after this call if ``output_final_state``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"`backend`: must be one of {BACKENDS}, got {backend!r}")
    scale = check_inputs(q, k, v, fq, fk, gate, window_size, cache_size, scale, mix, selection,
                         attention_mask, cu_seqlens, initial_state, validate)
    if inplace_state not in (True, False):
        raise ValueError(f"`inplace_state`: must be a bool, got {inplace_state!r}")
    if inplace_state and not output_final_state:
        raise ValueError("`inplace_state`: updating the state in place needs `output_final_state=True`")
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, fq, fk, gate))
    if inplace_state and needs_grad:
        raise ValueError("`inplace_state`: the state cannot be updated in place while inputs require grad")
    backend = resolve_backend(backend, q, selection, needs_grad)
    # every check has passed: from here on the state may be written
    canonical_input = initial_state is None or validate or initial_state.known_canonical
    kwargs = dict(window_size=window_size, cache_size=cache_size, scale=scale, mix=mix, selection=selection,
                  attention_mask=attention_mask, initial_state=initial_state, output_final_state=output_final_state)
    if backend == 'naive':
        o, final = naive_lola_attention(q, k, v, fq, fk, gate, cu_seqlens=cu_seqlens, validate=False, **kwargs)
    elif backend == 'triton':
        from fla_lola.kernels import triton_lola_attention
        o, final = triton_lola_attention(q, k, v, fq, fk, gate, cu_seqlens=cu_seqlens, **kwargs)
    elif q.shape[1] == 1 and cu_seqlens is None:
        o, final = decode_lola_attention(q, k, v, fq, fk, gate, inplace=inplace_state, **kwargs)
    else:
        o, final = chunk_lola_attention(q, k, v, fq, fk, gate, cu_seqlens=cu_seqlens, **kwargs)
    if inplace_state and initial_state is not None and final is not initial_state:
        for f in fields(final):  # the paths that build a new state: copy it into the caller's
            getattr(initial_state, f.name).copy_(getattr(final, f.name))
        final = initial_state
    if final is not None and canonical_input:
        final.mark_canonical()  # the next validated call need not re-read its cache (LoLAState.known_canonical)
    return o, final


def resolve_backend(backend: str, q: torch.Tensor, selection: str, needs_grad: bool) -> str:
    """The backend that runs: ``auto`` resolved, and ``triton`` refused where it cannot run (``ValueError``)."""
    if backend == 'auto':
        # 'triton' runs only when asked for: on its first GPU (docs/gpu.md) the kernels took minutes to compile at
        # realistic widths and a float64 one exceeded shared memory; until they pass on a GPU, 'auto' is 'torch'.
        return 'torch'
    if backend == 'triton':
        if needs_grad:
            raise ValueError("`backend`: 'triton' is inference-only; inputs require grad, use 'torch' "
                             "(or run under torch.no_grad())")
        if not q.is_cuda and os.environ.get('TRITON_INTERPRET') != '1':
            raise ValueError("`backend`: 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
                             "importing triton to run its interpreter on CPU")
        if selection not in TRITON_SELECTIONS:
            raise ValueError(f"`selection`: the triton backend implements {TRITON_SELECTIONS} only, "
                             f"got {selection!r}")
    return backend
