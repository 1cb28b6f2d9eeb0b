from fla_lola.layers.feature_map import LoLCATsFeatureMap
from fla_lola.layers.lola import LoLAAttention

__all__ = ['LoLAAttention', 'LoLCATsFeatureMap']
