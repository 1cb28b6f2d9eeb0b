"""Compile the Triton backend's kernels for a GPU on any machine, no GPU needed, and report what each one needs.

    python benchmarks/kernel_resources.py              # bf16, H=32, D=Dv=F=128, η=64, λ ∈ {64, 256}, SRE and LOO
    python benchmarks/kernel_resources.py --dtype float64 --head-dim 64 --cache-sizes 64 --selections sre
    python benchmarks/kernel_resources.py --small      # tiny shapes with λ ≠ η, in seconds (what CI runs)

Runs one prefill and one decode step through the backend's own host code (``chunk_lola_fwd``,
``decode_lola_fwd``) with Triton pointed at a stand-in driver that names the target (``--arch``, default
``90``: Hopper, H100/H200) and launches nothing: every kernel is compiled in each of its autotune configs by
Triton's compiler and its bundled ``ptxas``, exactly as a GPU run would compile it, and the CPU tensors are never
read. Prints, per kernel and config, the shared memory a block needs (Hopper allows 232,448 bytes; a config over
it is one the autotuner drops on the GPU), registers per thread and bytes spilled (``ptxas -v``), and compile
seconds (in a fresh Triton cache unless ``--keep-cache``), with, per call (λ, selection), the total over the configs
it may autotune over against the ≤ 60 s target (met/MISSED). Exit status 1 if a kernel fails to compile or none
of its configs fits in shared memory.

Why it exists: the first run on an H200 (2026-11-30) met two faults the interpreter (``TRITON_INTERPRET=1``, how CI
checks the kernels' numbers) cannot see, since it runs the kernels as Python: a kernel that did not compile when
λ ≠ η (a block re-bound with another shape inside an ``if``), and a float64 decode kernel over the shared-memory
limit. Both show up here on a laptop. Run it without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import torch

SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376}  # bytes of shared memory per block, by compute capability


@contextmanager
def compile_only(arch: int):
    """Triton compiles for ``arch`` and launches nothing: yields the list it appends ``(name, config, kernel,
    seconds)`` to, one entry per compiled kernel and autotune config."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime import autotuner, driver, jit

    class StandIn:  # the part of a driver the compile path asks for
        def get_current_target(self):
            return GPUTarget('cuda', arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device('cpu')

    compiled = []
    run, tune = jit.JITFunction.run, autotuner.Autotuner.run

    def compile_run(self, *args, grid, warmup, **kwargs):
        t0 = time.perf_counter()
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)   # compiles, never launches
        config = {k: v for k, v in kwargs.items() if k in ('num_warps', 'num_stages', 'BLK')}
        compiled.append((self.fn.__name__, config, kernel, time.perf_counter() - t0))
        return kernel

    def every_config(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    previous = driver._active  # None on a machine without a GPU driver (`driver.active` would raise there)
    driver.set_active(StandIn())
    jit.JITFunction.run, autotuner.Autotuner.run = compile_run, every_config
    try:
        yield compiled
    finally:
        jit.JITFunction.run, autotuner.Autotuner.run = run, tune
        driver._active = previous


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers per thread and spilled bytes from Triton's bundled ``ptxas -v`` (None where it says nothing)."""
    try:  # the ptxas Triton itself uses for this arch (from sm_90 on, its newer bundled one)
        from triton.backends.nvidia.compiler import get_ptxas
        ptxas = get_ptxas(arch).path
    except (ImportError, AttributeError):
        from triton import knobs
        ptxas = knobs.nvidia.ptxas.path
    target = re.search(r'^\.target\s+(\S+)', ptx, re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        out = subprocess.run([ptxas, '-v', f'-arch={target.group(1) if target else f"sm_{arch}"}', src,
                              '-o', os.path.join(tmp, 'k.cubin')], capture_output=True, text=True)
    text = out.stdout + out.stderr
    regs = re.search(r'Used (\d+) registers', text)
    spill = re.search(r'(\d+) bytes spill stores', text)
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=int(spill.group(1)) if spill else None)


def compile_case(arch, limit, dtype, H, Hkv, D, F, eta, lam, selection, T):
    """Every kernel of a ``T``-token prefill and a decode step, compiled; rows of what each config needs
    (``fits``: within ``limit`` bytes of shared memory)."""
    from fla_lola.kernels.chunk import chunk_lola_fwd
    from fla_lola.kernels.decode import decode_lola_fwd

    q = torch.zeros(1, T, H, D, dtype=dtype)
    k, v = torch.zeros(1, T, Hkv, D, dtype=dtype), torch.zeros(1, T, Hkv, D, dtype=dtype)
    fq, fk = torch.zeros(1, T, H, F, dtype=dtype), torch.zeros(1, T, H, F, dtype=dtype)
    gate = torch.full((H,), 0.5, dtype=dtype)
    kw = dict(window_size=eta, cache_size=lam, scale=D ** -0.5, mix='lola', selection=selection, attention_mask=None)
    case = dict(dtype=str(dtype).removeprefix('torch.'), H=H, Hkv=Hkv, D=D, Dv=D, F=F, window_size=eta,
                cache_size=lam, selection=selection)
    from fla_lola import LoLAState

    def fields(state):  # the state's tensors only (what a kernel reads), without bookkeeping such as its layout mark
        return LoLAState(**{n: x for n, x in vars(state).items() if isinstance(x, torch.Tensor)})
    empty = fields(LoLAState.empty(1, H, Hkv, D, D, F, eta, lam, dtype=dtype))
    with compile_only(arch) as compiled:
        try:
            _, state = chunk_lola_fwd(q, k, v, fq, fk, gate, cu_seqlens=None, initial_state=empty,
                                      output_final_state=True, **kw)
            one = [x[:, :1] for x in (q, k, v, fq, fk)]
            decode_lola_fwd(*one, gate, initial_state=fields(state), output_final_state=True, **kw)
        except Exception as e:  # a compile error names the kernel, line and cause
            return [dict(case, kernel=None, error=f'{type(e).__name__}: {e}'[-1500:])]
    return [dict(case, kernel=name, config=config, shared_bytes=kernel.metadata.shared,
                 fits=kernel.metadata.shared <= limit,
                 compile_s=round(seconds, 2), **ptxas_report(kernel.asm['ptx'], arch))
            for name, config, kernel, seconds in compiled]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--arch', type=int, default=90, help='compute capability × 10 (90: H100/H200)')
    ap.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32', 'float64'])
    ap.add_argument('--heads', type=int, default=32)
    ap.add_argument('--kv-heads', type=int, default=None)
    ap.add_argument('--head-dim', type=int, default=128)
    ap.add_argument('--feature-dim', type=int, default=128)
    ap.add_argument('--window-size', type=int, default=64)
    ap.add_argument('--cache-sizes', type=int, nargs='+', default=[64, 256])
    ap.add_argument('--selections', nargs='+', default=['sre', 'loo'], choices=['sre', 'loo'])
    ap.add_argument('--small', action='store_true', help='H=2 (GQA 2:1), D=F=16, η=16, λ ∈ {8, 32}: seconds')
    ap.add_argument('--json', default=None)
    ap.add_argument('--keep-cache', action='store_true',
                    help="use Triton's own cache (default: a fresh one, so every config is really compiled and timed)")
    ap.add_argument('--compile-budget', type=float, default=60.0,
                    help='seconds the configs one benchmark-shape call may autotune over should compile in')
    args = ap.parse_args(argv)
    if os.environ.get('TRITON_INTERPRET') == '1':
        ap.error('unset TRITON_INTERPRET: the interpreter replaces the compiler this script runs')
    if args.small:
        args.heads, args.kv_heads, args.head_dim, args.feature_dim, args.window_size = 2, 1, 16, 16, 16
        args.cache_sizes = [8, 32]
    if not args.keep_cache:   # before Triton reads it: a cache hit would time nothing
        os.environ['TRITON_CACHE_DIR'] = tempfile.mkdtemp(prefix='kernel_resources_cache_')
    import fla_lola.kernels  # noqa: F401  (fla and the kernels import with the real driver first)

    dtype = getattr(torch, args.dtype)
    eta = args.window_size
    limit = SHARED_LIMIT.get(args.arch, SHARED_LIMIT[90])
    rows = []
    for lam in args.cache_sizes:
        for selection in args.selections:
            rows += compile_case(args.arch, limit, dtype, args.heads, args.kv_heads or args.heads, args.head_dim,
                                 args.feature_dim, eta, lam, selection, T=3 * eta + 2)
    print(f"sm_{args.arch}, {args.dtype}, H={args.heads} Hkv={args.kv_heads or args.heads} D=Dv={args.head_dim} "
          f"F={args.feature_dim} η={eta}; shared-memory limit {limit} bytes per block")
    print('| λ | selection | kernel | config | shared bytes | fits | registers | spilled bytes | compile s |')
    print('|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        if r['kernel'] is None:
            print(f"| {r['cache_size']} | {r['selection']} | COMPILE ERROR | {r['error'][-300:]} |")
            continue
        print(f"| {r['cache_size']} | {r['selection']} | {r['kernel']} | {r['config']} | {r['shared_bytes']} | "
              f"{'yes' if r['fits'] else 'NO'} | {r['registers']} | {r['spill_bytes']} | {r['compile_s']} |")
    failed = [r for r in rows if r['kernel'] is None]
    kernels = {(r['cache_size'], r['selection'], r['kernel']) for r in rows if r['kernel']}
    unfit = sorted(k for k in kernels if not any(r['fits'] for r in rows if
                                                 (r['cache_size'], r['selection'], r['kernel']) == k))
    for k in unfit:
        print(f"[MISSED] λ={k[0]} {k[1]}: {k[2]} has no config within {limit} bytes of shared memory")
    # compile seconds: a call at these shapes (one λ, one selection) compiles every config its kernels may autotune
    # over on its first launch, on the GPU machine's CPU; this machine's seconds stand in for those
    totals = {}
    for r in rows:
        if r['kernel']:
            key = (r['cache_size'], r['selection'])
            totals[key] = totals.get(key, 0) + r['compile_s']
    print(f"\ncompile seconds for sm_{args.arch} (this CPU, fresh cache: {not args.keep_cache}); target: the configs "
          f"one call may autotune over compile in ≤ {args.compile_budget:.0f} s")
    for (lam, selection), total in totals.items():
        n = sum(1 for r in rows if r['kernel'] and (r['cache_size'], r['selection']) == (lam, selection))
        print(f"[{'met' if total <= args.compile_budget else 'MISSED'}] λ={lam} {selection}: {n} configs "
              f"(prefill + decode kernels) compile in {total:.1f} s")
    print(f"all {len(totals)} calls together (what the benchmark's first calls pay): {sum(totals.values()):.1f} s")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(arch=args.arch, shared_limit=limit, rows=rows, compile_seconds=[
                dict(cache_size=lam, selection=sel, seconds=round(t, 2)) for (lam, sel), t in totals.items()],
                           unfit=[list(k) for k in unfit]), f, indent=2, default=str)
    return 1 if failed or unfit else 0


if __name__ == '__main__':
    sys.exit(main())
