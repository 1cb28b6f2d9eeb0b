"""The first minutes on a GPU, prepared: one run with a hard time limit that says what works, even when cut short.

    make gpu-wheels                                   # here, with network: the wheels the GPU machine lacks
    python benchmarks/gpu_check.py --out out/gpu_check              # on the GPU machine (make gpu-check)
    python benchmarks/gpu_check.py --smoke --out /tmp/gc            # CPU, Triton interpreter, tiny shapes (CI)

Stages, run in order, each in its own process with its own time budget (a share of ``--budget``; what a stage
leaves unused goes to the next):

- ``env``: installs, offline and without touching torch, the wheels ``make gpu-wheels`` put in ``--wheels``
  (fla-core, flash-linear-attention) and this package, then records GPU, driver/CUDA, Python, torch, Triton, fla,
  transformers;
- ``compile``: every kernel in every autotune config at the benchmark shapes (bf16, H=32, D=Dv=F=128, η=64,
  λ ∈ {64, 256}, SRE and LOO), compiled for this GPU with ``benchmarks/kernel_resources.py``'s compile-only
  driver: seconds, shared memory, registers, spills per config (this also fills Triton's cache for what follows);
- ``correctness``: the ``triton`` and ``torch`` backends on CUDA against the float64 naive reference on a fixed
  list of named cases (bf16 and float32, H=32/Hkv=8, D=Dv=F=128, η=64, λ=64 and 256, SRE and LOO, left padding,
  ``cu_seqlens``, a continuation from mid-chunk, decode steps after a prefill, and a CUDA graph of the torch decode
  step replayed against eager): max error per case and the bound of ``tests/test_triton.py``'s low-precision test;
- ``properties``: ``tests/test_triton.py`` under pytest with a per-test timeout (pytest-timeout), each test's
  outcome written as it ends (this module is also the pytest plugin that writes them);
- ``benchmark``: ``benchmarks/gpu.py`` at 4K, 16K and 64K, one run per length, its met/MISSED lines as results.

Every result is one JSON object appended to ``OUT/gpu_check.jsonl`` and one line printed as it ends: ``stage``,
``name``, ``status`` (pass / fail / timeout / skip), ``seconds``, and ``error`` or ``max_error`` where there is one.
A stage cut off by its budget is killed and gets a ``timeout`` result naming what it was running; the next stage
still runs. Exit status 0 when nothing failed or timed out.

``--smoke``: on CPU under ``TRITON_INTERPRET=1`` with tiny shapes, every stage: compile runs for sm_90 without a GPU,
correctness and properties under the interpreter, and what needs CUDA (the CUDA graph, the benchmark, the
installation) reports ``skip`` with the reason. ``tests/test_gpu_check.py`` runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ('env', 'compile', 'correctness', 'properties', 'benchmark')
SHARES = dict(env=0.05, compile=0.18, correctness=0.3, properties=0.22, benchmark=0.25)  # of --budget
STATUSES = ('pass', 'fail', 'timeout', 'skip')
DEFAULT_BUDGET = 510          # 8.5 minutes: under the 9 a GPU session's command may run
LENGTHS = (4096, 16384, 65536)
CURRENT = '.gpu_check_current'  # in OUT: what the running stage is doing (named by the timeout result)


# ---- results ---------------------------------------------------------------------------------------------------

def emit(out: Path, stage: str, name: str, status: str, seconds: float, **extra) -> dict:
    """Append one result to ``out/gpu_check.jsonl`` and print it."""
    assert status in STATUSES, status
    record = dict(stage=stage, name=name, status=status, seconds=round(float(seconds), 3), **extra)
    with open(out / 'gpu_check.jsonl', 'a') as f:
        f.write(json.dumps(record, default=str) + '\n')
    detail = ' '.join(f'{k}={v}' for k, v in extra.items() if k not in ('error', 'output') and v is not None)
    if 'error' in extra and extra['error']:
        detail += ' | ' + str(extra['error']).strip().splitlines()[-1][:300]
    print(f"[{stage}] {status.upper():7s} {name} ({record['seconds']:.1f} s) {detail}".rstrip(), flush=True)
    return record


def doing(out: Path, what: str):
    (out / CURRENT).write_text(what)


def timed(out: Path, stage: str, name: str, fn, **extra) -> dict:
    """Run ``fn()`` (returns ``(status, fields)`` or raises): one result, with the exception's text on a raise."""
    doing(out, name)
    t0 = time.perf_counter()
    try:
        status, fields = fn()
    except Exception as e:  # noqa: BLE001  (every failure is a result, the stage goes on)
        status, fields = 'fail', dict(error=f'{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}')
    return emit(out, stage, name, status, time.perf_counter() - t0, **extra, **fields)


