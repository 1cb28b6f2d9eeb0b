"""The benchmark scripts run end to end in their ``--smoke`` mode (tiny sizes; the figures mean nothing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / 'benchmarks'


def load(name):
    spec = importlib.util.spec_from_file_location(f'bench_{name}', BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name', ['cpu', 'model'])
def test_benchmark_smoke_run_writes_json_png_and_every_target(name, tmp_path):
    threads = torch.get_num_threads()
    result = load(name).main(['--smoke', '--threads', '1', '--json', str(tmp_path / 'r.json'),
                              '--png', str(tmp_path / 'r.png')])
    assert torch.is_grad_enabled() and torch.get_num_threads() == threads  # no global state left behind
    saved = json.loads((tmp_path / 'r.json').read_text())
    assert (tmp_path / 'r.png').stat().st_size > 0
    assert saved['config']['smoke'] and saved['targets'] == json.loads(json.dumps(result['targets']))
    assert all(isinstance(t['met'], bool) and t['value'] == t['value'] for t in saved['targets'])
    if name == 'cpu':
        assert len(saved['targets']) == 10  # issue 11's 8 (speed, flatness, λ cost, decode, memory), LOO, validation
        assert all(r['state_bytes'] == saved['rows'][0]['state_bytes'] for r in saved['rows'])  # fixed state
    else:
        assert len(saved['targets']) == 4
        kinds = {(r['model'], bool(r['chunk_size'])) for r in saved['rows']}
        assert kinds == {('teacher', False), ('lola', False), ('lola', True), ('no_attention', False)}
        assert all(r['ttft_s'] > 0 and r['decode_ms'] > 0 for r in saved['rows'])
        bound = saved['ttft_bound']
        assert bound['target_ttft_s'] == pytest.approx(bound['teacher_ttft_s'] / 4)
        assert bound['attention_budget_s'] == pytest.approx(bound['target_ttft_s'] - bound['no_attention_ttft_s'])


@torch.no_grad()
def test_model_benchmark_no_attention_teacher_mixes_no_tokens():
    """The "shared layers" model of ``benchmarks/model.py`` has no attention: changing earlier tokens leaves a
    position's logits unchanged, while the real teacher's change."""
    bench = load('model')
    ids = torch.randint(3, bench.SMOKE['vocab_size'], (1, 24), generator=torch.Generator().manual_seed(0))
    other = ids.clone()
    other[0, :20] = (other[0, :20] + 1) % bench.SMOKE['vocab_size']
    for kind, mixes in (('no_attention', False), ('teacher', True)):
        model = bench.build(kind, bench.SMOKE, 64, 8, 8)
        a, b = (model(input_ids=x).logits[0, -1] for x in (ids, other))
        assert torch.allclose(a, b) != mixes, kind


def test_every_triton_kernel_compiles_for_hopper_without_a_gpu(tmp_path):
    """``benchmarks/kernel_resources.py --small`` compiles each kernel (prefill select and output passes, decode step)
    in each autotune config for sm_90 through Triton's compiler and ptxas, on a machine with no GPU: the interpreter
    that checks the kernels' numbers elsewhere never compiles them. λ = 32 ≠ η = 16 is the case that once failed to
    compile (a block re-bound with another shape inside an ``if``); every config must fit in shared memory."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    out = tmp_path / 'resources.json'
    proc = subprocess.run([sys.executable, str(BENCH / 'kernel_resources.py'), '--small', '--json', str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())['rows']
    assert not [r for r in rows if r['kernel'] is None], rows
    assert {(r['cache_size'], r['selection'], r['kernel']) for r in rows} == {
        (lam, sel, kernel) for lam in (8, 32) for sel in ('sre', 'loo')
        for kernel in ('lola_fwd_kernel_select', 'lola_fwd_kernel_o', 'lola_decode_kernel')}
    assert len({str(r['config']) for r in rows if r['kernel'] == 'lola_fwd_kernel_o'}) == 4   # every config built
    # ptxas answered for every kernel (spills are reported, not refused: they cost speed, not correctness)
    assert all(r['fits'] and 0 < r['shared_bytes'] and r['registers'] > 0 and r['spill_bytes'] >= 0 for r in rows)


@torch.no_grad()
def test_loo_work_ratio_is_what_the_torch_backend_multiplies():
    """``loo_work_ratio``, printed beside the LOO cost target of ``benchmarks/cpu.py``, is the torch backend's own
    arithmetic: LOO's matmul FLOPs over SRE's per chunk of a prefill, as torch's ``FlopCounterMode`` counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    from fla_lola import lola_attention

    bench = load('cpu')
    H, D, F, eta, lam = 2, 16, 24, 8, 8

    def flops(selection, chunks):
        with FlopCounterMode(display=False) as counter:
            lola_attention(*bench.inputs(chunks * eta, H, D, F, torch.float32), window_size=eta, cache_size=lam,
                           selection=selection, backend='torch', validate=False)
        return counter.get_total_flops()

    # the difference of two lengths is 20 chunks with a boundary after each: what the start does once cancels
    sre, loo = (flops(s, 40) - flops(s, 20) for s in ('sre', 'loo'))
    assert loo > sre > 0
    assert loo / sre == pytest.approx(bench.loo_work_ratio(D, D, F, eta, lam), rel=1e-12)
