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
        assert len(saved['targets']) == 9   # issue 11's (speed, flatness, λ cost, decode, memory: 8) + LOO vs SRE
        assert all(r['state_bytes'] == saved['rows'][0]['state_bytes'] for r in saved['rows'])  # fixed state
    else:
        assert len(saved['targets']) == 4
        kinds = {(r['model'], bool(r['chunk_size'])) for r in saved['rows']}
        assert kinds == {('teacher', False), ('lola', False), ('lola', True)}
        assert all(r['ttft_s'] > 0 and r['decode_ms'] > 0 for r in saved['rows'])
