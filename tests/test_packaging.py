"""The install layout: kernels/ and registry/ live inside the package, nothing leaks to the top level."""

from __future__ import annotations

import subprocess
import sys
import tempfile


def run_outside_repo(code: str) -> subprocess.CompletedProcess:
    """Runs Python from an empty folder, so only what pip installed is importable (not the checkout)."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_kernels_and_registry_install_inside_the_package():
    r = run_outside_repo('import fla_lola, fla_lola.kernels, fla_lola.registry; print(fla_lola.kernels.__name__)')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'fla_lola.kernels'


def test_no_top_level_kernels_or_registry_module():
    for name in ('kernels', 'registry'):
        r = run_outside_repo(f'import importlib.util, sys; sys.exit(importlib.util.find_spec({name!r}) is not None)')
        assert r.returncode == 0, f'a top-level `{name}` module is importable after installing fla-lola'


def test_the_default_path_needs_no_triton_interpreter():
    code = (
        "import os; os.environ.pop('TRITON_INTERPRET', None)\n"
        "import torch, fla_lola\n"
        "q = torch.randn(1, 9, 2, 4); f = torch.rand(1, 9, 2, 3)\n"
        "o, s = fla_lola.lola_attention(q, q, q, f, f, torch.full((2,), .5), window_size=2, cache_size=2,"
        " output_final_state=True)\n"
        "import sys; assert o.shape == (1, 9, 2, 4) and 'fla_lola.kernels' not in sys.modules\n"
    )
    r = run_outside_repo(code)
    assert r.returncode == 0, r.stderr
