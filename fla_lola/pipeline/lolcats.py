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

A stage-2 (fine-tuning) checkpoint holds peft LoRA weights on the attention projections, in peft's layout::

    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.default.weight   [out, r]

(``q``, ``k``, ``v``, ``o``; the adapter name and the prefix are optional). :func:`merge_lora_` folds them into
the projections as peft's ``merge_and_unload`` does: ``W + (alpha / r) · B @ A``, ``r`` read from the tensors
and ``alpha`` given (LoLCATs' default 16). Any other key is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
import torch.nn as nn

from fla_lola.pipeline.distill import lola_layers

_LORA_KEY = re.compile(
    r"^(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkvo])_proj\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$"
)
LOLCATS_LORA_ALPHA = 16.0
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
        model: a model converted with :func:`fla_lola.pipeline.convert.convert_to_lola` (any module holding
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
    copies = []  # every check passes before anything is written: a failed import changes nothing
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
            copies.append((target, src))
    for target, src in copies:
        target.copy_(src.to(target.dtype))
    loaded = []
    for i in sorted(parsed):
        if i not in by_idx:
            continue
        layer = by_idx[i]
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


# ---------------------------------------------------------------- stage 2: LoRA on q/k/v/o


def parse_lora_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[tuple[int, str], dict], list[str]]:
    """Group peft LoRA tensors by projection: ``{(layer, 'q'): {'A': [r, in], 'B': [out, r]}}``, plus other keys.

    Raises ``ValueError`` for a projection with only one of ``lora_A`` / ``lora_B``, two tensors for one slot
    (two adapters), or ranks that disagree.
    """
    lora: dict[tuple[int, str], dict] = {}
    other = []
    for key, value in state_dict.items():
        m = _LORA_KEY.match(key)
        if m is None:
            other.append(key)
            continue
        entry = lora.setdefault((int(m["layer"]), m["proj"]), {})
        if m["ab"] in entry:
            raise ValueError(f"two lora_{m['ab']} tensors for layer {m['layer']} {m['proj']}_proj (a second under "
                             f"{key!r}); merge one adapter at a time")
        entry[m["ab"]] = value
    for (i, proj), entry in sorted(lora.items()):
        if set(entry) != {"A", "B"}:
            raise ValueError(f"layer {i} {proj}_proj has lora_{''.join(entry)} without "
                             f"lora_{'B' if 'A' in entry else 'A'}")
        a, b = entry["A"], entry["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"layer {i} {proj}_proj: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not "
                             "[r, in] and [out, r]")
    return lora, other


def lora_delta(a: torch.Tensor, b: torch.Tensor, lora_alpha: float = LOLCATS_LORA_ALPHA) -> torch.Tensor:
    """``(alpha / r) · B @ A`` with ``r = A.shape[0]``, in float32 or the inputs' dtype if wider."""
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    return (b.to(dtype) @ a.to(dtype)) * (float(lora_alpha) / a.shape[0])


def check_lora_shapes(lora: dict[tuple[int, str], dict], shapes: Mapping[tuple[int, str], tuple]) -> None:
    """Raise ``ValueError`` if a LoRA pair targets a projection the model lacks or has the wrong shape."""
    for (i, proj), entry in sorted(lora.items()):
        if (i, proj) not in shapes:
            raise ValueError(f"LoRA weights for layer {i} {proj}_proj, which the model does not have "
                             f"(layers 0..{max(j for j, _ in shapes)})")
        out_f, in_f = shapes[(i, proj)]
        if entry["B"].shape[0] != out_f or entry["A"].shape[1] != in_f:
            raise ValueError(f"layer {i} {proj}_proj is [{out_f}, {in_f}], its LoRA gives "
                             f"[{entry['B'].shape[0]}, {entry['A'].shape[1]}] (lora_B {tuple(entry['B'].shape)}, "
                             f"lora_A {tuple(entry['A'].shape)})")


def lolcats_feature_dim(*state_dicts: Mapping[str, torch.Tensor]) -> int | None:
    """The feature dimension ``f`` of the feature maps ``[H, D, f]`` in LoLCATs state dicts (stage 1, or a stage 2
    that carries them); ``None`` where there are none. Maps of different widths raise ``ValueError``."""
    widths = {m.shape[-1] for sd in state_dicts for entry in parse_lolcats_state_dict(sd)[0].values()
              for name, m in entry.items() if name in ("q", "k")}
    if len(widths) > 1:
        raise ValueError(f"LoLCATs checkpoint has feature maps of different widths {sorted(widths)}")
    return widths.pop() if widths else None


def split_finetune_checkpoint(checkpoint) -> tuple[dict, dict]:
    """A stage-2 checkpoint as ``(lora, attention_transfer)`` state dicts; any other key is refused."""
    sd = read_lolcats_checkpoint(checkpoint)
    lora, other = parse_lora_state_dict(sd)
    lora_keys = set(sd) - set(other)
    attn = {k: v for k, v in sd.items() if k in other and _KEY.match(k)}
    stray = [k for k in other if k not in attn]
    if stray:
        raise ValueError(f"stage-2 checkpoint has keys that are neither LoRA weights of q/k/v/o_proj nor "
                         f"attention-transfer parameters: {stray[:5]}{'...' if len(stray) > 5 else ''}")
    return {k: sd[k] for k in lora_keys}, attn


@torch.no_grad()
def merge_lora_(model: nn.Module, checkpoint, lora_alpha: float = LOLCATS_LORA_ALPHA) -> list[tuple[int, str]]:
    """Fold a stage-2 checkpoint's LoRA weights into the q/k/v/o projections of ``model``'s LoLA layers.

    ``W += (alpha / r) · B @ A``, what peft's ``merge_and_unload`` computes. Attention-transfer tensors in the
    same file are loaded too (:func:`load_lolcats_checkpoint`, non-strict). Every shape is checked before any
    weight changes. Returns the ``(layer, projection)`` pairs merged.
    """
    lora_sd, attn = split_finetune_checkpoint(checkpoint)
    lora, _ = parse_lora_state_dict(lora_sd)
    by_idx = {m.layer_idx: m for m in lola_layers(model)}
    projections = {(i, p): getattr(m, f"{p}_proj") for i, m in by_idx.items() for p in "qkvo"}
    check_lora_shapes(lora, {key: tuple(lin.weight.shape) for key, lin in projections.items()})
    if attn:  # checks all its shapes before copying; the LoRA shapes are checked already
        load_lolcats_checkpoint(model, attn, mix=None, strict=False)
    for (i, proj), entry in sorted(lora.items()):
        w = projections[(i, proj)].weight
        w.copy_((w.to(torch.promote_types(w.dtype, torch.float32)) + lora_delta(entry["A"], entry["B"], lora_alpha))
                .to(w.dtype))
    return sorted(lora)
