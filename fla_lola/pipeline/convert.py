"""Convert a transformers softmax model (Llama, Mistral, Qwen2, Qwen3 layout) into a :class:`LoLAForCausalLM`.

Everything but the token mixer is copied exactly: embeddings, RMS norms, SwiGLU MLPs, the LM head, and the
q/k/v/o projections (grouped-query attention kept, Qwen2's q/k/v biases and Qwen3's per-head q/k RMSNorms
included), with the teacher's head size and RoPE: its ``rope_parameters`` are stored in the config and the
layers build their tables with transformers' own RoPE functions (default, linear, llama3, yarn with its
attention scaling; dynamic and longrope with the table the teacher uses up to its original length, see
:mod:`fla_lola.layers.rope`). Anything else is refused with a ``ValueError`` naming the config field. What the softmax layer lacks is initialized as LoLCATs does (``configs/model/
distill_llama3_1_8b_lk_smd_wtk64_fd64_w01.yaml``: learned kernel ``untied_head_einsum``, no skip, no bias,
no zero init; ``tie_qk_kernels: false``; ``init_window_factor: -2.1972245773362196``):

- ``feature_map_q.weight`` ``[H, D, f]``: ``kaiming_uniform_`` (PyTorch's defaults on the 3-d tensor), and
  ``feature_map_k.weight`` a copy of it (LoLCATs deep-copies the query map to make the key map);
- ``window_factors``: ``-2.1972245773362196`` for every head, i.e. ``γ = sigmoid(logit) = 0.1``.

With a sparse cache at least as long as the sequence nothing is ever folded into the linear memory, so the
converted model (``mix="lola"``) computes exact causal softmax attention and returns the teacher's logits
(up to float rounding and the op's ``ε``): that is the conversion's test. Attention transfer
(:mod:`fla_lola.pipeline.distill`) then fits the feature maps and logits for a small cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fla_lola.layers.rope import ROPE_TYPES, rope_type_of
from fla_lola.models.lola.configuration_lola import LoLAConfig
from fla_lola.models.lola.modeling_lola import LoLAForCausalLM

LOLCATS_WINDOW_FACTOR_INIT = -2.1972245773362196  # sigmoid = 0.1
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def _rope_parameters(config) -> dict:
    """The teacher's ``rope_parameters`` (``rope_theta`` included), refused with the field named if unsupported."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    nested = [k for k, v in params.items() if isinstance(v, dict)]
    if nested:
        raise ValueError(f"config field `rope_parameters` has one RoPE per layer type ({nested}); LoLA converts "
                         "models with a single RoPE")
    rope_type = rope_type_of(params)
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config field `rope_parameters['rope_type']` is {rope_type!r}; conversion supports "
                         f"{ROPE_TYPES}")
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise ValueError("config field `partial_rotary_factor` is not 1.0: LoLA rotates whole heads only")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config names no `rope_theta`")
    params.pop("type", None)
    params.pop("partial_rotary_factor", None)
    return {**params, "rope_type": rope_type, "rope_theta": float(theta)}


