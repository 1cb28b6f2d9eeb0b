"""Input checks and the row layout shared by every LoLA backend."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from fla_lola.ops.state import LoLAState, accumulation_dtype

EPS = 1e-6
MIXES = ('lola', 'lolcats')
SELECTIONS = ('sre', 'loo', 'recency', 'value_norm', 'random')
BACKENDS = ('auto', 'naive', 'torch', 'triton')


@dataclass
class Rows:
    """Where each real token of a call lives: ``N`` independent rows (batch rows or packed sequences).

    ``row[b, t]`` and ``index[b, t]`` give the row of token ``(b, t)`` and its index among that row's
    real tokens in this call (both ``-1`` for padding). ``lengths[r]`` counts row ``r``'s real tokens.
    """

    row: torch.Tensor      # [B, T] int64
    index: torch.Tensor    # [B, T] int64
    lengths: torch.Tensor  # [N] int64

    @property
    def num_rows(self) -> int:
        return self.lengths.shape[0]

    @property
    def valid(self) -> torch.Tensor:
        return self.row >= 0


def token_rows(B: int, T: int, attention_mask: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
               device: torch.device) -> Rows:
    """Maps the tokens of a ``[B, T]`` call onto independent rows (see :class:`Rows`)."""
    t = torch.arange(T, device=device)
    if cu_seqlens is not None:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        row = torch.searchsorted(cu[1:], t, right=True)[None]          # [1, T]
        index = t[None] - cu[row]
        return Rows(row=row, index=index, lengths=cu[1:] - cu[:-1])
    if attention_mask is None:
        row = torch.arange(B, device=device)[:, None].expand(B, T)
        return Rows(row=row.contiguous(), index=t[None].expand(B, T).contiguous(),
                    lengths=torch.full((B,), T, dtype=torch.long, device=device))
    valid = attention_mask.to(device=device) != 0
    index = valid.long().cumsum(1) - 1
    row = torch.arange(B, device=device)[:, None].expand(B, T)
    minus = torch.full_like(index, -1)
    return Rows(row=torch.where(valid, row, minus), index=torch.where(valid, index, minus),
                lengths=valid.long().sum(1))


def _fail(name: str, message: str):
    raise ValueError(f"`{name}`: {message}")


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
    window_size: int,
    cache_size: int,
    scale: float | None,
    mix: str,
    selection: str,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    initial_state: LoLAState | None,
    validate: bool = True,
) -> float:
    """Raises ``ValueError`` naming the first bad argument; returns the softmax scale to use.

    Shapes, dtypes, devices and option values are always checked. With ``validate=True`` the values are
    checked too (NaN/Inf, negative features, mask entries, gate range): one pass over the inputs, which a
    hot decode loop may skip once its inputs are known to be clean.
    """
    check_tensors(q, k, v, fq, fk, gate)
    scale = check_options(q.shape[3], window_size, cache_size, scale, mix, selection)
    N = check_rows(q, attention_mask, cu_seqlens, validate)
    if initial_state is not None:
        check_state(initial_state, N, q.shape[2], k.shape[2], q.shape[3], v.shape[3], fq.shape[3], window_size,
                    cache_size, q.dtype, q.device, validate=validate)
    if validate:
        check_values(q, k, v, fq, fk, gate)
    return scale


def check_tensors(q, k, v, fq, fk, gate) -> None:
    """Types, ranks, dtypes, devices and shapes of the six input tensors."""
    for name, x in (('q', q), ('k', k), ('v', v), ('fq', fq), ('fk', fk)):
        if not isinstance(x, torch.Tensor):
            _fail(name, f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            _fail(name, f"expected 4 dimensions [B, T, heads, dim], got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            _fail(name, f"expected a floating dtype, got {x.dtype}")
        if x.dtype != q.dtype:
            _fail(name, f"dtype {x.dtype} differs from q's dtype {q.dtype}")
        if x.device != q.device:
            _fail(name, f"device {x.device} differs from q's device {q.device}")
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    if k.shape[:2] != (B, T) or k.shape[3] != D:
        _fail('k', f"expected shape [B={B}, T={T}, Hkv, D={D}], got {tuple(k.shape)}")
    if H % Hkv != 0:
        _fail('k', f"num_heads H={H} must be a multiple of num_kv_heads Hkv={Hkv}")
    if v.shape[:3] != (B, T, Hkv):
        _fail('v', f"expected shape [B={B}, T={T}, Hkv={Hkv}, Dv], got {tuple(v.shape)}")
    if fq.shape[:3] != (B, T, H):
        _fail('fq', f"expected shape [B={B}, T={T}, H={H}, F], got {tuple(fq.shape)}")
    if fk.shape != fq.shape:
        _fail('fk', f"expected the shape of fq {tuple(fq.shape)}, got {tuple(fk.shape)}")
    if not isinstance(gate, torch.Tensor) or gate.shape != (H,):
        _fail('gate', f"expected a tensor of shape [H={H}], got "
              f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}")
    if not gate.is_floating_point() or gate.device != q.device:
        _fail('gate', f"expected a floating tensor on {q.device}, got {gate.dtype} on {gate.device}")


def check_options(head_dim: int, window_size, cache_size, scale, mix, selection) -> float:
    """η, λ, the scale (returned, ``head_dim ** -0.5`` by default), ``mix`` and ``selection``."""
    if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
        _fail('window_size', f"must be an int >= 1, got {window_size!r}")
    if isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0:
        _fail('cache_size', f"must be an int >= 0, got {cache_size!r}")
    if scale is None:
        scale = head_dim ** -0.5
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
        _fail('scale', f"must be a finite float > 0, got {scale!r}")
    if mix not in MIXES:
        _fail('mix', f"must be one of {MIXES}, got {mix!r}")
    if selection not in SELECTIONS:
        _fail('selection', f"must be one of {SELECTIONS}, got {selection!r}")
    return float(scale)


def check_rows(q, attention_mask, cu_seqlens, validate: bool) -> int:
    """``cu_seqlens`` or ``attention_mask`` (its entries and padding sides only with ``validate``); returns the
    number of independent rows ``N`` (batch rows, or packed sequences)."""
    B, T = q.shape[:2]
    if cu_seqlens is not None:
        if attention_mask is not None:
            _fail('cu_seqlens', "cannot be combined with attention_mask")
        if B != 1:
            _fail('cu_seqlens', f"requires batch size 1 (sequences packed along T), got B={B}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.is_floating_point():
            _fail('cu_seqlens', "expected a 1-D integer tensor [0, ..., T] with at least 2 entries")
        cu = cu_seqlens.long().cpu()
        if cu[0] != 0 or cu[-1] != T or bool((cu[1:] < cu[:-1]).any()):
            _fail('cu_seqlens', f"must start at 0, never decrease and end at T={T}, got {cu.tolist()}")
        return cu.numel() - 1
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (B, T):
            _fail('attention_mask', f"expected shape [B={B}, T={T}], got "
                  f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask}")
        if attention_mask.device != q.device:
            _fail('attention_mask', f"device {attention_mask.device} differs from q's device {q.device}")
        if validate:
            check_padding(attention_mask)
    return B


def check_padding(m: torch.Tensor) -> None:
    """Mask entries are 0/1 and each row is left- or right-padded."""
    if not bool(((m == 0) | (m == 1)).all()):
        _fail('attention_mask', "entries must be 0 or 1")
    valid = (m != 0).long()
    # one contiguous block of ones touching the start (right padding) or the end (left padding)
    changes = (valid[:, 1:] != valid[:, :-1]).sum(1)
    left = (changes <= 1) & ((valid[:, -1] == 1) | (changes == 0))
    right = (changes <= 1) & ((valid[:, 0] == 1) | (changes == 0))
    if not bool((left | right).all()):
        _fail('attention_mask', "each row must be left- or right-padded (one contiguous block of ones)")


def check_values(q, k, v, fq, fk, gate) -> None:
    """No NaN/Inf anywhere, non-negative features, γ in (0, 1)."""
    for name, x in (('q', q), ('k', k), ('v', v), ('fq', fq), ('fk', fk), ('gate', gate)):
        if x.numel() == 0:
            continue
        # one reduction pass instead of an elementwise isfinite (16x slower on CPU): aminmax propagates NaN, so
        # any NaN or Inf in x shows up in its min or max
        lo, hi = (float(t) for t in torch.aminmax(x.detach()))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            _fail(name, "contains NaN or Inf")
        if name in ('fq', 'fk') and lo < 0:
            _fail(name, "features must be non-negative (the output of a feature map such as softmax)")
    if not bool(((gate > 0) & (gate < 1)).all()):
        _fail('gate', f"mixing weights must lie in (0, 1), got min {gate.min().item():.4g}, "
              f"max {gate.max().item():.4g}")


def check_state(state: LoLAState, N, H, Hkv, D, Dv, F, window_size, cache_size, dtype, device, validate=True):
    """Raises ``ValueError`` naming ``initial_state`` and the offending field unless ``state`` fits the call.

    Shapes, dtypes and devices are always checked. With ``validate=True`` the cache must also be in the
    canonical layout every backend produces and relies on (:class:`LoLAState`): valid slots first, in strictly
    ascending position, before ``seen``; empty slots with position -1 and zero contents. One fused pass over the
    cache and one device-to-host transfer, skipped for a state a backend wrote and nobody changed since
    (:attr:`LoLAState.known_canonical`).
    """
    if not isinstance(state, LoLAState):
        _fail('initial_state', f"expected a LoLAState, got {type(state).__name__}")
    want = dict(batch_size=N, num_heads=H, num_kv_heads=Hkv, head_dim=D, value_dim=Dv, feature_dim=F,
                window_size=window_size, cache_size=cache_size)
    got = {name: getattr(state, name) for name in want}
    if got != want:
        bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
        _fail('initial_state', "was made for other dimensions: " +
              ", ".join(f"{k}={g} (this call needs {w})" for k, (g, w) in bad.items()))
    expected_shapes = {
        'h': (N, H, F, Dv), 's': (N, H, F), 'cache_k': (N, H, cache_size, D), 'cache_v': (N, H, cache_size, Dv),
        'cache_fk': (N, H, cache_size, F), 'cache_pos': (N, H, cache_size), 'window_k': (N, Hkv, 2 * window_size, D),
        'window_v': (N, Hkv, 2 * window_size, Dv), 'window_fk': (N, H, 2 * window_size, F), 'seen': (N,),
    }
    for f in fields(state):
        x = getattr(state, f.name)
        if tuple(x.shape) != expected_shapes[f.name]:
            _fail('initial_state', f"field {f.name} has shape {tuple(x.shape)}, expected {expected_shapes[f.name]}")
        if x.device != device:
            _fail('initial_state', f"field {f.name} is on {x.device}, the inputs on {device}")
    if state.dtype != dtype or state.h.dtype != accumulation_dtype(dtype):
        _fail('initial_state', f"holds {state.dtype} slots and {state.h.dtype} memory; inputs of dtype {dtype} "
              f"need {dtype} slots and {accumulation_dtype(dtype)} memory")
    if validate and state.cache_pos.numel() > 0 and not state.known_canonical:
        check_canonical_cache(state)


def check_canonical_cache(state: LoLAState) -> None:
    """The cache layout of :class:`LoLAState` (see :func:`check_state`); raises naming the field that breaks it."""
    pos = state.cache_pos
    valid = pos >= 0
    empty = ~valid[..., None]
    problems = torch.stack([
        (state.seen < 0).any(),
        (valid[..., 1:] & ~valid[..., :-1]).any(),                    # a valid slot after an empty one
        (valid[..., 1:] & (pos[..., 1:] <= pos[..., :-1])).any(),     # positions not strictly ascending
        (pos < -1).any() | (pos >= state.seen[:, None, None]).any(),  # not -1 nor a consumed position
        (empty & (state.cache_k != 0)).any(),
        (empty & (state.cache_v != 0)).any(),
        (empty & (state.cache_fk != 0)).any(),
        # empty window slots hold zeros too: the chunked path lets them add nothing instead of masking them
        (~state.window_valid[:, None, :, None] & (state.window_k != 0)).any(),
        (~state.window_valid[:, None, :, None] & (state.window_v != 0)).any(),
        (~state.window_valid[:, None, :, None] & (state.window_fk != 0)).any(),
    ]).tolist()
    messages = [
        ('seen', "token counts must be non-negative"),
        ('cache_pos', "valid slots (position >= 0) must come first, then the empty ones (-1)"),
        ('cache_pos', "valid slots must hold strictly ascending positions"),
        ('cache_pos', "entries must be -1 (empty) or a position below the row's `seen`"),
        ('cache_k', "empty cache slots (cache_pos == -1) must be zero"),
        ('cache_v', "empty cache slots (cache_pos == -1) must be zero"),
        ('cache_fk', "empty cache slots (cache_pos == -1) must be zero"),
        ('window_k', "empty window slots (not yet seen) must be zero"),
        ('window_v', "empty window slots (not yet seen) must be zero"),
        ('window_fk', "empty window slots (not yet seen) must be zero"),
    ]
    for bad, (field, message) in zip(problems, messages):
        if bad:
            _fail('initial_state', f"field {field} breaks the canonical cache layout: {message}")


def random_score(pos: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """The "random" selection score: a fixed integer hash of (position, query head) mapped to [0, 1).

    A function of the pair's identity (never of a generator's state), so it is deterministic, identical in
    every backend and invariant to how a sequence is split into calls.
    """
    x = (pos.long() * 0x9E3779B1 + (head.long() + 1) * 0x7FEB352D) & 0x7FFFFFFF
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & 0x7FFFFFFF
    x = ((x ^ (x >> 12)) * 0x297A2D39) & 0x7FFFFFFF
    x = x ^ (x >> 15)
    return x.double() / float(0x80000000)