def hang_if_asked(stage: str, out: Path):
    """Test hook: ``GPU_CHECK_HANG=<stage>`` makes that stage hang, so its budget must cut it off."""
    if os.environ.get('GPU_CHECK_HANG') == stage:
        doing(out, 'hanging on purpose (GPU_CHECK_HANG)')
        while True:
            time.sleep(1)


# ---- stage: env -----------------------------------------------------------------------------------------------

def pip_install(args: list[str]) -> tuple[str, dict]:
    cmd = [sys.executable, '-m', 'pip', 'install', '--no-deps', '--no-index', '-q', *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode and 'externally-managed' in proc.stderr:
        proc = subprocess.run(cmd + ['--break-system-packages'], capture_output=True, text=True)
    return ('pass' if proc.returncode == 0 else 'fail'), dict(command=' '.join(cmd[2:]),
                                                              error=(proc.stdout + proc.stderr)[-1500:] or None)


def importable(module: str) -> bool:
    return subprocess.run([sys.executable, '-c', f'import {module}'], capture_output=True, cwd='/').returncode == 0


def stage_env(out: Path, smoke: bool, wheels: Path):
    stage = 'env'
    if smoke:
        emit(out, stage, 'install', 'skip', 0, reason='--smoke uses the environment it runs in')
    else:
        fla = sorted(str(p) for p in wheels.glob('*.whl') if p.name.startswith(('fla_core', 'flash_linear')))
        if importable('fla'):
            emit(out, stage, 'install fla', 'skip', 0, reason='fla already importable')
        elif not fla:
            emit(out, stage, 'install fla', 'fail', 0, error=f'no fla wheels in {wheels}: run `make gpu-wheels` '
                                                              'on a machine with network and carry that folder')
        else:
            timed(out, stage, 'install fla', lambda: pip_install(fla))
        if importable('fla_lola.kernels'):
            emit(out, stage, 'install fla-lola', 'skip', 0, reason='fla_lola already importable')
        else:   # setuptools and wheel for the build come from the same folder (make gpu-wheels)
            timed(out, stage, 'install fla-lola', lambda: pip_install(['--find-links', str(wheels), '-e', str(ROOT)]))

    def versions():
        import platform

        import torch
        import triton
        found = dict(python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
                     triton=triton.__version__)
        for name in ('fla', 'transformers', 'fla_lola'):
            try:
                found[name] = __import__(name).__version__
            except Exception as e:  # noqa: BLE001
                found[name] = f'not importable: {type(e).__name__}: {e}'
        bad = [n for n in ('fla', 'fla_lola') if str(found[n]).startswith('not importable')]
        return ('fail' if bad else 'pass'), dict(found, error=f'{bad} not importable' if bad else None)
    timed(out, stage, 'versions', versions)

    def gpu():
        import torch
        if not torch.cuda.is_available():
            return 'skip', dict(reason='no CUDA device (CPU run)')
        p = torch.cuda.get_device_properties(0)
        smi = subprocess.run(['nvidia-smi', '--query-gpu=driver_version,name,memory.total,clocks.max.sm',
                              '--format=csv,noheader'], capture_output=True, text=True)
        return 'pass', dict(device=p.name, capability=f'{p.major}.{p.minor}',
                            memory_gib=round(p.total_memory / 2**30, 1),
                            sm_count=p.multi_processor_count, nvidia_smi=smi.stdout.strip() or smi.stderr.strip())
    timed(out, stage, 'gpu', gpu)


# ---- stage: compile -------------------------------------------------------------------------------------------

def stage_compile(out: Path, smoke: bool):
    stage = 'compile'
    os.environ.pop('TRITON_INTERPRET', None)   # the compiler, not the interpreter (set before Triton is imported)
    import torch
    import kernel_resources as kr

    import fla_lola.kernels  # noqa: F401
    arch = 90
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = 10 * major + minor
    limit = kr.SHARED_LIMIT.get(arch, kr.SHARED_LIMIT[90])
    if smoke:
        shapes = dict(dtype=torch.float32, H=2, Hkv=1, D=16, F=16, eta=8)
        cases = [(4, 'sre')]
    else:
        shapes = dict(dtype=torch.bfloat16, H=32, Hkv=32, D=128, F=128, eta=64)
        cases = [(lam, sel) for lam in (64, 256) for sel in ('sre', 'loo')]
    total = 0.0
    for lam, sel in cases:
        case = f"λ={lam} {sel}"
        doing(out, f'compiling {case} for sm_{arch}')
        t0 = time.perf_counter()
        rows = kr.compile_case(arch, limit, shapes['dtype'], shapes['H'], shapes['Hkv'], shapes['D'], shapes['F'],
                               shapes['eta'], lam, sel, T=3 * shapes['eta'] + 2)
        for r in rows:
            if r['kernel'] is None:
                emit(out, stage, f'{case} compile', 'fail', time.perf_counter() - t0, arch=arch, error=r['error'])
                continue
            total += r['compile_s']
            emit(out, stage, f"{case} {r['kernel']} {r['config']}", 'pass' if r['fits'] else 'fail', r['compile_s'],
                 arch=arch, shared_bytes=r['shared_bytes'], registers=r['registers'], spill_bytes=r['spill_bytes'],
                 error=None if r['fits'] else f"needs {r['shared_bytes']} bytes of shared memory, limit {limit}")
    emit(out, stage, 'total compile seconds', 'pass', total, arch=arch, configs_budget_s=60,
         met=total <= 60)


# ---- stage: correctness ----------------------------------------------------------------------------------------

def correctness_cases(smoke: bool):
    """``(name, dict)`` of the fixed cases: dims, dtype, λ, selection, and what the call does (``kind``)."""
    if smoke:
        dims = dict(H=2, Hkv=1, D=8, F=8, eta=4)
        lams = (2, 6)
    else:
        dims = dict(H=32, Hkv=8, D=128, F=128, eta=64)
        lams = (64, 256)
    eta = dims['eta']
    cases = []
    # --smoke: float32 only (bf16 runs the same kernels; the interpreter pays seconds per call)
    for dtype in ('float32',) if smoke else ('bfloat16', 'float32'):
        for lam in lams:
            for sel in ('sre', 'loo'):
                cases.append((f'{dtype} λ={lam} {sel} prefill', dict(dims, dtype=dtype, lam=lam, sel=sel,
                                                                      kind='prefill', T=lam + 3 * eta + 5)))
        lam = lams[0]
        cases += [
            (f'{dtype} λ={lam} sre left padding', dict(dims, dtype=dtype, lam=lam, sel='sre', kind='padding', B=2,
                                                       T=4 * eta + 3)),
            (f'{dtype} λ={lam} sre cu_seqlens', dict(dims, dtype=dtype, lam=lam, sel='sre', kind='cu_seqlens',
                                                     lengths=(2 * eta + 1, 0, 3 * eta + 7))),
            (f'{dtype} λ={lam} loo continuation from mid-chunk', dict(dims, dtype=dtype, lam=lam, sel='loo',
                                                                      kind='continuation', T=5 * eta + 9,
                                                                      split=2 * eta + eta // 2 + 1)),
            (f'{dtype} λ={lam} sre decode steps after a prefill', dict(dims, dtype=dtype, lam=lam, sel='sre',
                                                                       kind='decode', T=4 * eta + 3, steps=6)),
        ]
    cases.append((f'float32 λ={lams[0]} sre CUDA graph of the torch decode step == eager',
                  dict(dims, dtype='float32', lam=lams[0], sel='sre', kind='cuda_graph', T=3 * eta + 2, steps=4)))
    return cases


def make_inputs(c, device, B=1, T=None):
    import torch
    g = torch.Generator().manual_seed(0)
    T = T or c['T']

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    H, Hkv, D, F = c['H'], c['Hkv'], c['D'], c['F']
    xs = [randn(B, T, H, D), randn(B, T, Hkv, D), randn(B, T, Hkv, D),
          torch.softmax(randn(B, T, H, F), -1), torch.softmax(randn(B, T, H, F), -1),
          torch.rand(H, generator=g, dtype=torch.float64) * 0.9 + 0.05]
    dtype = getattr(torch, c['dtype'])
    return [x.to(dtype) for x in xs]                                   # rounded once: every backend sees these


def run_case(c, backend, xs, device):
    """Outputs ``[.., T, H, Dv]`` of ``backend`` on ``xs`` as the case says (``naive``: the reference loop, in xs'
    dtype, on ``device`` too: on a GPU its per-token loop takes a fraction of a second where the CPU takes ~10 s)."""
    import torch

    from fla_lola import lola_attention, naive_lola_attention
    dev = device
    xs = [x.to(dev) for x in xs]
    kw = dict(window_size=c['eta'], cache_size=c['lam'], selection=c['sel'])

    def call(*tensors, **more):
        if backend == 'naive':
            return naive_lola_attention(*tensors, **kw, **more)
        return lola_attention(*tensors, **kw, backend=backend, **more)

    with torch.no_grad():
        kind = c['kind']
        if kind == 'prefill':
            return call(*xs)[0]
        if kind == 'padding':
            T = xs[0].shape[1]
            mask = torch.ones(xs[0].shape[0], T, dtype=torch.long, device=dev)
            mask[1, :T // 3] = 0
            return call(*xs, attention_mask=mask)[0] * mask[:, :, None, None]
        if kind == 'cu_seqlens':
            cu = torch.tensor([0, *c['lengths']], device=dev).cumsum(0)
            return call(*xs, cu_seqlens=cu)[0]
        if kind in ('continuation', 'decode'):
            T = xs[0].shape[1]
            split = c['split'] if kind == 'continuation' else T - c['steps']
            pieces = [(0, split)] + ([(split, T)] if kind == 'continuation' else [(t, t + 1) for t in range(split, T)])
            state, outs = None, []
            for a, b in pieces:
                o, state = call(*[x[:, a:b] for x in xs[:5]], xs[5], initial_state=state, output_final_state=True)
                outs.append(o)
            return torch.cat(outs, 1)
        raise ValueError(kind)


def inputs_of(c):
    if c['kind'] == 'cu_seqlens':
        return make_inputs(c, None, B=1, T=sum(c['lengths']))
    return make_inputs(c, None, B=c.get('B', 1))


def cuda_graph_case(c, device):
    """The layer's decode call (``lola_attention(..., inplace_state=True, validate=False)``, torch backend) captured
    in a CUDA graph after a prefill, replayed for ``steps`` tokens (a boundary among them) against eager calls on a
    copy of the state: outputs and the final state equal."""
    import torch

    from fla_lola import lola_attention
    if not torch.cuda.is_available():
        return 'skip', dict(reason='needs CUDA (CUDA graph capture)')
    xs = [x.to(device) for x in make_inputs(c, device)]
    T, n = c['T'], c['steps']
    kw = dict(window_size=c['eta'], cache_size=c['lam'], selection=c['sel'], backend='torch', validate=False,
              output_final_state=True)
    with torch.no_grad():
        _, state = lola_attention(*[x[:, :T - n] for x in xs[:5]], xs[5], **kw)
        eager = state.clone()
        static = [x[:, T - n:T - n + 1].clone() for x in xs[:5]]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        warm = state.clone()
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up on a copy (the capture must not advance the real state)
                lola_attention(*static, xs[5], initial_state=warm, inplace_state=True, **kw)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        captured = state.clone()
        with torch.cuda.graph(graph):
            o_static, _ = lola_attention(*static, xs[5], initial_state=captured, inplace_state=True, **kw)
        # the capture recorded the kernels without running them: restore the state it is to start from
        for name, x in vars(state).items():
            if isinstance(x, torch.Tensor):
                getattr(captured, name).copy_(x)
        worst = 0.0
        for t in range(T - n, T):
            for buf, x in zip(static, xs[:5]):
                buf.copy_(x[:, t:t + 1])
            graph.replay()
            o_eager, _ = lola_attention(*[x[:, t:t + 1] for x in xs[:5]], xs[5], initial_state=eager,
                                        inplace_state=True, **kw)
            worst = max(worst, (o_static - o_eager).abs().max().item())
        state_diff = max((getattr(captured, k) - x).abs().max().item() if x.is_floating_point() else
                         float((getattr(captured, k) != x).any())
                         for k, x in vars(eager).items() if isinstance(x, torch.Tensor))
    ok = worst <= 1e-5 and state_diff <= 1e-5          # the same kernels replayed: equal up to library choices
    return ('pass' if ok else 'fail'), dict(max_error=worst, state_max_error=state_diff,
                                            error=None if ok else 'replay differs from eager')


def stage_correctness(out: Path, smoke: bool):
    stage = 'correctness'
    import torch
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    for name, c in correctness_cases(smoke):
        if c['kind'] == 'cuda_graph':
            timed(out, stage, name, lambda: cuda_graph_case(c, device), backend='torch')
            continue
        doing(out, f'{name}: reference')
        t0 = time.perf_counter()
        try:
            xs = inputs_of(c)
            try:
                ref = run_case(c, 'naive', [x.double() for x in xs], device).double().cpu()
                ref_device = device
            except Exception:  # noqa: BLE001  (the reference on CPU then: slower, same numbers)
                ref_device = 'cpu'
                ref = run_case(c, 'naive', [x.double() for x in xs], 'cpu').double()
            own = (run_case(c, 'naive', xs, ref_device).double().cpu() - ref).abs().max().item() \
                if c['dtype'] != 'float64' else 0.0
        except Exception as e:  # noqa: BLE001
            emit(out, stage, name, 'fail', time.perf_counter() - t0, backend='naive',
                 error=f'reference failed: {type(e).__name__}: {e}')
            continue
        eps = torch.finfo(getattr(torch, c['dtype'])).eps
        bound = 2 * own + eps * (2 * ref.abs().max().item() + xs[2].double().abs().max().item()) + 1e-12
        ref_s = time.perf_counter() - t0
        for backend in ('triton', 'torch'):
            def check():
                o = run_case(c, backend, xs, device)
                if device == 'cuda':
                    torch.cuda.synchronize()
                err = (o.double().cpu() - ref).abs().max().item()
                ok = err <= bound
                why = None if ok else f'max error {err:.3g} > bound {bound:.3g}'
                return ('pass' if ok else 'fail'), dict(max_error=err, bound=bound, error=why)
            timed(out, stage, name, check, backend=backend, device=device, reference_s=round(ref_s, 1))


# ---- stage: properties (and the pytest plugin that reports each test) ---------------------------------------------

def pytest_runtest_logstart(nodeid, location):
    out = os.environ.get('GPU_CHECK_OUT')
    if out:
        doing(Path(out), nodeid)


def pytest_runtest_logreport(report):
    """One result per test as it ends: its call phase, or a setup/teardown phase that failed or skipped."""
    out = os.environ.get('GPU_CHECK_OUT')
    if not out or not (report.when == 'call' or report.failed or (report.when == 'setup' and report.skipped)):
        return
    text = str(report.longrepr) if report.longrepr else None
    status = 'pass' if report.passed else 'skip' if report.skipped else \
        'timeout' if text and 'Timeout' in text[-3000:] else 'fail'
    emit(Path(out), 'properties', report.nodeid, status, report.duration,
         phase=report.when, error=text[-2000:] if text and status != 'pass' else None)


def stage_properties(out: Path, smoke: bool, deadline: float):
    import torch
    stage = 'properties'
    cmd = [sys.executable, '-m', 'pytest', '-p', 'no:cacheprovider', '-p', 'gpu_check', '-rA', '-q',
           str(ROOT / 'tests' / 'test_triton.py')]
    env = dict(os.environ, GPU_CHECK_OUT=str(out), HYPOTHESIS_PROFILE='ci',
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get('PYTHONPATH', '')]))
    try:
        import pytest_timeout  # noqa: F401
        cmd += ['--timeout', str(120 if not smoke else 60)]
    except ImportError:
        emit(out, stage, 'per-test timeout', 'skip', 0, reason='pytest-timeout not installed: only the stage '
                                                               'budget bounds a test')
    if smoke:   # the plumbing, in seconds: the quick tests (the whole suite is `make test`'s interpreter group)
        cmd += ['-k', 'refused or fla_chunk_index']
    elif not torch.cuda.is_available():
        emit(out, stage, 'tests/test_triton.py', 'skip', 0, reason='no CUDA device (run with --smoke on CPU)')
        return
    doing(out, 'pytest tests/test_triton.py')
    t0 = time.perf_counter()
    log = open(out / 'properties.log', 'w')
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def tee():   # the whole output to the log, each test's result line to the terminal as it ends
        for line in proc.stdout:
            log.write(line)
            log.flush()
            at = line.find('[properties] ')        # after pytest's progress characters
            if at >= 0:
                print(line[at:], end='', flush=True)
    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.time() - 2))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        emit(out, stage, 'pytest (stage budget)', 'timeout', time.perf_counter() - t0,
             error=f'cut off while running {(out / CURRENT).read_text()}; log in properties.log')
        return
    reader.join(timeout=10)
    log.close()
    tail = (out / 'properties.log').read_text()[-1500:]
    emit(out, stage, 'pytest', 'pass' if rc == 0 else 'fail', time.perf_counter() - t0, returncode=rc,
         error=None if rc == 0 else tail)


