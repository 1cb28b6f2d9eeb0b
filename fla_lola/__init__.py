"""fla-lola: LoLA (low-rank linear attention with sparse caching) for flash-linear-attention.

Importing the package registers ``model_type = "lola"`` with transformers' Auto classes and lets any fla model
config pick LoLA layers through ``attn={"type": "lola", ...}`` (see :mod:`fla_lola.registry`).
"""

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
