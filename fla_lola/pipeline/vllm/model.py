"""``LoLAForCausalLM`` for vLLM, built from vLLM's parallel layers as ``vllm/model_executor/models/llama.py`` is.

Embeddings (``VocabParallelEmbedding``), blocks of ``attn_norm`` → :class:`~fla_lola.pipeline.vllm.layer.LoLAMixer`
→ ``mlp_norm`` → SwiGLU MLP (``MergedColumnParallelLinear`` + ``RowParallelLinear``), the final ``RMSNorm``, and
``ParallelLMHead`` (tied to the embeddings when the config says so) through ``LogitsProcessor``. Every layer is a
LoLA layer with a fixed-size state per sequence, so the model is attention-free for vLLM: no paged KV cache.

:meth:`LoLAForCausalLM.load_weights` reads the checkpoints ``fla-lola convert``, ``fla-lola distill`` and
``save_pretrained`` write (:class:`fla_lola.LoLAForCausalLM`'s names: ``model.embeddings``,
``model.layers.N.attn.{q,k,v,o}_proj``, ``attn.{q,k}_norm``, ``attn.feature_map_{q,k}.weight``,
``attn.window_factors``, ``attn_norm``, ``mlp_norm``, ``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.sequence import IntermediateTensors

from fla_lola.pipeline.vllm.layer import LoLAMixer

# checkpoint name -> (parameter name, shard id) of vLLM's stacked projections
STACKED = (
    ('.qkv_proj', '.q_proj', 'q'),
    ('.qkv_proj', '.k_proj', 'k'),
    ('.qkv_proj', '.v_proj', 'v'),
    ('.gate_up_proj', '.gate_proj', 0),
    ('.gate_up_proj', '.up_proj', 1),
)


def check_servable(config) -> None:
    """``ValueError`` naming the config field if this LoLA config cannot be served by the plugin."""
    if getattr(config, 'attn', None):
        raise ValueError("LoLA in vLLM: config field `attn` puts softmax (or differently set) layers in the model; "
                         "hybrids of LoLA and paged softmax layers are not supported yet")
    if getattr(config, 'hidden_act', 'swish') not in ('swish', 'silu'):
        raise ValueError(f"LoLA in vLLM: config field `hidden_act` is {config.hidden_act!r}; only SwiGLU (swish)")


def intermediate_size(config) -> int:
    if config.intermediate_size is not None:
        return config.intermediate_size
    # fla's GatedMLP: int(2/3 · hidden · ratio), rounded up to a multiple of 256
    size = int(config.hidden_size * (config.hidden_ratio or 4) * 2 / 3)
    return 256 * ((size + 256 - 1) // 256)


class LoLAMLP(nn.Module):
    def __init__(self, config, quant_config, prefix: str):
        super().__init__()
        size = intermediate_size(config)
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size] * 2, bias=False,
                                                       quant_config=quant_config, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=False, quant_config=quant_config,
                                           prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, _ = self.gate_up_proj(x)
        x, _ = self.down_proj(self.act_fn(x))
        return x


class LoLADecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, prefix: str = ''):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.attn_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.attn = LoLAMixer(config, vllm_config, prefix=f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = LoLAMLP(config, vllm_config.quant_config, prefix=f"{prefix}.mlp")

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.attn_norm(hidden_states)
        else:
            hidden_states, residual = self.attn_norm(hidden_states, residual)
        hidden_states = self.attn(positions, hidden_states)
        hidden_states, residual = self.mlp_norm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile(dynamic_arg_dims={'input_ids': 0, 'positions': 0, 'intermediate_tensors': 0,
                                         'inputs_embeds': 0})
class LoLAModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_servable(config)
        if get_pp_group().world_size > 1:
            raise ValueError("LoLA in vLLM: pipeline parallelism is not supported yet (tensor parallelism is)")
        self.config = config
        self.embeddings = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                 quant_config=vllm_config.quant_config)
        self.layers = nn.ModuleList(
            LoLADecoderLayer(vllm_config, prefix=f"{prefix}.layers.{i}") for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LoLAForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    """A LoLA checkpoint served by vLLM (architecture name ``LoLAForCausalLM``, as ``config.json`` stores it)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ''):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        self.model = LoLAModel(vllm_config=vllm_config, prefix=_join(prefix, 'model'))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
                                      prefix=_join(prefix, 'lm_head'))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embeddings)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None, **kwargs) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if self.config.tie_word_embeddings and name == 'lm_head.weight':
                continue  # tied: the embeddings are the head
            for param_name, weight_name, shard in STACKED:
                if weight_name in name:
                    target = name.replace(weight_name, param_name)
                    param = params[target]
                    param.weight_loader(param, tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"LoLA in vLLM: checkpoint tensor {name!r} has no parameter in the model")
                target = name
                param = params[target]
                getattr(param, 'weight_loader', default_weight_loader)(param, tensor)
            loaded.add(target)
        return loaded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


__all__ = ['LoLAForCausalLM', 'LoLAModel', 'check_servable']
