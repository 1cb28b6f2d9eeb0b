"""Checkpoint directories: convert a transformers checkpoint into a LoLA model directory, streaming tensor by tensor.

:func:`convert_checkpoint` reads ``SRC`` (``config.json``, ``model.safetensors`` or a sharded
``model.safetensors.index.json``, tokenizer files) and writes ``OUT``: a :class:`~fla_lola.LoLAConfig`, sharded
safetensors with an index, and the tokenizer and generation files copied, which
``AutoModelForCausalLM.from_pretrained(OUT)`` loads after ``import fla_lola``. The result is the model
:func:`fla_lola.pipeline.convert.convert_to_lola` builds in memory (same names, same seeded feature maps), optionally
with a LoLCATs stage-1 checkpoint loaded and a stage-2 LoRA merged.

No model is ever built: each output tensor is read from the source file on its own (the file is opened per
tensor, so no mapping of the whole source stays resident), cast to the target dtype, and written out when a
shard fills. Peak memory is about one shard plus one tensor. ``OUT`` is written to a temporary directory beside it
and renamed at the end, so a failure never leaves a half-written ``OUT``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fla_lola.pipeline.convert import (LOLCATS_WINDOW_FACTOR_INIT, lola_config_from, lolcats_feature_map_init,
                                       weight_map)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def check_source_dir(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if it is a directory with a ``config.json``, else ``ValueError``."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"SRC {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"SRC {str(path)!r} has no config.json (not a transformers checkpoint directory)")
    return path


class SourceCheckpoint:
    """The tensors of a transformers checkpoint directory, read one at a time from its safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = check_source_dir(path)
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            self.files = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            with safe_open(single, framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise ValueError(f"SRC {str(self.path)!r} has no model.safetensors or model.safetensors.index.json "
                             "(save the model with safe_serialization, the transformers default)")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)


def _read_optional(path) -> dict:
    """A LoLCATs checkpoint file's state dict (``{}`` for ``None``; a state dict read already passes through)."""
    from fla_lola.pipeline.lolcats import read_lolcats_checkpoint

    if path is None:
        return {}
    if isinstance(path, Mapping):
        return dict(path)
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    return read_lolcats_checkpoint(str(path))


def plan_conversion(src: SourceCheckpoint, lola_config, lolcats_attn=None, lolcats_finetune=None,
                    lora_alpha: float = 16.0) -> tuple[dict, dict, dict]:
    """Check everything before writing: the weight map against the source, LoLCATs stage 1 and stage 2 shapes.

    Returns ``(weight_map, attention_transfer_by_layer, lora_by_projection)``.
    """
    from fla_lola.pipeline.lolcats import check_lora_shapes, parse_lolcats_state_dict, parse_lora_state_dict, \
        split_finetune_checkpoint

    c = lola_config
    names = weight_map(c)
    for dst, name in names.items():
        if name not in src:
            raise ValueError(f"SRC has no tensor {name!r} (needed for {dst!r})")
    H, D, f, L = c.num_heads, c.head_dim, c.feature_dim, c.num_hidden_layers
    attn_sd = _read_optional(lolcats_attn)
    lora_sd, attn_from_finetune = split_finetune_checkpoint(lolcats_finetune) if lolcats_finetune else ({}, {})
    attn, other = parse_lolcats_state_dict({**attn_sd, **attn_from_finetune})
    if other:
        raise ValueError(f"--lolcats-attn checkpoint has keys that are not attention-transfer parameters: "
                         f"{other[:5]}{'...' if len(other) > 5 else ''} (stage-2 LoRA goes to --lolcats-finetune)")
    if attn_sd and sorted(attn) != list(range(L)):
        raise ValueError(f"--lolcats-attn covers layers {sorted(attn)}, the model has layers 0..{L - 1}")
    for i, entry in attn.items():
        if i >= L:
            raise ValueError(f"LoLCATs checkpoint has layer {i}, the model has {L} layers")
        for name, shape in (("q", (H, D, f)), ("k", (H, D, f)), ("window_factors", (H,))):
            if name in entry and tuple(entry[name].shape) != shape:
                raise ValueError(f"LoLCATs checkpoint layer {i} {name} has shape {tuple(entry[name].shape)}, the "
                                 f"converted model expects {shape} (num_heads, head_dim, --feature-dim must match)")
    lora, _ = parse_lora_state_dict(lora_sd)
    shapes = {}
    for i in range(L):
        for p in "qkvo":
            shapes[(i, p)] = src.shape(names[f"model.layers.{i}.attn.{p}_proj.weight"])
    check_lora_shapes(lora, shapes)
    return names, attn, lora


