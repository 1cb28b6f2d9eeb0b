from fla_lola.models.lola import LoLAConfig, LoLAForCausalLM, LoLAModel

__all__ = ['LoLAConfig', 'LoLAForCausalLM', 'LoLAModel']
