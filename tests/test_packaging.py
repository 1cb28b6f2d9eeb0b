"""The install layout, and the package used from a checkout's root.

`kernels/` and `registry/` live at the top of the repository but install inside the package. From the root, Python
puts the checkout first on `sys.path`, so the folder `kernels/` is also found as a top-level `kernels`: the name of
the Hugging Face Hub's package that transformers >= 5.25 imports. Everything a user runs from the root must work
whether or not that package is installed; both cases run here (the second hides it behind an overlay of
site-packages that leaves it out).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HUB_KERNELS_INSTALLED = any(d.metadata['Name'] == 'kernels' for d in importlib.metadata.distributions())


def run_outside_repo(code: str) -> subprocess.CompletedProcess:
    """Runs Python from an empty folder, so only what pip installed is importable (not the checkout)."""
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([sys.executable, '-c', code], cwd=cwd, capture_output=True, text=True, timeout=300)


def site_without_hub_kernels(tmp_path: Path) -> Path:
    """A folder of links to every entry of site-packages except the Hub's `kernels` and its metadata."""
    site = Path(sysconfig.get_paths()['purelib'])
    overlay = tmp_path / 'site-packages'
    overlay.mkdir()
    for entry in site.iterdir():
        if entry.name != 'kernels' and not (entry.name.startswith('kernels-') and entry.name.endswith('.dist-info')):
            (overlay / entry.name).symlink_to(entry)
    return overlay


# `python -S -c LAUNCH -m MODULE ARGS` / `... -c CODE`: Python without site-packages, then the overlay added as a site
# dir (its .pth files, our editable install's finder among them, run as usual), then the module or code run as
# `python -m` / `python -c` would, with the current directory first on sys.path
LAUNCH = ("import runpy, site, sys; site.addsitedir({site!r}); mode, target, *rest = sys.argv[1:]; "
          "sys.argv = [mode if mode == '-c' else target, *rest]; "
          "runpy.run_module(target, run_name='__main__', alter_sys=True) if mode == '-m' else exec(target)")


@pytest.fixture(params=['hub kernels installed', 'hub kernels absent'])
def python_at_root(request, tmp_path):
    """``python ARGS`` as run from the repository root, with or without the Hub's `kernels` package."""
    if request.param == 'hub kernels installed':
        if not HUB_KERNELS_INSTALLED:
            pytest.skip("the Hub's `kernels` package is not installed in this environment")
        prefix = [sys.executable]
    else:
        overlay = site_without_hub_kernels(tmp_path)
        prefix = [sys.executable, '-S', '-c', LAUNCH.format(site=str(overlay))]

    def run(*args: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
        return subprocess.run([*prefix, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    run.hub_kernels = request.param == 'hub kernels installed'
    return run


def test_import_and_the_hub_kernels_name_from_the_repository_root(python_at_root):
    r = python_at_root('-c', 'import fla_lola, fla_lola.kernels, fla_lola.registry, transformers.modeling_utils\n'
                             'from transformers.utils import is_kernels_available\n'
                             'assert fla_lola.kernels.__name__ == "fla_lola.kernels", fla_lola.kernels\n'
                             'assert callable(fla_lola.kernels.triton_lola_attention)\n'
                             'import kernels\n'
                             'print(is_kernels_available(), kernels.__file__, [n for n in dir(kernels) if n[0] != "_"])')
    assert r.returncode == 0, r.stderr
    available, origin, names = r.stdout.strip().splitlines()[-1].split(' ', 2)
    if python_at_root.hub_kernels:
        # the top-level name reaches the Hub's package, never this checkout's folder
        assert available == 'True' and not Path(origin).is_relative_to(ROOT / 'kernels') and 'get_kernel' in names, r.stdout
    else:
        # this checkout's folder answers the name with nothing: transformers sees no `kernels` package
        assert available == 'False' and names == '[]', r.stdout


def test_cli_runs_as_a_module_from_the_repository_root(python_at_root):
    r = python_at_root('-m', 'fla_lola.cli', '--help')
    assert r.returncode == 0, r.stderr
    assert 'convert' in r.stdout and 'distill' in r.stdout
    assert r.stderr == '', r.stderr  # no warning a user cannot act on (fla's "Triton is not supported" on a CPU)


def test_env_names_the_versions_that_answered():
    """`fla-lola env` (what `make test` runs first, from the root and from elsewhere) imports everything and prints
    the versions in use."""
    import torch
    import transformers

    r = subprocess.run([sys.executable, '-m', 'fla_lola.cli', 'env'], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f'transformers {transformers.__version__}' in lines and f'torch {torch.__version__}' in lines, lines
    assert f'fla_lola from {ROOT / "fla_lola"}' in lines, lines


def test_accelerate_launch_runs_the_cli_from_the_repository_root():
    """How the README runs multi-process distillation: accelerate launches `python -m fla_lola.cli` from here."""
    env = {**os.environ, 'ACCELERATE_USE_CPU': 'true', 'OMP_NUM_THREADS': '1'}
    env.pop('PYTHONPATH', None)
    r = subprocess.run([sys.executable, '-m', 'accelerate.commands.launch', '--cpu', '--num_processes', '1',
                        '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                        '-m', 'fla_lola.cli', '--help'], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert 'distill' in r.stdout


def test_kernels_and_registry_install_inside_the_package():
    r = run_outside_repo('import fla_lola, fla_lola.kernels, fla_lola.registry; print(fla_lola.kernels.__name__)')
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == 'fla_lola.kernels'


def test_a_wheel_puts_nothing_of_ours_at_the_top_level(tmp_path):
    """A wheel of this checkout holds `fla_lola` and its metadata at the top, nothing else (no `kernels`, `registry`)."""
    source = tmp_path / 'source'  # a copy of what the build reads: setuptools writes build/ beside the sources
    source.mkdir()
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(ROOT / name, source)
    for name in ('fla_lola', 'kernels', 'registry'):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns('__pycache__'))
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
                        '-w', str(tmp_path), str(source)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (wheel,) = tmp_path.glob('*.whl')
    top = {name.split('/')[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {'fla_lola', 'fla_lola-0.1.0.dist-info'}, top
    names = zipfile.ZipFile(wheel).namelist()
    assert 'fla_lola/kernels/chunk.py' in names and 'fla_lola/registry/__init__.py' in names


def test_no_top_level_module_of_ours_after_installing():
    """Outside the checkout, a top-level `kernels` or `registry` is absent or someone else's (the Hub's `kernels`)."""
    for name in ('kernels', 'registry'):
        r = run_outside_repo(f'import importlib.util; s = importlib.util.find_spec({name!r}); '
                             'print(s.origin if s else "")')
        assert r.returncode == 0, r.stderr
        origin = r.stdout.strip()
        assert not origin or not Path(origin).is_relative_to(ROOT / name), f'the top-level `{name}` is our folder: {origin}'


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


def test_the_core_never_imports_the_pipeline():
    """`import fla_lola` (ops, layers, models, registry) loads nothing of `fla_lola.pipeline`."""
    r = run_outside_repo("import sys, fla_lola, fla_lola.kernels\n"
                         "print(sorted(m for m in sys.modules if m.startswith('fla_lola.pipeline')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == '[]', r.stdout


@pytest.mark.parametrize('name', ['convert', 'distill', 'lolcats', 'passkey', 'prefill'])
def test_old_module_paths_are_the_pipeline_modules(name):
    import importlib

    old, new = importlib.import_module(f'fla_lola.{name}'), importlib.import_module(f'fla_lola.pipeline.{name}')
    assert old is new
