"""Import (and export) LoLCATs attention-transfer checkpoints onto a converted LoLA model.

A LoLCATs stage-1 checkpoint (``torch.save({'model_state_dict': ..., 'step': ...})`` holding only the
parameters that trained) names, for layer ``i`` of a Llama/Mistral model::

    model.layers.{i}.self_attn.feature_map_q.mlp.layer   [H, D, f]   (einsum 'hdf,bhld->bhlf')
    model.layers.{i}.self_attn.feature_map_k.mlp.layer   [H, D, f]
    model.layers.{i}.self_attn.window_factors            [1, H, 1, 1]

possibly behind a PEFT prefix (``base_model.model.``). With tied q/k kernels only ``feature_map_q``
appears. These map one to one onto :class:`~fla_lola.layers.LoLAAttention`'s ``feature_map_q.weight``,
``feature_map_k.weight`` and ``window_factors`` ``[H]``. LoLCATs mixes window and linear attention with
weights ``γ`` and ``1`` (``affine_attention_factors: false``), which is the op's ``mix="lolcats"``; the
import sets it on every layer unless told otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from fla_lola.distill import lola_layers

_KEY = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\."
    r"(?:feature_map_(?P<qk>[qk])\.mlp\.layer|(?P<wf>window_factors))$"
)


def read_lolcats_checkpoint(path_or_state_dict) -> dict[str, torch.Tensor]:
    """A LoLCATs state dict from a ``.pt`` file, a ``{'model_state_dict': ...}`` dict, or a plain state dict."""
    sd = path_or_state_dict
    if not isinstance(sd, Mapping):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
    if "model_state_dict" in sd:
        sd = sd["model_state_dict"]
    return dict(sd)


def parse_lolcats_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[int, dict], list[str]]:
    """Group the attention-transfer tensors by layer: ``{i: {'q': [H,D,f], 'k': ..., 'window_factors': [H]}}``.

    Also returns the keys that are not attention-transfer parameters.
    """
    layers: dict[int, dict] = {}
    other = []
    for key, value in state_dict.items():
        m = _KEY.match(key)
        if m is None:
            other.append(key)
            continue
        entry = layers.setdefault(int(m["layer"]), {})
        name = m["qk"] if m["qk"] else "window_factors"
        if name in entry:
            raise ValueError(f"two tensors for layer {m['layer']} {name}: a second one under {key!r}")
        entry[name] = value.reshape(-1) if name == "window_factors" else value
    for i, entry in layers.items():
        if "q" not in entry and "k" in entry:
            raise ValueError(f"layer {i}: feature_map_k without feature_map_q")
        if "q" in entry and "k" not in entry:  # tie_qk_kernels: one map serves both
            entry["k"] = entry["q"]
    return layers, other


@torch.no_grad()
def load_lolcats_checkpoint(
    model: nn.Module,
    checkpoint,
    mix: str | None = "lolcats",
    strict: bool = True,
) -> dict[str, list]:
    """Copy a LoLCATs attention-transfer checkpoint onto ``model``'s LoLA layers (in place).

    Args:
        model: a model converted with :func:`fla_lola.convert.convert_to_lola` (any module holding
            ``LoLAAttention`` layers with ``layer_idx`` set).
        checkpoint: a path to the ``.pt`` file, or its loaded dict / state dict.
        mix: set on every layer (``"lolcats"``, the rule these checkpoints were trained with); ``None``
            leaves the layers' mix unchanged.
        strict: raise if the checkpoint has other keys (e.g. stage-2 LoRA weights: merge them first), misses
            a layer, or a shape differs.

    Returns:
        ``{'loaded': [layer indices], 'unexpected': [keys], 'missing': [layer indices]}``.
    """
    parsed, other = parse_lolcats_state_dict(read_lolcats_checkpoint(checkpoint))
    by_idx = {m.layer_idx: m for m in lola_layers(model)}
    missing = sorted(set(by_idx) - set(parsed))
    unknown = sorted(set(parsed) - set(by_idx))
    if strict and (other or missing or unknown):
        raise ValueError(
            "LoLCATs checkpoint does not match the model: "
            f"keys that are not attention-transfer parameters {other[:5]}{'...' if len(other) > 5 else ''}; "
            f"model layers without weights {missing}; checkpoint layers the model lacks {unknown}"
        )
    loaded = []
    for i, entry in sorted(parsed.items()):
        if i not in by_idx:
            continue
        layer = by_idx[i]
        for name, target in (("q", layer.feature_map_q.weight), ("k", layer.feature_map_k.weight),
                             ("window_factors", layer.window_factors)):
            if name not in entry:
                if strict:
                    raise ValueError(f"layer {i}: the checkpoint has no {name}")
                continue
            src = entry[name]
            if src.shape != target.shape:
                raise ValueError(f"layer {i} {name}: checkpoint shape {tuple(src.shape)}, model expects "
                                 f"{tuple(target.shape)} (num_heads, head_dim, feature_dim must match)")
            target.copy_(src.to(target.dtype))
        if mix is not None:
            layer.mix = mix
        loaded.append(i)
    config = getattr(model, "config", None)
    if mix is not None and config is not None and hasattr(config, "mix"):
        config.mix = mix
    return {"loaded": loaded, "unexpected": other, "missing": missing}


def lolcats_state_dict(model: nn.Module, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """The model's feature maps and mixing logits in LoLCATs' checkpoint layout (the inverse of the import)."""
    out = {}
    for m in lola_layers(model):
        base = f"{prefix}layers.{m.layer_idx}.self_attn."
        out[base + "feature_map_q.mlp.layer"] = m.feature_map_q.weight.detach().clone()
        out[base + "feature_map_k.mlp.layer"] = m.feature_map_k.weight.detach().clone()
        out[base + "window_factors"] = m.window_factors.detach().reshape(1, -1, 1, 1).clone()
    return out
