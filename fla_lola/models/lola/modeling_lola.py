"""LoLA models on fla's base classes: ``LoLAModel`` and ``LoLAForCausalLM``."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from fla.models import modeling_utils
from fla.models.cache_utils import Cache
from fla.models.generation_utils import FLAGenerationMixin
from fla.models.modeling_utils import FLAForCausalLM, FLAModel, FLAPreTrainedModel
from fla.modules import GatedMLP, RMSNorm
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from fla_lola.layers.lola import LoLAAttention
from fla_lola.cache_names import GENERATE_CACHE_NAME, OUTPUT_CACHE_FIELD, one_cache, output_kwargs, refuse_stray_cache
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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPast:
        """fla's ``FLAModel.forward``, taking the cache as ``past_key_values`` or ``cache`` (transformers >= 5.24)
        and returning it under the name the installed transformers reads. A cache under any other keyword raises
        ``ValueError`` instead of being dropped."""
        cache = one_cache(past_key_values, cache, where=type(self).__name__)
        refuse_stray_cache(kwargs, where=type(self).__name__)
        if output_attentions:
            warnings.warn(f"`{type(self).__name__}` does not return attention weights; `output_attentions` is ignored.")
        output_hidden_states = (output_hidden_states if output_hidden_states is not None
                                else self.config.output_hidden_states)
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(f"{type(self).__name__}: pass exactly one of `input_ids` and `inputs_embeds`")

        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        if use_cache and not isinstance(cache, Cache):
            cache = Cache.from_legacy_cache(cache)

        all_hidden_states = () if output_hidden_states else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, _, cache, _ = layer(
                hidden_states, attention_mask=attention_mask, past_key_values=cache, use_cache=use_cache, **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        if not return_dict:
            return tuple(x for x in (hidden_states, cache, all_hidden_states) if x is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, hidden_states=all_hidden_states,
                                       **output_kwargs(cache))


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

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor | None = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> tuple | CausalLMOutputWithPast:
        """fla's ``FLAForCausalLM.forward`` (loss, ``logits_to_keep``), with the cache as ``past_key_values`` or
        ``cache`` in and out, as :meth:`LoLAModel.forward`. ``num_logits_to_keep`` is the old name of
        ``logits_to_keep``."""
        if 'num_logits_to_keep' in kwargs:
            logits_to_keep = kwargs.pop('num_logits_to_keep')
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=one_cache(past_key_values, cache, where=type(self).__name__),
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        loss, logits = self._compute_logits_and_loss(
            hidden_states=outputs.last_hidden_state,
            labels=labels,
            logits_to_keep=logits_to_keep,
            num_items_in_batch=num_items_in_batch,
        )
        cache = getattr(outputs, OUTPUT_CACHE_FIELD)
        if not return_dict:
            output = tuple(x for x in (logits, cache, outputs.hidden_states) if x is not None)
            return (loss,) + output if loss is not None else output
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=outputs.hidden_states,
                                      **output_kwargs(cache))

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: Cache | None = None,
                                      cache: Cache | None = None, **kwargs):
        """fla's generation inputs, with the cache handed on under the name the installed ``generate`` uses (so no
        deprecated alias is ever passed)."""
        cache = one_cache(past_key_values, cache, where=type(self).__name__)
        cache_position = kwargs.pop('cache_position', None)
        if cache_position is not None and kwargs.get('next_sequence_length') is None:
            kwargs['next_sequence_length'] = len(cache_position)
        if kwargs.get('logits_to_keep') is None:
            kwargs.pop('logits_to_keep', None)
        kwargs[GENERATE_CACHE_NAME] = cache
        return GenerationMixin.prepare_inputs_for_generation(self, input_ids, **kwargs)
