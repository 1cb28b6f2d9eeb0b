"""Convert a transformers softmax model (Llama, Mistral, Qwen2 layout) into a :class:`LoLAForCausalLM`.

Everything but the token mixer is copied exactly: embeddings, RMS norms, SwiGLU MLPs, the LM head, and the
q/k/v/o projections (grouped-query attention kept, Qwen2's q/k/v biases included), with the teacher's RoPE
base and head size. What the softmax layer lacks is initialized as LoLCATs does (``configs/model/
distill_llama3_1_8b_lk_smd_wtk64_fd64_w01.yaml``: learned kernel ``untied_head_einsum``, no skip, no bias,
no zero init; ``tie_qk_kernels: false``; ``init_window_factor: -2.1972245773362196``):

- ``feature_map_q.weight`` ``[H, D, f]``: ``kaiming_uniform_`` (PyTorch's defaults on the 3-d tensor), and
  ``feature_map_k.weight`` a copy of it (LoLCATs deep-copies the query map to make the key map);
- ``window_factors``: ``-2.1972245773362196`` for every head, i.e. ``γ = sigmoid(logit) = 0.1``.

With a sparse cache at least as long as the sequence nothing is ever folded into the linear memory, so the
converted model (``mix="lola"``) computes exact causal softmax attention and returns the teacher's logits
(up to float rounding and the op's ``ε``): that is the conversion's test. Attention transfer
(:mod:`fla_lola.distill`) then fits the feature maps and logits for a small cache.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from fla_lola.models.lola.configuration_lola import LoLAConfig
from fla_lola.models.lola.modeling_lola import LoLAForCausalLM

LOLCATS_WINDOW_FACTOR_INIT = -2.1972245773362196  # sigmoid = 0.1
SUPPORTED = ("llama", "mistral", "qwen2")


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "default":
        raise ValueError(f"conversion maps plain RoPE only; this model uses rope_type={rope_type!r}, which the "
                         "LoLA layer's rotary embedding does not implement")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the model config names no rope_theta")
    return float(theta)


def lola_config_from(config, **lola) -> LoLAConfig:
    """A :class:`LoLAConfig` with the shapes of a transformers Llama/Mistral/Qwen2 config.

    ``lola`` sets the LoLA fields: ``window_size``, ``cache_size``, ``feature_dim`` (default 64, as LoLCATs),
    ``mix``, ``selection``, ``attn_backend``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise ValueError(f"conversion supports model_type in {SUPPORTED}, got {model_type!r}")
    if getattr(config, "hidden_act", "silu") not in ("silu", "swish"):
        raise ValueError(f"the LoLA MLP is SwiGLU; this model's hidden_act is {config.hidden_act!r}")
    if getattr(config, "attention_bias", False):
        raise ValueError("attention_bias=True puts a bias on o_proj, which the LoLA layer does not have")
    if getattr(config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported by the LoLA MLP")
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
        rope_theta=_rope_theta(config),
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


def _weight_map(config) -> dict[str, str]:
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
        for p in ("gate", "up", "down"):
            names[a + f"mlp.{p}_proj.weight"] = b + f"mlp.{p}_proj.weight"
    return names


@torch.no_grad()
def init_lolcats_(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """LoLCATs' initial feature maps and mixing logits on every LoLA layer of ``model`` (in place)."""
    from fla_lola.distill import lola_layers

    for layer in lola_layers(model):
        w = layer.feature_map_q.weight
        # kaiming_uniform_ with PyTorch's defaults (a=0, fan_in = size(1) * size(2) for a 3-d tensor)
        bound = math.sqrt(2.0) * math.sqrt(3.0 / (w.shape[1] * w.shape[2]))
        init = torch.empty(w.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        w.copy_(init.to(w.dtype))
        layer.feature_map_k.weight.copy_(w)
        layer.window_factors.fill_(LOLCATS_WINDOW_FACTOR_INIT)


@torch.no_grad()
def convert_to_lola(model: nn.Module, seed: int | None = 0, **lola) -> LoLAForCausalLM:
    """A :class:`LoLAForCausalLM` holding ``model``'s weights (copied; ``model`` is left untouched).

    Args:
        model: a transformers ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM``.
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
    for dst, src in _weight_map(config).items():
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
    from fla_lola.distill import lola_layers

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
