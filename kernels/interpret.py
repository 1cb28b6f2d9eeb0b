"""A small compatibility layer for running Triton kernels on CPU under ``TRITON_INTERPRET=1``.

Applied once, on import of :mod:`fla_lola.kernels`, and **only** when the environment variable
``TRITON_INTERPRET`` is ``"1"``; on a GPU (variable unset) nothing here runs and Triton is untouched.

Four things stop fla 0.6.0's kernels (and kernels written in fla's style) from running in Triton 3.x's
interpreter the way they run on a GPU:

1. **Autotuning.** With more than one config, :class:`triton.runtime.autotuner.Autotuner` benchmarks
   them through the active GPU driver, which the interpreter does not have ("0 active drivers").
   Fix: :meth:`Autotuner.prune_configs` keeps one config of those that survive the kernel's own
   pruning, so the autotuner takes its single-config path and benchmarks nothing. Which one is the
   first by default; tests choose config *i* with :func:`use_config` so every config a GPU may pick
   runs under the interpreter too, and :func:`launched_configs` records what ran.
2. **Loop variables.** Compiled Triton turns ``for i in range(n)`` into a loop whose induction variable
   is a ``tl.tensor``; fla calls ``i.to(tl.int64)`` on it. The interpreter runs the kernel as plain
   Python, so ``i`` is a Python ``int`` without ``.to``. Fix: while a kernel runs,
   ``GridExecutor.__call__`` shadows the builtin ``range`` in the kernel's module globals with a
   generator of interpreter scalars (``interpreter._implicit_cvt(i)``), the same objects the interpreter
   makes of scalar kernel arguments. The builtin is restored when the launch ends.
3. **bfloat16 ``tl.dot``.** The interpreter keeps bfloat16 blocks as their ``uint16`` bit patterns (numpy
   has no bfloat16) and ``InterpreterBuilder.create_dot`` multiplies those integers, so every bf16 dot
   returns garbage (fp16 and fp8 are fine). Fix: bfloat16 operands are widened to float32 first (exact:
   the bf16 bits are the top half of the float32 bits), which is what a GPU's bf16 MMA computes: exact
   products accumulated in float32.
4. **TF32.** A GPU multiplies float32 ``tl.dot`` operands in TF32 (10-bit mantissa) unless the dot asks
   for ``input_precision="ieee"`` (Triton's default is ``"tf32"``); the interpreter always multiplies in
   float32, so a kernel that loses precision to TF32 on a GPU passed every interpreter test. Fix: float32
   operands of a ``"tf32"`` dot are rounded to TF32 (round to nearest, ties away, like ``cvt.rna.tf32``)
   before the product, so the interpreter shows the GPU's rounding.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import operator
import os

_APPLIED = False
_MISSING = object()
_CONFIG_INDEX = 0
_LAUNCHED: list[tuple[str, str]] = []


def interpreting() -> bool:
    """``True`` when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@contextlib.contextmanager
def use_config(index: int):
    """Test-only: autotuned kernels launched inside run their config ``index`` (modulo the number of configs
    that survive the kernel's own pruning) instead of the first."""
    global _CONFIG_INDEX
    previous, _CONFIG_INDEX = _CONFIG_INDEX, int(index)
    try:
        yield
    finally:
        _CONFIG_INDEX = previous


def launched_configs() -> list[tuple[str, str]]:
    """``(kernel name, str(config))`` of every autotuned launch so far (test-only bookkeeping)."""
    return list(_LAUNCHED)


def _interpreter_range(*args):
    """``range`` for interpreted kernels: yields interpreter scalars instead of Python ints."""
    from triton.runtime import interpreter

    bounds = [operator.index(a) for a in args]  # interpreter tensors define __index__ while a kernel runs
    for i in builtins.range(*bounds):
        yield interpreter._implicit_cvt(i)


def _widen_bf16(handle):
    """A bfloat16 interpreter block (``uint16`` bits) as the float32 block of the same values."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = np.asarray(handle.data).astype(np.uint32) << 16
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def to_tf32(x):
    """float32 numpy array rounded to TF32 (10 explicit mantissa bits), to nearest with ties away from zero."""
    import numpy as np

    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    finite = np.isfinite(x)
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(finite, rounded, x).astype(np.float32)


def _round_tf32(handle, input_precision):
    import triton.language as tl
    from triton.runtime import interpreter

    if handle.dtype.scalar != tl.float32 or 'TF32' != getattr(input_precision, 'name', str(input_precision)):
        return handle
    return interpreter.TensorHandle(to_tf32(handle.data), tl.float32)


def apply() -> bool:
    """Installs the four fixes if ``TRITON_INTERPRET=1``; returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not interpreting():
        return False
    from triton.runtime import autotuner, interpreter

    original_prune = autotuner.Autotuner.prune_configs
    original_run = autotuner.Autotuner.run
    original_call = interpreter.GridExecutor.__call__
    original_dot = interpreter.InterpreterBuilder.create_dot

    @functools.wraps(original_prune)
    def prune_configs(self, kwargs):
        configs = list(original_prune(self, kwargs))
        config = configs[_CONFIG_INDEX % len(configs)]
        _LAUNCHED.append((getattr(self.base_fn, '__name__', '?'), str(config)))
        return [config]

    @functools.wraps(original_run)
    def run(self, *args, **kwargs):
        self.cache.clear()  # choose again at every launch: use_config may have changed
        return original_run(self, *args, **kwargs)

    @functools.wraps(original_call)
    def call(self, *args, **kwargs):
        env = self.fn.__globals__
        previous = env.get("range", _MISSING)
        env["range"] = _interpreter_range
        try:
            return original_call(self, *args, **kwargs)
        finally:
            if previous is _MISSING:
                env.pop("range", None)
            else:
                env["range"] = previous

    @functools.wraps(original_dot)
    def create_dot(self, a, b, d, input_precision, *args, **kwargs):
        a, b = _widen_bf16(a), _widen_bf16(b)
        a, b = _round_tf32(a, input_precision), _round_tf32(b, input_precision)
        return original_dot(self, a, b, d, input_precision, *args, **kwargs)

    autotuner.Autotuner.prune_configs = prune_configs
    autotuner.Autotuner.run = run
    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_dot = create_dot
    _APPLIED = True
    return True