def _tensors(src: SourceCheckpoint, config, names: dict, attn: dict, lora: dict, lora_alpha: float,
             dtype: torch.dtype, seed: int | None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of the LoLA model in state-dict order, one layer at a time."""
    from fla_lola.pipeline.lolcats import lora_delta

    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    yield "model.embeddings.weight", src.get(names["model.embeddings.weight"]).to(dtype)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for dst, name in names.items():
            if not dst.startswith(prefix):
                continue
            t = src.get(name)
            proj = dst[len(prefix):].removeprefix("attn.").removesuffix("_proj.weight")
            if (i, proj) in lora and dst.endswith("_proj.weight") and ".attn." in dst:
                a, b = lora[(i, proj)]["A"], lora[(i, proj)]["B"]
                t = t.to(torch.promote_types(t.dtype, torch.float32)) + lora_delta(a, b, lora_alpha)
            yield dst, t.to(dtype)
        fmap = lolcats_feature_map_init((config.num_heads, config.head_dim, config.feature_dim), generator)
        entry = attn.get(i, {})
        q = entry.get("q", fmap)
        yield prefix + "attn.feature_map_q.weight", q.to(dtype)
        yield prefix + "attn.feature_map_k.weight", entry.get("k", q if "q" in entry else fmap).to(dtype, copy=True)
        wf = entry.get("window_factors", torch.full((config.num_heads,), LOLCATS_WINDOW_FACTOR_INIT))
        yield prefix + "attn.window_factors", wf.reshape(-1).to(dtype)
    yield "model.norm.weight", src.get(names["model.norm.weight"]).to(dtype)
    if "lm_head.weight" in names:
        yield "lm_head.weight", src.get(names["lm_head.weight"]).to(dtype)


def _write_shards(tensors, out: Path, max_shard_bytes: int, progress: bool, total: int) -> None:
    from tqdm.auto import tqdm

    shard: dict[str, torch.Tensor] = {}
    size = 0
    files: list[list[str]] = []
    total_size = 0

    def flush():
        nonlocal shard, size
        if shard:
            save_file(shard, out / f"shard-{len(files):05d}.tmp", metadata={"format": "pt"})
            files.append(list(shard))
            shard, size = {}, 0

    for name, t in tqdm(tensors, total=total, desc="convert", unit="tensor", disable=not progress, mininterval=2):
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous()
        size += nbytes
        total_size += nbytes
    flush()
    if len(files) == 1:
        os.rename(out / "shard-00000.tmp", out / "model.safetensors")
        return
    weight_map = {}
    for k, keys in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        os.rename(out / f"shard-{k:05d}.tmp", out / fname)
        weight_map.update({key: fname for key in keys})
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def atomic_output_dir(out: str | os.PathLike):
    """A context manager yielding a temporary directory that becomes ``out`` on success and vanishes on failure."""
    import contextlib

    out = Path(out)
    if out.exists():
        raise ValueError(f"OUT {str(out)!r} already exists; choose a new directory")
    if not out.parent.is_dir():
        raise ValueError(f"the parent of OUT, {str(out.parent)!r}, is not a directory")

    @contextlib.contextmanager
    def cm():
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            yield tmp
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return cm()


def copy_tokenizer_files(src: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Copy the tokenizer and generation files of a checkpoint directory; returns the names copied."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(out) / name)
            copied.append(name)
    return copied


def convert_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    window_size: int,
    cache_size: int,
    feature_dim: int | None = None,
    dtype: str | torch.dtype | None = None,
    lolcats_attn: str | os.PathLike | None = None,
    lolcats_finetune: str | os.PathLike | None = None,
    lora_alpha: float = 16.0,
    seed: int | None = 0,
    max_shard_size: int = 2 * 2**30,
    progress: bool = True,
    **lola,
) -> Path:
    """Convert the transformers checkpoint directory ``src`` into the LoLA model directory ``out``.

    Args:
        window_size, cache_size, feature_dim, **lola: the LoLA settings (see
            :func:`fla_lola.pipeline.convert.lola_config_from`). ``feature_dim`` defaults to the width of the LoLCATs
            feature maps given, else 64; one that disagrees with them is refused.
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` (default: the source config's dtype, else float32).
        lolcats_attn: a LoLCATs stage-1 checkpoint (feature maps, window factors): loaded, and ``mix`` set to
            ``"lolcats"`` as it was trained.
        lolcats_finetune: a LoLCATs stage-2 checkpoint (peft LoRA on q/k/v/o): merged, ``W + alpha/r · B @ A``.
        lora_alpha: LoRA's alpha (LoLCATs' default 16; ``r`` is read from the tensors).
        seed: seeds the initial feature maps (those a stage-1 checkpoint does not give).
        max_shard_size: bytes per safetensors shard.

    Raises:
        ValueError: missing or malformed ``src``, an existing ``out``, an unsupported architecture (naming the
            config field), a checkpoint that does not match the model. ``out`` is then not created.
    """
    from transformers import AutoConfig

    from fla_lola.pipeline.lolcats import lolcats_feature_dim

    check_source_dir(src)
    teacher_config = AutoConfig.from_pretrained(str(src))
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    if dtype is None:
        source_dtype = getattr(teacher_config, "dtype", None)
        dtype = getattr(torch, source_dtype) if isinstance(source_dtype, str) else (source_dtype or torch.float32)
    if lolcats_attn is not None:
        lola.setdefault("mix", "lolcats")
    lolcats_attn, lolcats_finetune = _read_optional(lolcats_attn) or None, _read_optional(lolcats_finetune) or None
    if feature_dim is None:
        feature_dim = lolcats_feature_dim(lolcats_attn or {}, lolcats_finetune or {}) or 64
    config = lola_config_from(teacher_config, window_size=window_size, cache_size=cache_size,
                              feature_dim=feature_dim, **lola)
    config.dtype = dtype
    config.architectures = ["LoLAForCausalLM"]
    src_ckpt = SourceCheckpoint(src)
    names, attn, lora = plan_conversion(src_ckpt, config, lolcats_attn, lolcats_finetune, lora_alpha)
    total = len(names) + 3 * config.num_hidden_layers
    with atomic_output_dir(out) as tmp:
        config.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        _write_shards(_tensors(src_ckpt, config, names, attn, lora, lora_alpha, dtype, seed), tmp,
                      max_shard_size, progress, total)
    return Path(out)


def distill_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    data: list[str],
    *,
    window_size: int,
    cache_size: int,
    feature_dim: int = 64,
    steps: int = 1000,
    batch_size: int = 8,
    seq_len: int = 1024,
    lr: float = 1e-2,
    save_every: int = 100,
    resume: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    seed: int = 0,
    progress: bool = True,
    text_field: str = "text",
    split: str = "train",
    max_documents: int | None = None,
):
    """Attention transfer (LoLCATs stage 1) of the teacher checkpoint ``src``; the student is saved to ``out``.

    The student is ``src`` converted (:func:`fla_lola.pipeline.convert.convert_to_lola`); its feature maps and mixing
    logits are fitted to the teacher's attention outputs on ``data`` (the ``--data`` sources of
    :mod:`fla_lola.pipeline.data`, read with ``text_field``, ``split``, at most ``max_documents`` documents) for
    ``steps`` AdamW steps of ``batch_size`` sequences (the global batch: under ``accelerate launch`` each of the
    ``W`` processes takes ``batch_size / W`` of them). Every ``save_every`` steps the trainable tensors and the
    optimizer state go to ``checkpoint_dir`` (default ``OUT.ckpt``); ``resume=True`` continues from there and
    gives what an uninterrupted run gives. ``out`` appears only when training finished (written to a temporary
    directory, then renamed); the checkpoint directory is then removed. Returns the student (every process).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fla_lola.pipeline.convert import convert_to_lola
    from fla_lola.pipeline.data import TokenChunks, read_documents
    from fla_lola.pipeline.distill import attention_transfer
    from fla_lola.pipeline.lolcats import load_lolcats_checkpoint, lolcats_state_dict

    SourceCheckpoint(src)  # clear errors for a missing / malformed SRC
    out = Path(out)
    if out.exists():
        raise ValueError(f"OUT {str(out)!r} already exists; choose a new directory")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("save_every", save_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if batch_size % world:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of processes ({world})")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else out.parent / (out.name + ".ckpt")
    ckpt_file = ckpt_dir / "distill_state.pt"
    settings = dict(window_size=window_size, cache_size=cache_size, feature_dim=feature_dim, steps=steps,
                    batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed, world=world)
    state = None
    if resume:
        if not ckpt_file.is_file():
            raise ValueError(f"--resume: no checkpoint at {str(ckpt_file)!r}")
        state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
        changed = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
        if changed:
            raise ValueError(f"--resume: the checkpoint was made with other settings (saved, now): {changed}")
    elif ckpt_file.exists():
        raise ValueError(f"a checkpoint of an earlier run exists at {str(ckpt_file)!r}: pass --resume, or remove it")

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    chunks = TokenChunks(read_documents(data, text_field=text_field, split=split, max_documents=max_documents),
                         tokenizer, seq_len)
    torch_dtype = DTYPES[dtype] if dtype else None
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch_dtype, attn_implementation="sdpa")
    student = convert_to_lola(teacher, seed=seed, window_size=window_size, cache_size=cache_size,
                              feature_dim=feature_dim)
    start = 0
    if state is not None:
        load_lolcats_checkpoint(student, state["trainable"], mix=None)
        start = state["step"]
    local = batch_size // world

    def save(step, opt):
        if step % save_every and step != steps:
            return
        if rank == 0:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_file.with_suffix(".tmp")
            torch.save({"step": step, "settings": settings, "trainable": lolcats_state_dict(student),
                        "optimizer": opt.state_dict()}, tmp)
            os.replace(tmp, ckpt_file)

    attention_transfer(student, teacher, lambda j: chunks.batch(j, local), steps=steps, lr=lr, progress=progress,
                       start_step=start, optimizer_state=state["optimizer"] if state else None, on_step=save)
    if rank == 0:
        with atomic_output_dir(out) as tmp:
            student.save_pretrained(tmp)
            copy_tokenizer_files(src, tmp)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return student


__all__ = ["SourceCheckpoint", "distill_checkpoint", "atomic_output_dir", "convert_checkpoint", "copy_tokenizer_files", "plan_conversion"]