def lola_config_from(config, **lola) -> LoLAConfig:
    """A :class:`LoLAConfig` with the shapes of a transformers Llama/Mistral/Qwen2/Qwen3 config.

    ``lola`` sets the LoLA fields: ``window_size``, ``cache_size``, ``feature_dim`` (default 64, as LoLCATs),
    ``mix``, ``selection``, ``attn_backend``.

    Raises:
        ValueError: naming the config field that LoLA cannot reproduce: ``model_type`` (other families),
            ``hidden_act`` (not SiLU), ``attention_bias`` / ``mlp_bias``, ``use_sliding_window`` (Qwen's
            per-layer windows), ``rope_parameters`` (a RoPE type outside :data:`fla_lola.layers.rope.ROPE_TYPES`,
            per-layer RoPE), ``partial_rotary_factor``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"config field `model_type` is {model_type!r}; conversion supports {SUPPORTED}")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"config field `hidden_act` is {config.hidden_act!r}; the LoLA MLP is SwiGLU (silu)")
    if getattr(config, "attention_bias", False):
        raise ValueError("config field `attention_bias` is True: it puts a bias on o_proj, which the LoLA layer "
                         "does not have")
    if getattr(config, "mlp_bias", False):
        raise ValueError("config field `mlp_bias` is True: the LoLA MLP has no biases")
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise ValueError("config field `use_sliding_window` is True: Qwen's per-layer sliding windows are not "
                         "reproduced by LoLA layers")
    rope = _rope_parameters(config)
    num_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return LoLAConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_heads=num_heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        qkv_bias=model_type == "qwen2",
        hidden_ratio=None,
        intermediate_size=config.intermediate_size,
        hidden_act="swish",
        rope_theta=rope["rope_theta"],
        rope_parameters=rope,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=config.max_position_embeddings,
        norm_eps=config.rms_norm_eps,
        vocab_size=config.vocab_size,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        pad_token_id=config.pad_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        window_factor_init=LOLCATS_WINDOW_FACTOR_INIT,
        **{"feature_dim": 64, **lola},
    )


def weight_map(config) -> dict[str, str]:
    """LoLA parameter name -> transformers parameter name."""
    names = {"model.embeddings.weight": "model.embed_tokens.weight", "model.norm.weight": "model.norm.weight"}
    if not config.tie_word_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.num_hidden_layers):
        a, b = f"model.layers.{i}.", f"model.layers.{i}."
        names[a + "attn_norm.weight"] = b + "input_layernorm.weight"
        names[a + "mlp_norm.weight"] = b + "post_attention_layernorm.weight"
        for p in ("q", "k", "v", "o"):
            names[a + f"attn.{p}_proj.weight"] = b + f"self_attn.{p}_proj.weight"
        if config.qkv_bias:
            for p in ("q", "k", "v"):
                names[a + f"attn.{p}_proj.bias"] = b + f"self_attn.{p}_proj.bias"
        if getattr(config, "qk_norm", False):
            for p in ("q", "k"):
                names[a + f"attn.{p}_norm.weight"] = b + f"self_attn.{p}_norm.weight"
        for p in ("gate", "up", "down"):
            names[a + f"mlp.{p}_proj.weight"] = b + f"mlp.{p}_proj.weight"
    return names


@torch.no_grad()
def init_lolcats_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """LoLCATs' initial feature maps and mixing logits on every LoLA layer of ``model`` (in place)."""
    from fla_lola.pipeline.distill import lola_layers

    for layer in lola_layers(model):
        w = layer.feature_map_q.weight
        w.copy_(lolcats_feature_map_init(w.shape, generator).to(w.dtype))
        layer.feature_map_k.weight.copy_(w)
        layer.window_factors.fill_(LOLCATS_WINDOW_FACTOR_INIT)


def lolcats_feature_map_init(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """One layer's initial feature map ``[H, D, f]`` (float32): ``kaiming_uniform_`` with PyTorch's defaults
    (``a = 0``, ``fan_in = D * f`` for a 3-d tensor). Layer after layer from one generator, as
    :func:`init_lolcats_` and :func:`fla_lola.pipeline.checkpoint.convert_checkpoint` draw them."""
    bound = math.sqrt(2.0) * math.sqrt(3.0 / (shape[1] * shape[2]))
    return torch.empty(tuple(shape), dtype=torch.float32).uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def convert_to_lola(model: nn.Module, seed: int | None = 0, **lola) -> LoLAForCausalLM:
    """A :class:`LoLAForCausalLM` holding ``model``'s weights (copied; ``model`` is left untouched).

    Args:
        model: a transformers ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
            ``Qwen3ForCausalLM``.
        seed: seeds the feature-map initialization (``None``: PyTorch's global generator).
        **lola: LoLA settings for the config (``window_size``, ``cache_size``, ``feature_dim``, ``mix``,
            ``selection``, ``attn_backend``).

    Note that a Mistral model with a sliding window attends to its last ``sliding_window`` tokens only; the
    converted model sees the whole past, so the two agree on sequences up to that length.
    """
    config = lola_config_from(model.config, **lola)
    weight = next(model.parameters())
    student = LoLAForCausalLM(config).to(device=weight.device, dtype=weight.dtype)
    source = model.state_dict()
    target = student.state_dict()
    for dst, src in weight_map(config).items():
        if dst not in target or src not in source:
            raise ValueError(f"cannot map {src!r} -> {dst!r}: missing on the "
                             f"{'LoLA' if dst not in target else 'source'} side")
        if target[dst].shape != source[src].shape:
            raise ValueError(f"{src} has shape {tuple(source[src].shape)}, {dst} expects {tuple(target[dst].shape)}")
        target[dst].copy_(source[src])
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    init_lolcats_(student, generator)
    student.eval()
    return student


def set_lola(model: nn.Module, **settings) -> None:
    """Change ``window_size``, ``cache_size``, ``selection`` or ``mix`` on every LoLA layer and in the config.

    Weights do not depend on these, so one distilled student serves every variant of an ablation.
    """
    from fla_lola.pipeline.distill import lola_layers

    allowed = {"window_size", "cache_size", "selection", "mix"}
    if set(settings) - allowed:
        raise ValueError(f"set_lola changes {sorted(allowed)}, got {sorted(settings)}")
    for layer in lola_layers(model):
        for key, value in settings.items():
            setattr(layer, key, value)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in settings.items():
            setattr(config, key, value)
