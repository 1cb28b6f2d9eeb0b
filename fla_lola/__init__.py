"""fla-lola: LoLA (low-rank linear attention with sparse caching) for flash-linear-attention."""

from fla_lola.ops import LoLAState, lola_attention, naive_lola_attention

__all__ = ['LoLAState', 'lola_attention', 'naive_lola_attention']
__version__ = '0.1.0'
