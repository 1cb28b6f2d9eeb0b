from fla_lola.models.lola.configuration_lola import LoLAConfig
from fla_lola.models.lola.modeling_lola import LoLAForCausalLM, LoLAModel

__all__ = ['LoLAConfig', 'LoLAForCausalLM', 'LoLAModel']
