"""Rotary tables of a converted model: transformers' own RoPE initialization, served through fla's rotary kernel.

A converted LoLA layer must rotate queries and keys exactly as its teacher did. Rather than re-deriving the
frequency schedules of the scaled RoPE variants, :func:`rope_init` calls transformers'
``ROPE_INIT_FUNCTIONS`` (``linear``, ``dynamic``, ``yarn``, ``longrope``, ``llama3``) on the teacher's
``rope_parameters`` and returns the inverse frequencies and the attention scaling (yarn's and longrope's
``mscale``, 1 for the others) the teacher multiplies its cos/sin tables by.

:class:`ScaledRotaryEmbedding` is fla's :class:`~fla.modules.RotaryEmbedding` holding those frequencies: its
cos/sin tables, which fla's Triton rotary kernel reads on accelerators and :meth:`LoLAAttention.apply_rotary`
indexes on CPU, are ``cos(t · inv_freq) · attention_scaling`` computed as the teacher computes them (float32
positions times float32 frequencies), so both paths and the teacher share one table.

Static tables only: ``dynamic`` and ``longrope`` are served with the table the teacher uses for sequences up to
its original length (``dynamic``'s ``max_position_embeddings``, longrope's ``original_max_position_embeddings``:
there ``dynamic`` is plain RoPE and longrope uses its short factors). Beyond that length the teacher re-tables
every position of the sequence from the sequence's total length, which no recurrent state can follow.
"""

from __future__ import annotations

import torch
from fla.modules import RotaryEmbedding

# rope types whose tables do not depend on the sequence length
STATIC_ROPE_TYPES = ('default', 'linear', 'llama3', 'yarn')
# rope types served with the table the teacher uses up to its original length
SHORT_ROPE_TYPES = ('dynamic', 'longrope')
ROPE_TYPES = STATIC_ROPE_TYPES + SHORT_ROPE_TYPES


def rope_type_of(rope_parameters: dict | None) -> str:
    """The ``rope_type`` of a transformers ``rope_parameters`` / legacy ``rope_scaling`` dict."""
    if not rope_parameters:
        return 'default'
    return rope_parameters.get('rope_type', rope_parameters.get('type', 'default'))


def check_rope_parameters(rope_parameters: dict | None, context: str = 'LoLA') -> None:
    """Raise ``ValueError`` naming the field if these RoPE parameters cannot be served by a LoLA layer."""
    if rope_parameters is None:
        return
    if not isinstance(rope_parameters, dict):
        raise ValueError(f"{context}: `rope_parameters` must be a dict, got {type(rope_parameters).__name__}")
    rope_type = rope_type_of(rope_parameters)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{context}: `rope_parameters['rope_type']` = {rope_type!r} is not supported; "
                         f"supported: {ROPE_TYPES}")
    partial = rope_parameters.get('partial_rotary_factor', 1.0)
    if partial not in (None, 1, 1.0):
        raise ValueError(f"{context}: `rope_parameters['partial_rotary_factor']` = {partial!r}: LoLA rotates "
                         "whole heads only (1.0)")


def _rope_config(rope_parameters: dict, head_dim: int, max_position_embeddings: int | None):
    """The smallest transformers config the RoPE init functions accept."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=head_dim, num_attention_heads=1, num_key_value_heads=1, head_dim=head_dim,
        num_hidden_layers=1, intermediate_size=1, vocab_size=1, bos_token_id=None, eos_token_id=None,
        max_position_embeddings=max_position_embeddings or 2048,
        rope_parameters=dict(rope_parameters),
    )


def rope_init(
    rope_parameters: dict | None,
    head_dim: int,
    rope_theta: float = 10000.,
    max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2] float32, attention_scaling)`` of a teacher's RoPE, by transformers' functions.

    Args:
        rope_parameters: the teacher's ``config.rope_parameters`` (``rope_type``, ``rope_theta``, ``factor``,
            ...); ``None`` means plain RoPE with base ``rope_theta``.
        head_dim: the rotated size.
        rope_theta: the base when ``rope_parameters`` has none.
        max_position_embeddings: the teacher's ``max_position_embeddings`` (``dynamic`` and ``longrope`` read it).
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    check_rope_parameters(rope_parameters)
    params = {'rope_type': 'default', 'rope_theta': float(rope_theta), **(rope_parameters or {})}
    params['rope_type'] = rope_type_of(params)
    params.pop('type', None)
    config = _rope_config(params, head_dim, max_position_embeddings)
    with torch.device('cpu'):  # real numbers even while transformers builds a model on the meta device
        if params['rope_type'] == 'default':
            inv_freq, scaling = LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[params['rope_type']](config, device=torch.device('cpu'))
    return inv_freq.float(), float(scaling)


class ScaledRotaryEmbedding(RotaryEmbedding):
    """fla's :class:`~fla.modules.RotaryEmbedding` with given inverse frequencies and a cos/sin scale.

    Everything fla's module does (its Triton kernel with per-row offsets and ``cu_seqlens``) works unchanged; only
    the tables differ: ``inv_freq`` comes from :func:`rope_init` and the cached cos/sin are multiplied by
    ``attention_scaling``.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0):
        self._given_inv_freq = inv_freq.detach().float().cpu()
        self.attention_scaling = float(attention_scaling)
        super().__init__(dim=2 * inv_freq.numel())

    def _compute_inv_freq(self, device=None):
        return self._given_inv_freq.to(device)

    def _update_cos_sin_cache(self, seqlen, device=None, dtype=None):
        if (
            seqlen > self._seq_len_cached
            or self._cos_cached is None
            or self._cos_cached.device != device
            or self._cos_cached.dtype != dtype
            or (self.training and self._cos_cached.is_inference())
        ):
            self._seq_len_cached = seqlen
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            freqs = torch.outer(t, self._compute_inv_freq(device=device))
            self._cos_cached = (torch.cos(freqs) * self.attention_scaling).to(dtype)
            self._sin_cached = (torch.sin(freqs) * self.attention_scaling).to(dtype)

    def __repr__(self):
        return f"{self.__class__.__name__}(dim={self.dim}, attention_scaling={self.attention_scaling})"


__all__ = ['ROPE_TYPES', 'STATIC_ROPE_TYPES', 'SHORT_ROPE_TYPES', 'ScaledRotaryEmbedding', 'check_rope_parameters',
           'rope_init', 'rope_type_of']
