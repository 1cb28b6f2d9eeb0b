"""The state backend of LoLA layers in vLLM: which slots a step's sequences own, and how the step splits.

LoLA keeps a fixed-size state per sequence, the shape of state vLLM manages for its Mamba and linear-attention
layers, so the backend is vLLM's linear-attention one under its own name: the metadata of a step is
:class:`~vllm.v1.attention.backends.linear_attn.LinearAttentionMetadata` (``num_decodes`` single-token rows first,
then ``num_prefills`` rows; ``query_start_loc``, ``seq_lens``; ``state_indices_tensor``, one slot per row).
"""

from __future__ import annotations

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.linear_attn import (
    LinearAttentionBackend,
    LinearAttentionMetadata,
    LinearAttentionMetadataBuilder,
)

BACKEND_NAME = 'FLA_LOLA'
BACKEND_PATH = 'fla_lola.pipeline.vllm.backend.LoLAStateBackend'


class LoLAMetadataBuilder(LinearAttentionMetadataBuilder):
    # the LoLA step runs as an opaque custom op that reads the slot table on the host side (CPU) or branches on the
    # batch's split: no CUDA graph captures it (vLLM runs it eagerly between piecewise graphs)
    _cudagraph_support = AttentionCGSupport.NEVER


class LoLAStateBackend(LinearAttentionBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_builder_cls() -> type[LoLAMetadataBuilder]:
        return LoLAMetadataBuilder


LoLAMetadata = LinearAttentionMetadata

__all__ = ['BACKEND_NAME', 'BACKEND_PATH', 'LoLAMetadata', 'LoLAMetadataBuilder', 'LoLAStateBackend']