# ---- stage: benchmark -----------------------------------------------------------------------------------------

def stage_benchmark(out: Path, smoke: bool, deadline: float):
    import torch
    stage = 'benchmark'
    if not torch.cuda.is_available():
        emit(out, stage, 'benchmarks/gpu.py', 'skip', 0,
             reason='needs CUDA (its interpreter smoke run is tests/test_triton.py::'
                    'test_gpu_benchmark_smoke_mode_writes_valid_json)')
        return
    for T in LENGTHS:
        name = f'benchmarks/gpu.py T={T}'
        doing(out, name)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(HERE / 'gpu.py'), '--lengths', str(T), '--json', str(out / f'gpu_{T}.json'),
               '--png', str(out / f'gpu_{T}.png')]
        log_path = out / f'benchmark_{T}.log'
        with open(log_path, 'w') as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, TQDM_DISABLE='1'), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            for line in proc.stdout:     # the stage's budget kills this whole process group when it runs out
                log.write(line)
                log.flush()
                if line.startswith(('[met]', '[MISSED]')):
                    met = line.startswith('[met]')
                    text = line.split(']', 1)[1].strip()
                    emit(out, stage, f'T={T}: {text.rsplit(":", 1)[0]}', 'pass' if met else 'fail',
                         time.perf_counter() - t0, value=text.rsplit(':', 1)[-1].strip())
            rc = proc.wait()
        emit(out, stage, name, 'pass' if rc == 0 else 'fail', time.perf_counter() - t0, returncode=rc,
             log=log_path.name, error=None if rc == 0 else log_path.read_text()[-1500:])


