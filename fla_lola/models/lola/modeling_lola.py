"""LoLA models on fla's base classes: ``LoLAModel`` and ``LoLAForCausalLM``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.models import modeling_utils
from fla.models.generation_utils import FLAGenerationMixin
from fla.models.modeling_utils import FLAForCausalLM, FLAModel, FLAPreTrainedModel
from fla.modules import GatedMLP, RMSNorm
from transformers.modeling_layers import GradientCheckpointingLayer

from fla_lola.layers.lola import LoLAAttention
from fla_lola.models.lola.configuration_lola import LoLAConfig


class LoLAMLP(GatedMLP):
    """fla's ``GatedMLP`` (same ``gate_proj`` / ``up_proj`` / ``down_proj``), with a plain PyTorch SwiGLU when
    ``fuse_swiglu=False``: fla's unfused ``swiglu`` is still a Triton kernel, which CPU tensors cannot run."""

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.fuse_swiglu or self.hidden_act != 'swish':
            return super().forward(x, **kwargs)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _norm(config: LoLAConfig) -> nn.Module:
    return (RMSNorm if config.fuse_norm else nn.RMSNorm)(config.hidden_size, eps=config.norm_eps)


class LoLABlock(GradientCheckpointingLayer):

    def __init__(self, config: LoLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx

        self.attn_norm = _norm(config)
        # looked up at call time so fla_lola's `attn` hook (registry) applies here as in every fla model
        self.attn = modeling_utils.get_attention(config=config, layer_idx=layer_idx)
        if self.attn is None:
            self.attn = LoLAAttention(
                hidden_size=config.hidden_size,
                num_heads=config.num_heads,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                qkv_bias=config.qkv_bias,
                window_size=config.window_size,
                cache_size=config.cache_size,
                feature_dim=config.feature_dim,
                mix=config.mix,
                selection=config.selection,
                rope_theta=config.rope_theta,
                max_position_embeddings=config.max_position_embeddings,
                rope_parameters=getattr(config, 'rope_parameters', None),
                qk_norm=getattr(config, 'qk_norm', False),
                norm_eps=config.norm_eps,
                window_factor_init=config.window_factor_init,
                backend=config.attn_backend,
                layer_idx=layer_idx,
            )
        self.mlp_norm = _norm(config)
        self.mlp = LoLAMLP(
            hidden_size=config.hidden_size,
            hidden_ratio=config.hidden_ratio,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            fuse_swiglu=config.fuse_swiglu,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        attnres_states=None,
        **kwargs,
    ):
        residual = hidden_states
        hidden_states = self.attn_norm(hidden_states)
        hidden_states, attentions, past_key_values = self.attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_attentions=output_attentions,
            **kwargs,
        )
        if self.config.fuse_norm:
            hidden_states, residual = self.mlp_norm(hidden_states, residual, True)
        else:
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.mlp_norm(hidden_states)
        hidden_states = residual + self.mlp(hidden_states, **kwargs)
        return hidden_states, attentions, past_key_values, attnres_states


class LoLAPreTrainedModel(FLAPreTrainedModel):

    config_class = LoLAConfig
    base_model_prefix = 'model'
    supports_gradient_checkpointing = True
    _no_split_modules = ['LoLABlock']
    _supports_cache_class = True


class LoLAModel(LoLAPreTrainedModel, FLAModel):
    """Embeddings, ``num_hidden_layers`` LoLA blocks, final norm; ``forward`` is fla's ``FLAModel.forward``."""

    def __init__(self, config: LoLAConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size

        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LoLABlock(config, layer_idx) for layer_idx in range(config.num_hidden_layers)])
        self.norm = _norm(config)
        self.use_attnres = False
        self.gradient_checkpointing = False

        self.post_init()


class LoLAForCausalLM(LoLAPreTrainedModel, FLAForCausalLM, FLAGenerationMixin):
    """Causal LM head on :class:`LoLAModel`: loss, ``logits_to_keep`` (``num_logits_to_keep``), ``generate``
    (greedy, sampling, beam search: ``LoLAState`` reorders through fla's ``Cache``)."""

    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: LoLAConfig):
        super().__init__(config)
        self.model = LoLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.criterion = None

        self.post_init()
