"""Counting the calls that make a CUDA program wait for the device (GPU -> CPU synchronisations), on any device.

``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``float(t)``, ``.cpu()``, ``.numpy()`` and ``.nonzero()`` on a
CUDA tensor block the host until the value is computed; on CPU they are free, so a CPU test counts the Python-level
calls instead. (Syncs inside C++ ops, e.g. boolean-mask indexing, are not seen.)
"""

from __future__ import annotations

import collections
import contextlib
import traceback
from pathlib import Path

import torch

SYNCING = ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__', 'cpu', 'numpy', 'nonzero')


@contextlib.contextmanager
def count_host_syncs(exclude=()):
    """Yields a ``Counter`` of ``(method, caller)`` for every syncing call made inside the block.

    ``exclude``: ``(owner, name)`` pairs of callables whose calls are not counted (what they call is not either),
    e.g. the Triton interpreter's kernel launch, which runs the kernel as Python on the host.
    """
    calls = collections.Counter()
    paused = [0]

    def counting(name, method):
        def wrapper(self, *args, **kwargs):
            if not paused[0]:
                frame = traceback.extract_stack(limit=2)[0]   # the caller
                calls[(name, f'{Path(frame.filename).name}:{frame.lineno}')] += 1
            return method(self, *args, **kwargs)
        return wrapper

    def pausing(fn):
        def wrapper(*args, **kwargs):
            paused[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                paused[0] -= 1
        return wrapper

    originals = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in SYNCING]
    originals += [(owner, name, getattr(owner, name)) for owner, name in exclude]
    try:
        for owner, name, fn in originals:
            setattr(owner, name, counting(name, fn) if owner is torch.Tensor and name in SYNCING else pausing(fn))
        yield calls
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)