# ---- the driver ------------------------------------------------------------------------------------------------

def run_stage(stage: str, out: Path, smoke: bool, deadline: float, wheels: Path):
    hang_if_asked(stage, out)
    if stage == 'env':
        stage_env(out, smoke, wheels)
    elif stage == 'compile':
        stage_compile(out, smoke)
    elif stage == 'correctness':
        stage_correctness(out, smoke)
    elif stage == 'properties':
        stage_properties(out, smoke, deadline)
    elif stage == 'benchmark':
        stage_benchmark(out, smoke, deadline)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True, help='folder for gpu_check.jsonl and the logs')
    ap.add_argument('--smoke', action='store_true', help='CPU, Triton interpreter, tiny shapes, every stage')
    ap.add_argument('--budget', type=float, default=None,
                    help=f'seconds for the whole run (default {DEFAULT_BUDGET}; --smoke: 240)')
    ap.add_argument('--stages', nargs='+', default=list(STAGES), choices=STAGES)
    ap.add_argument('--stage-budget', action='append', default=[], metavar='STAGE=SECONDS',
                    help='override one stage\'s budget (repeatable)')
    ap.add_argument('--wheels', default=str(ROOT / '.gpu-wheels'), help='what `make gpu-wheels` downloaded')
    ap.add_argument('--stage', default=None, help=argparse.SUPPRESS)        # internal: run one stage in this process
    ap.add_argument('--deadline', type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.stage:
        run_stage(args.stage, out, args.smoke, args.deadline, Path(args.wheels))
        return 0

    budget = args.budget or (240 if args.smoke else DEFAULT_BUDGET)
    fixed = {k: float(v) for k, v in (s.split('=', 1) for s in args.stage_budget)}
    env = dict(os.environ)
    if args.smoke:
        env['TRITON_INTERPRET'] = '1'
        env.setdefault('OMP_NUM_THREADS', '1')
    (out / 'gpu_check.jsonl').unlink(missing_ok=True)
    print(f'gpu_check: {"smoke, " if args.smoke else ""}budget {budget:.0f} s, results in {out / "gpu_check.jsonl"}',
          flush=True)
    spare = 0.0
    for stage in args.stages:
        share = fixed.get(stage, SHARES[stage] * budget + spare)
        t0 = time.time()
        (out / CURRENT).write_text(f'starting {stage}')
        cmd = [sys.executable, str(Path(__file__).resolve()), '--stage', stage, '--out', str(out),
               '--deadline', str(t0 + share), '--wheels', args.wheels] + (['--smoke'] if args.smoke else [])
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)
        try:
            _, err = proc.communicate(timeout=share)
            if proc.returncode:
                emit(out, stage, f'{stage} (stage process)', 'fail', time.time() - t0, returncode=proc.returncode,
                     error=err[-2000:])
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            emit(out, stage, f'{stage} (stage budget)', 'timeout', time.time() - t0, budget_s=round(share, 1),
                 error=f'cut off after {share:.0f} s while running: {(out / CURRENT).read_text()}')
        spare = max(0.0, share - (time.time() - t0)) if stage not in fixed else spare
    records = [json.loads(line) for line in (out / 'gpu_check.jsonl').read_text().splitlines()]
    counts = {s: sum(r['status'] == s for r in records) for s in STATUSES}
    print('gpu_check: ' + ', '.join(f'{n} {s}' for s, n in counts.items()), flush=True)
    for r in records:
        if r['status'] in ('fail', 'timeout'):
            print(f"  {r['status'].upper()} [{r['stage']}] {r['name']}", flush=True)
    return 1 if counts['fail'] or counts['timeout'] else 0


if __name__ == '__main__':
    sys.exit(main())
