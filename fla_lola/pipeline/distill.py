"""Attention transfer (LoLCATs stage 1): fit the feature maps and mixing logits of every LoLA layer.

Each LoLA layer of a converted student gets the very input its softmax twin sees in the teacher (the
teacher's hidden states after the layer norm), and is trained so that its output with an empty sparse
cache (λ = 0: LoLCATs' window + linear attention) matches the softmax layer's output in mean squared
error. Only ``feature_map_q``, ``feature_map_k`` and ``window_factors`` train; projections, MLPs and
embeddings stay exactly the teacher's. All layers train at once (each on the teacher's own hidden
states, so no layer waits for another), the way LoLCATs does it.

The loop is plain PyTorch. Under ``accelerate launch`` (when ``accelerate`` is installed) it uses an
``Accelerator``: the trainable layers are wrapped for data parallelism, each process draws its own
batches, and only the main process shows progress, so the same call scales to several GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_lola.layers.lola import LoLAAttention

try:  # optional: multi-process training under `accelerate launch`
    from accelerate import Accelerator
except ImportError:  # pragma: no cover - depends on the environment
    Accelerator = None

TRAINABLE = ("feature_map_q", "feature_map_k", "window_factors")


def lola_layers(model: nn.Module) -> list[LoLAAttention]:
    """The model's LoLA attention layers, in layer order."""
    layers = [m for m in model.modules() if isinstance(m, LoLAAttention)]
    return sorted(layers, key=lambda m: -1 if m.layer_idx is None else m.layer_idx)


def softmax_layers(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a transformers decoder (Llama, Mistral, Qwen2, ...), in layer order."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return [layer.self_attn for layer in decoder.layers]


def trainable_parameters(layers: list[LoLAAttention]) -> list[nn.Parameter]:
    """Feature maps and mixing logits of ``layers``: what attention transfer trains."""
    return [p for m in layers for name, p in m.named_parameters() if name.split(".")[0] in TRAINABLE]


@contextlib.contextmanager
def cache_size(layers: list[LoLAAttention], size: int):
    """Temporarily give every layer a sparse cache of ``size`` (0 during attention transfer)."""
    old = [m.cache_size for m in layers]
    try:
        for m in layers:
            m.cache_size = size
        yield
    finally:
        for m, s in zip(layers, old):
            m.cache_size = s


@torch.no_grad()
def teacher_attention_io(teacher: nn.Module, input_ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run the teacher once; return, per layer, its attention input and output (``[B, T, hidden]`` each)."""
    captured = []

    def hook(module, args, kwargs, output):
        x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        y = output[0] if isinstance(output, tuple) else output
        captured.append((x.detach(), y.detach()))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in softmax_layers(teacher)]
    try:
        teacher(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


class AttentionTransfer(nn.Module):
    """The LoLA layers of a student and the loss that fits them to the teacher's attention outputs."""

    def __init__(self, layers: list[LoLAAttention]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def layer_losses(self, io: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``[L]`` mean squared error of each layer's output against the teacher's, in float32."""
        if len(io) != len(self.layers):
            raise ValueError(f"teacher has {len(io)} attention layers, student has {len(self.layers)}")
        return torch.stack([F.mse_loss(layer(x)[0].float(), y.float()) for layer, (x, y) in zip(self.layers, io)])

    def forward(self, io):
        return self.layer_losses(io).mean()


@torch.no_grad()
def layer_mse(student: nn.Module, teacher: nn.Module, input_ids: torch.Tensor, cache: int = 0) -> list[float]:
    """Per-layer output MSE of the student's LoLA layers (with sparse cache ``cache``) vs. the teacher's."""
    layers = lola_layers(student)
    with cache_size(layers, cache):
        return AttentionTransfer(layers).layer_losses(teacher_attention_io(teacher, input_ids)).tolist()


def attention_transfer(
    student: nn.Module,
    teacher: nn.Module,
    batches: Callable[[int], torch.Tensor] | Iterator[torch.Tensor],
    steps: int,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    log_every: int = 25,
    use_accelerate: bool | None = None,
    start_step: int = 0,
    optimizer_state: dict | None = None,
    on_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> list[float]:
    """Train the student's feature maps and mixing logits for ``steps`` AdamW steps; return the losses.

    Args:
        student: a converted model holding :class:`~fla_lola.layers.LoLAAttention` layers (changed in place;
            its cache sizes are 0 during training and restored afterwards).
        teacher: the softmax model it was converted from (frozen, run without gradients).
        batches: ``batches(i)`` returning the ``[B, T]`` token ids of step ``i`` (each process of a
            multi-process run is given its own indices), or an iterator of such tensors.
        steps: optimizer steps.
        lr: AdamW learning rate (LoLCATs uses 1e-2 for attention transfer).
        use_accelerate: use ``accelerate.Accelerator`` (default: when installed and launched with more than
            one process).
        start_step, optimizer_state: resume at step ``start_step`` (batches are indexed by step, so a resumed
            run sees the data an uninterrupted one would) with the AdamW state saved at that step.
        on_step: called as ``on_step(steps_done, optimizer)`` after every step, on every process (for periodic
            checkpoints).
    """
    from tqdm.auto import tqdm

    if use_accelerate is None:
        use_accelerate = Accelerator is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if use_accelerate and Accelerator is None:
        raise ValueError("use_accelerate=True needs the `accelerate` package")
    accelerator = Accelerator() if use_accelerate else None
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator is not None and world != launched:
        raise ValueError(f"{launched} processes were launched but accelerate runs {world} (no distributed backend: "
                         "on CPU-only machines set ACCELERATE_USE_CPU=true to train with gloo)")

    layers = lola_layers(student)
    if not layers:
        raise ValueError("the student has no LoLAAttention layer")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in student.parameters():
        p.requires_grad_(False)
    params = trainable_parameters(layers)
    for p in params:
        p.requires_grad_(True)

    module = AttentionTransfer(layers)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    if accelerator is not None:
        module, opt = accelerator.prepare(module, opt)
        device = accelerator.device
        teacher.to(device)
    else:
        device = params[0].device

    def next_batch(i):
        if callable(batches):
            return batches(i * world + rank)
        return next(batches)

    losses = []
    bar = tqdm(range(start_step, steps), desc="attention transfer", disable=not progress or rank != 0,
               mininterval=2, initial=start_step, total=steps)
    module.train()
    with cache_size(layers, 0):
        for i in bar:
            io = teacher_attention_io(teacher, next_batch(i).to(device))
            loss = module(io)
            opt.zero_grad(set_to_none=True)
            if accelerator is not None:
                accelerator.backward(loss)
            else:
                loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(mse=f"{loss.item():.3g}")
            if log is not None and rank == 0 and ((i + 1) % log_every == 0 or i + 1 == steps):
                log(f"attention transfer step {i + 1}/{steps} mse {sum(losses[-log_every:]) / len(losses[-log_every:]):.4g}")
            if on_step is not None:
                on_step(i + 1, opt)
    for p in params:
        p.requires_grad_(False)
    student.eval()
    return losses
