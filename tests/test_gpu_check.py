"""``benchmarks/gpu_check.py`` (the prepared GPU run, docs/gpu.md) works end to end without a GPU, and every kernel
fits Hopper's shared memory at every supported width."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'benchmarks' / 'gpu_check.py'
STAGES = ('env', 'compile', 'correctness', 'properties', 'benchmark')
STATUSES = {'pass', 'fail', 'timeout', 'skip'}


def gpu_check(tmp_path, *args, env=None, timeout=300):
    proc = subprocess.run([sys.executable, str(SCRIPT), '--out', str(tmp_path), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    records = [json.loads(line) for line in (tmp_path / 'gpu_check.jsonl').read_text().splitlines()]
    for r in records:
        assert {'stage', 'name', 'status', 'seconds'} <= set(r), r
        assert r['stage'] in STAGES and r['status'] in STATUSES and r['seconds'] >= 0, r
        if r['status'] in ('fail', 'timeout'):
            assert r.get('error'), r                                  # a failure says why
        if r['status'] == 'skip':
            assert r.get('reason'), r
    assert proc.returncode == (1 if any(r['status'] in ('fail', 'timeout') for r in records) else 0), proc.stderr
    return proc, records


@pytest.mark.triton
def test_smoke_run_reports_every_stage(tmp_path):
    """``--smoke`` on CPU: every stage writes results as it goes, printed one line each; compile runs for sm_90
    without a GPU, correctness and properties under the interpreter, what needs CUDA is skipped with its reason."""
    proc, records = gpu_check(tmp_path, '--smoke')
    stages = {r['stage'] for r in records}
    assert stages == set(STAGES), stages
    by = {s: [r for r in records if r['stage'] == s] for s in STAGES}
    assert any(r['name'] == 'versions' and r['status'] == 'pass' and r['torch'] for r in by['env'])
    compiled = [r for r in by['compile'] if 'shared_bytes' in r]
    assert compiled and all(r['arch'] == 90 and r['registers'] for r in compiled)
    assert {r['backend'] for r in by['correctness']} == {'triton', 'torch'}
    assert {r['name'].split(' ', 2)[-1] for r in by['correctness']} >= {
        'sre prefill', 'loo prefill', 'sre left padding', 'sre cu_seqlens', 'loo continuation from mid-chunk',
        'sre decode steps after a prefill'}
    assert all('max_error' in r for r in by['correctness'] if r['backend'] == 'torch' and r['status'] != 'skip')
    assert all(r['status'] == 'pass' for r in by['correctness'] if r['backend'] == 'torch' and 'max_error' in r)
    assert any(r['name'].startswith('tests/test_triton.py::') for r in by['properties'])
    assert [r['status'] for r in by['benchmark']] == ['skip']
    assert 'timeout' not in {r['status'] for r in records}
    for r in records:                                                  # one printed line per result
        assert f"[{r['stage']}] {r['status'].upper()}" in proc.stdout
    assert 'gpu_check: ' in proc.stdout.splitlines()[-1] or 'gpu_check: ' in proc.stdout


def test_a_stage_past_its_budget_times_out_and_the_next_still_runs(tmp_path):
    """A stage that hangs (test hook ``GPU_CHECK_HANG``) is killed at its budget with a ``timeout`` result naming
    what it was doing; the stages after it still run and report."""
    proc, records = gpu_check(tmp_path, '--smoke', '--stages', 'correctness', 'benchmark', '--stage-budget',
                              'correctness=4', env={'GPU_CHECK_HANG': 'correctness'}, timeout=120)
    assert [(r['stage'], r['status']) for r in records] == [('correctness', 'timeout'), ('benchmark', 'skip')]
    assert 'hanging on purpose' in records[0]['error']
    assert 3.5 <= records[0]['seconds'] < 30
    assert proc.returncode == 1


HOPPER_SHARED = 232448     # bytes of shared memory per block on sm_90 (H100 / H200)


@pytest.mark.parametrize('width', [64, 128])
def test_every_kernel_fits_hoppers_shared_memory_with_margin(tmp_path, width):
    """bf16 at D = Dv = F = ``width`` (the model widths; 128 is the benchmark's), η = 64 and λ = 256 (the most shared
    memory the output kernel takes: it grows with λ): every kernel in every autotune config compiles for sm_90 on
    this machine and leaves at least 10 % of Hopper's shared memory free, so no config is one the autotuner drops
    and the Triton version's allocation may move without breaking a kernel (it did once: docs/gpu.md)."""
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = tmp_path / 'resources.json'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'kernel_resources.py'), '--head-dim', str(width),
                           '--feature-dim', str(width), '--cache-sizes', '256', '--selections', 'sre', 'loo',
                           '--json', str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result['rows']
    assert result['shared_limit'] == HOPPER_SHARED
    assert {(r['selection'], r['kernel']) for r in rows} == {
        (sel, kernel) for sel in ('sre', 'loo')
        for kernel in ('lola_fwd_kernel_select', 'lola_fwd_kernel_o', 'lola_decode_kernel')}
    over = [(r['selection'], r['kernel'], r['config'], r['shared_bytes']) for r in rows
            if r['shared_bytes'] > 0.9 * HOPPER_SHARED]
    assert not over, over
    assert [c['cache_size'] for c in result['compile_seconds']] == [256, 256]
