"""The repository stands on its own: its documents link only to files it contains, and the lock pins what CI runs."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / 'README.md', *ROOT.glob('docs/*.md')])
SOURCES = sorted(p for d in ('fla_lola', 'kernels', 'registry', 'examples', 'benchmarks', 'tests')
                 for p in (ROOT / d).rglob('*.py'))
LINK = re.compile(r'\]\(([^)\s]+)\)|src="([^"]+)"')


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: p.name)
def test_relative_links_resolve_inside_the_repository(doc):
    for match in LINK.finditer(doc.read_text()):
        target = (match.group(1) or match.group(2)).split('#')[0]
        if not target or re.match(r'[a-z]+:', target):     # a web address or a same-page anchor
            continue
        path = (doc.parent / target).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name} links outside the repository: {target}"
        assert path.exists(), f"{doc.name} links to a missing file: {target}"


def test_nothing_points_outside_the_repository():
    outside = '../' + 'shared'   # spelled in two pieces so this file does not match itself
    for path in [*DOCS, *SOURCES]:
        assert outside not in path.read_text(), f"{path.relative_to(ROOT)} points outside the repository"


def test_the_spec_is_in_the_repository_and_the_reference_cites_it():
    assert (ROOT / 'docs' / 'SPEC.md').is_file()
    assert 'docs/SPEC.md' in (ROOT / 'fla_lola' / 'ops' / 'naive.py').read_text()
    assert '(docs/SPEC.md)' in (ROOT / 'README.md').read_text()


def locked() -> dict[str, str]:
    lines = (ROOT / 'requirements' / 'lock-cpu.txt').read_text().splitlines()
    pins = dict(line.split('==', 1) for line in lines if line and not line.startswith('#'))
    return {re.sub(r'[-_.]+', '-', name).lower(): version for name, version in pins.items()}


def test_the_lock_pins_every_direct_dependency():
    pins = locked()
    for requirement in metadata.requires('fla-lola') or []:
        name = re.sub(r'[-_.]+', '-', re.match(r'[A-Za-z0-9_.-]+', requirement).group(0)).lower()
        assert name in pins, f"requirements/lock-cpu.txt does not pin {name}"


def test_readme_names_the_locked_versions_as_last_tested():
    """The README's "Last tested" line moves with the lock: a refreshed lock without it fails here."""
    pins = locked()
    line = next(l for l in (ROOT / 'README.md').read_text().split('\n\n') if l.startswith('Last tested'))
    for name in ('torch', 'transformers', 'flash-linear-attention', 'triton'):
        assert f"{name} {pins[name]}" in ' '.join(line.split()), (name, pins[name], line)


def test_readme_stays_short():
    """The README is for users: what LoLA is, install, the two commands, one table, quick starts, links. The lab
    notebook (every table, method and measurement) lives in docs/; the README stays within 12,000 characters, counted
    as bytes (`wc -c`, stricter: η, λ and ≤ take two or three)."""
    size = len((ROOT / 'README.md').read_bytes())
    assert size <= 12_000, f"README.md is {size} bytes: move detail into docs/"
