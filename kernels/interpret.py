"""A small compatibility layer for running Triton kernels on CPU under ``TRITON_INTERPRET=1``.

Applied once, on import of :mod:`fla_lola.kernels`, and **only** when the environment variable
``TRITON_INTERPRET`` is ``"1"``; on a GPU (variable unset) nothing here runs and Triton is untouched.

Three things stop fla 0.6.0's kernels (and kernels written in fla's style) from running correctly in
Triton 3.x's interpreter:

1. **Autotuning.** With more than one config, :class:`triton.runtime.autotuner.Autotuner` benchmarks
   them through the active GPU driver, which the interpreter does not have ("0 active drivers").
   Fix: :meth:`Autotuner.prune_configs` keeps only the first config that survives the kernel's own
   pruning, so the autotuner takes its single-config path and benchmarks nothing.
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

All three patches are idempotent and can be removed with :func:`restore`.
"""

from __future__ import annotations

import builtins
import functools
import operator
import os

_APPLIED = False
_ORIGINALS: dict = {}
_MISSING = object()


def interpreting() -> bool:
    """``True`` when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


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


def apply() -> bool:
    """Installs the three fixes if ``TRITON_INTERPRET=1``; returns whether they are active."""
    global _APPLIED
    if _APPLIED:
        return True
    if not interpreting():
        return False
    from triton.runtime import autotuner, interpreter

    original_prune = autotuner.Autotuner.prune_configs
    original_call = interpreter.GridExecutor.__call__
    original_dot = interpreter.InterpreterBuilder.create_dot

    @functools.wraps(original_prune)
    def prune_configs(self, kwargs):
        return list(original_prune(self, kwargs))[:1]

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
    def create_dot(self, a, b, d, *args, **kwargs):
        return original_dot(self, _widen_bf16(a), _widen_bf16(b), d, *args, **kwargs)

    _ORIGINALS["prune"] = original_prune
    _ORIGINALS["call"] = original_call
    _ORIGINALS["dot"] = original_dot
    autotuner.Autotuner.prune_configs = prune_configs
    interpreter.GridExecutor.__call__ = call
    interpreter.InterpreterBuilder.create_dot = create_dot
    _APPLIED = True
    return True


def restore() -> None:
    """Undoes :func:`apply`."""
    global _APPLIED
    if not _APPLIED:
        return
    from triton.runtime import autotuner, interpreter

    autotuner.Autotuner.prune_configs = _ORIGINALS.pop("prune")
    interpreter.GridExecutor.__call__ = _ORIGINALS.pop("call")
    interpreter.InterpreterBuilder.create_dot = _ORIGINALS.pop("dot")
    _APPLIED = False
