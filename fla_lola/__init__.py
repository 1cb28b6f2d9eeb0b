"""fla-lola: LoLA (low-rank linear attention with sparse caching) for flash-linear-attention.

Importing the package registers ``model_type = "lola"`` with transformers' Auto classes and lets any fla model
config pick LoLA layers through ``attn={"type": "lola", ...}`` (see :mod:`fla_lola.registry`).
"""

import warnings

with warnings.catch_warnings():
    # fla says so at import on every machine without a GPU; our CPU path (backend "torch") never asks for Triton
    warnings.filterwarnings('ignore', message='Triton is not supported on current platform', category=UserWarning)
    import fla  # noqa: F401

from fla_lola.layers import LoLAAttention, LoLCATsFeatureMap
from fla_lola.models import LoLAConfig, LoLAForCausalLM, LoLAModel
from fla_lola.ops import LoLAState, lola_attention, naive_lola_attention
from fla_lola import registry as _registry

_registry.register()

__all__ = [
    'LoLAAttention',
    'LoLAConfig',
    'LoLAForCausalLM',
    'LoLAModel',
    'LoLAState',
    'LoLCATsFeatureMap',
    'lola_attention',
    'naive_lola_attention',
]
__version__ = '0.1.0'
