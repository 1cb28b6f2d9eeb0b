from fla_lola.ops.lola import lola_attention
from fla_lola.ops.naive import naive_lola_attention
from fla_lola.ops.state import LoLAState

__all__ = ['LoLAState', 'lola_attention', 'naive_lola_attention']
