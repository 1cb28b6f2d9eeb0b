"""LoLA's torch backend vs PyTorch SDPA on this CPU, measured in one run, with issue 11's targets.

    python benchmarks/cpu.py [--lengths 1024 4096 16384 65536] [--threads 2] [--json out.json] [--png out.png]

B=1, H=8, D=Dv=64, F=128, η=λ=64, float32 by default. For each length: prefill tokens/s of LoLA (λ=64 and λ=0)
and of causal SDPA, timed interleaved (one run of each per round, ``--repeats`` rounds, medians); the decode step
after a T-token prefill (LoLA's fixed state updated in place, as the layer does inside ``generate``, vs SDPA over a
T-token KV cache), and again with the states of every length stepped in turn (one block each per round: the
flatness target compares lengths under the same machine conditions); the peak memory of a LoLA prefill (every
allocation replayed from torch.profiler's memory events, so it counts the op's own temporaries and output, not the
inputs) against the bytes of its input tensors; and work counts that do not depend on the machine's load: aten ops
per prefill chunk and per decode step. Every target of
issue 11 is printed with its measured figure as met or MISSED: keep the machine otherwise idle while this runs.
``--smoke`` runs tiny lengths in seconds (the figures then mean nothing; CI checks that the script runs).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fla_lola import lola_attention

# aten ops that only make views (no kernel runs): left out of the "compute ops" count
VIEW_OPS = {'view', 'slice', 'select', 'unsqueeze', 'expand', 'as_strided', 'transpose', '_unsafe_view', 't', 'alias',
            'permute', 'squeeze', 'unflatten', 'detach', 'split', 'unbind', '_reshape_alias'}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a call dispatches (all, and those that run a kernel)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def compute(self) -> int:
        return sum(n for name, n in self.counts.items() if name not in VIEW_OPS)


def count_ops(fn) -> OpCounter:
    with OpCounter() as counter:
        fn()
    return counter


def peak_bytes(fn) -> int:
    """Peak bytes held by the tensors ``fn`` allocates (torch's CPU allocator, replayed from the profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]'),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


DECODE_BLOCK = 16  # decode steps per timed block (a real decode loop runs them back to back)
DECODE_POOL = 256  # distinct tokens the all-lengths decode rounds cycle through (a step's cost ignores their values)


def interleaved_medians(fns: dict, repeats: int, block: int = 1) -> dict:
    """One warm-up each, then ``repeats`` rounds running every function ``block`` times in a row per round;
    median seconds per call. Blocks keep what a call reuses (a decode state) warm in cache, as in a real decode
    loop, while interleaving still spreads machine noise over every function alike: one SDPA step over a 64K KV
    cache streams 256 MB and would otherwise evict LoLA's 1.8 MB state before each of its steps."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(block):
                fn()
            times[name].append((time.perf_counter() - t) / block)
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_time(fn, repeats):
    return interleaved_medians({'f': fn}, repeats)['f']


def inputs(T, H, D, Fdim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, generator=g, dtype=dtype) for _ in range(3))
    fq, fk = (torch.softmax(torch.randn(1, T, H, Fdim, generator=g), -1).to(dtype) for _ in range(2))
    return q, k, v, fq, fk, torch.full((H,), 0.5, dtype=dtype)


def within(values, band):
    """Largest relative deviation from the median, and whether it is within ``band``."""
    med = statistics.median(values)
    dev = max(abs(x / med - 1) for x in values)
    return dev, dev <= band


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--lengths', type=int, nargs='+', default=[1024, 4096, 16384, 65536])
    ap.add_argument('--sdpa-max-len', type=int, default=16384, help='longest T at which SDPA prefill is timed')
    ap.add_argument('--mem-max-len', type=int, default=16384, help='longest T whose peak prefill memory is traced')
    ap.add_argument('--heads', type=int, default=8)
    ap.add_argument('--head-dim', type=int, default=64)
    ap.add_argument('--feature-dim', type=int, default=128)
    ap.add_argument('--window-size', type=int, default=64)
    ap.add_argument('--cache-size', type=int, default=64)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--decode-repeats', type=int, default=50)
    ap.add_argument('--threads', type=int, default=2, help='torch threads (issue 11 measures with 2)')
    ap.add_argument('--smoke', action='store_true', help='tiny sizes, seconds: checks that the script runs')
    ap.add_argument('--json', default=None)
    ap.add_argument('--png', default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.lengths, args.sdpa_max_len, args.mem_max_len = [128, 256], 256, 256
        args.repeats, args.decode_repeats, args.window_size, args.cache_size = 1, 3, 16, 16
    threads = torch.get_num_threads()
    try:  # the caller's thread count and grad mode come back afterwards (the smoke test runs this in process)
        if args.threads:
            torch.set_num_threads(args.threads)
        with torch.no_grad():
            return run(args)
    finally:
        torch.set_num_threads(threads)


def loo_work_ratio(D: int, Dv: int, F: int, eta: int, lam: int) -> float:
    """LoLA LOO's prefill multiply-adds over SRE's in the torch backend. Per chunk and head both do η(2η+λ)(D+Dv+1)
    for attention over W, P and the cache (logits, then values with the ones column), ηF(Dv+1) for the linear
    read-out, (λ+η)F(Dv+1) for the scores and (C−λ)F(Dv+1) = ηF(Dv+1) for the fold; LOO also adds the η new
    candidates to the memory-plus-candidates total it carries (docs/SPEC.md, "Leave-one-out selection"), ηF(Dv+1)
    more: the ratio of the times if every multiply-add cost the same (they do not quite: the boundary's products are
    smaller than attention's, and elementwise work and memory traffic count too)."""
    shared = eta * (2 * eta + lam) * (D + Dv + 1) + (eta + (lam + eta) + eta) * F * (Dv + 1)
    return (shared + eta * F * (Dv + 1)) / shared


def run(args):
    H, D, Fd, eta, lam = args.heads, args.head_dim, args.feature_dim, args.window_size, args.cache_size
    dtype = torch.float32
    rows, states = [], {}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1 H={H} D=Dv={D} F={Fd} η={eta} λ={lam}; "
          f"medians of {args.repeats} interleaved rounds")
    from tqdm import tqdm

    def decode_step(tokens, i, state, validate=False):
        """Token ``i`` of ``tokens`` (q, k, v, φq, φk, gate) into ``state``, updated in place (what the layer does
        under fla's Cache)."""
        lola_attention(*(x[:, i:i + 1] for x in tokens[:5]), tokens[5], window_size=eta, cache_size=lam,
                       initial_state=state, output_final_state=True, inplace_state=True, backend='torch',
                       validate=validate)

    for T in tqdm(args.lengths, desc='lengths'):
        decode_tokens = 2 * (args.decode_repeats + 1) * DECODE_BLOCK + 2  # validated and unvalidated steps
        q, k, v, fq, fk, gate = inputs(T + decode_tokens, H, D, Fd, dtype)
        pre = [x[:, :T] for x in (q, k, v, fq, fk)] + [gate]

        def lola(cache_size, selection='sre'):
            return lola_attention(*pre, window_size=eta, cache_size=cache_size, output_final_state=True,
                                  selection=selection, backend='torch', validate=False)

        qt, kt, vt = (x.transpose(1, 2) for x in pre[:3])
        fns = {'lola': lambda: lola(lam), 'lola0': lambda: lola(0), 'loo': lambda: lola(lam, 'loo')}
        if T <= args.sdpa_max_len:
            fns['sdpa'] = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        t = interleaved_medians(fns, args.repeats)

        # decode: the state updated in place, step after step (what the layer does under fla's Cache)
        _, state = lola(lam)
        step = iter(range(T, T + decode_tokens))

        q1 = q[:, T:T + 1].transpose(1, 2)
        td = interleaved_medians({'lola': lambda: decode_step((q, k, v, fq, fk, gate), next(step), state),
                                  'validated': lambda: decode_step((q, k, v, fq, fk, gate), next(step), state,
                                                                   validate=True),
                                  'sdpa': lambda: F.scaled_dot_product_attention(q1, kt, vt)}, args.decode_repeats,
                                 block=DECODE_BLOCK)
        states[T] = state
        scratch = state.clone()
        ops_step = count_ops(lambda: decode_step((q, k, v, fq, fk, gate), T, scratch, validate=True))
        in_bytes = sum(x.nbytes for x in pre[:5])
        mem = peak_bytes(lambda: lola(lam)) if T <= args.mem_max_len else None
        ops_prefill = count_ops(lambda: lola(lam)) if T == args.lengths[0] else None
        kv_bytes = 2 * T * H * D * q.element_size()
        rows.append(dict(
            T=T, lola_tok_s=T / t['lola'], lola0_tok_s=T / t['lola0'],
            sdpa_tok_s=T / t['sdpa'] if 'sdpa' in t else None,
            prefill_speedup=t['sdpa'] / t['lola'] if 'sdpa' in t else None, cache_cost=t['lola'] / t['lola0'],
            lola_decode_ms=td['lola'] * 1e3, validated_decode_cost=td['validated'] / td['lola'],
            sdpa_decode_ms=td['sdpa'] * 1e3, decode_speedup=td['sdpa'] / td['lola'],
            loo_tok_s=T / t['loo'], loo_cost=t['loo'] / t['lola'],
            decode_ops=ops_step.total, decode_compute_ops=ops_step.compute,
            prefill_ops_per_chunk=None if ops_prefill is None else ops_prefill.total / (T / eta),
            prefill_compute_ops_per_chunk=None if ops_prefill is None else ops_prefill.compute / (T / eta),
            peak_prefill_bytes=mem, input_bytes=in_bytes, state_bytes=state.nbytes(), kv_cache_bytes=kv_bytes,
        ))
        r = rows[-1]
        sdpa_txt = '—' if r['sdpa_tok_s'] is None else f"{r['sdpa_tok_s']:.0f}"
        mem_txt = '—' if mem is None else f"{mem / T:.0f} B/token ({mem / in_bytes:.2f}× inputs)"
        tqdm.write(f"T={T:>6}: LoLA {r['lola_tok_s']:>8.0f} tok/s (λ=0: {r['lola0_tok_s']:.0f}), "
                   f"LOO {r['loo_tok_s']:.0f} tok/s, SDPA {sdpa_txt} tok/s; "
                   f"decode {r['lola_decode_ms']:.3f} ms vs SDPA {r['sdpa_decode_ms']:.3f} ms; peak prefill memory "
                   f"{mem_txt}; state {r['state_bytes'] / 2**20:.2f} MiB vs KV {kv_bytes / 2**20:.1f} MiB")

    # flatness in T: the states of every length stepped in turn, one block each per round, so that the machine's
    # drift over the minutes between lengths does not pass for a dependence on T (a step's work does not depend on
    # T: same state sizes, same op count)
    pool = inputs(DECODE_POOL, H, D, Fd, dtype, seed=1)

    def stepper(state):
        tokens = itertools.cycle(range(DECODE_POOL))
        return lambda: decode_step(pool, next(tokens), state)
    flat = interleaved_medians({r['T']: stepper(states[r['T']]) for r in rows}, args.decode_repeats,
                               block=DECODE_BLOCK)
    for r in rows:
        r['lola_decode_ms_all_t'] = flat[r['T']] * 1e3

    print("\n| T | LoLA prefill tok/s | SDPA prefill tok/s | ratio | λ=64 / λ=0 time | LoLA decode ms | "
          "SDPA decode ms | ratio | LoLA decode ms, all T in turn | peak prefill B/token | state MiB | "
          "KV cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = '—' if r['sdpa_tok_s'] is None else f"{r['sdpa_tok_s']:.0f}"
        ratio = '—' if r['prefill_speedup'] is None else f"{r['prefill_speedup']:.2f}×"
        mem = '—' if r['peak_prefill_bytes'] is None else f"{r['peak_prefill_bytes'] / r['T']:.0f}"
        print(f"| {r['T']} | {r['lola_tok_s']:.0f} | {sd} | {ratio} | {r['cache_cost']:.2f} | "
              f"{r['lola_decode_ms']:.3f} | {r['sdpa_decode_ms']:.3f} | {r['decode_speedup']:.1f}× | "
              f"{r['lola_decode_ms_all_t']:.3f} | {mem} | "
              f"{r['state_bytes'] / 2**20:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} |")
    print(f"\nwork per call: prefill {rows[0]['prefill_ops_per_chunk']:.1f} aten ops per chunk "
          f"({rows[0]['prefill_compute_ops_per_chunk']:.1f} running a kernel); decode step (validated, in place) "
          f"{rows[0]['decode_ops']} ops ({rows[0]['decode_compute_ops']} running a kernel)")

    by_t = {r['T']: r for r in rows}
    ref = 16384 if not args.smoke else args.lengths[-1]
    checks = []
    if ref in by_t and by_t[ref]['prefill_speedup'] is not None:
        checks.append((f'prefill at T={ref} ≥ 8× SDPA', by_t[ref]['prefill_speedup'], '×',
                       by_t[ref]['prefill_speedup'] >= 8))
    dev, ok = within([r['lola_tok_s'] for r in rows], 0.25)
    checks.append((f'prefill tok/s flat within ±25 % of the median, T={rows[0]["T"]}..{rows[-1]["T"]} '
                   '(largest deviation)', 100 * dev, '%', ok))
    worst = max(r['cache_cost'] for r in rows)
    checks.append((f'λ={lam} prefill costs ≤ 1.3× λ=0 (worst length)', worst, '×', worst <= 1.3))
    if ref in by_t:
        checks.append((f'decode step ≥ 10× SDPA with a T={ref} KV cache', by_t[ref]['decode_speedup'], '×',
                       by_t[ref]['decode_speedup'] >= 10))
    dev, ok = within([r['lola_decode_ms_all_t'] for r in rows], 0.15)
    checks.append((f'decode step flat within ±15 % of the median, T={rows[0]["T"]}..{rows[-1]["T"]} '
                   '(every length stepped in turn; largest deviation)', 100 * dev, '%', ok))
    short, long_ = rows[0]['lola_decode_ms_all_t'], rows[-1]['lola_decode_ms_all_t']
    checks.append((f'decode at T={rows[0]["T"]} costs no more than at T={rows[-1]["T"]} (+15 % noise): ratio',
                   short / long_, '×', short <= 1.15 * long_))
    mem_rows = [r for r in rows if r['peak_prefill_bytes'] is not None]
    if len(mem_rows) >= 2:
        a, b = mem_rows[0], mem_rows[-1]
        slope = (b['peak_prefill_bytes'] - a['peak_prefill_bytes']) / (b['T'] - a['T'])
        in_per_token = b['input_bytes'] / b['T']
        checks.append((f'peak prefill memory linear in T: {slope:.0f} bytes/token (slope T={a["T"]}..{b["T"]}), '
                       f'≤ 2× the inputs ({2 * in_per_token:.0f} bytes/token)', slope / in_per_token, '× inputs',
                       slope <= 2 * in_per_token))
        worst = max(r['peak_prefill_bytes'] / r['input_bytes'] for r in mem_rows)
        checks.append(('peak prefill memory ≤ 2× the input tensors at every traced length (worst)', worst,
                       '× inputs', worst <= 2))
    worst = max(r['validated_decode_cost'] for r in rows)
    checks.append(('decode step with the default validate=True ≤ 1.5× validate=False (worst length)', worst, '×',
                   worst <= 1.5))
    loo = max(r['loo_cost'] for r in rows)
    checks.append((f'leave-one-out selection prefill ≤ 1.1× SRE (worst length; its multiply-adds alone are '
                   f'{loo_work_ratio(D, D, Fd, eta, lam):.2f}× SRE\'s here)', loo, '×', loo <= 1.1))
    print()
    for name, value, unit, ok in checks:
        print(f"[{'met' if ok else 'MISSED'}] {name}: {value:.2f}{'' if unit == '%' else ' '}{unit}")
    result = dict(config=dict(B=1, H=H, D=D, Dv=D, F=Fd, window_size=eta, cache_size=lam, dtype=str(dtype),
                              threads=torch.get_num_threads(), torch=torch.__version__, repeats=args.repeats,
                              smoke=args.smoke),
                  rows=rows, targets=[dict(name=n, value=v, unit=u, met=bool(ok)) for n, v, u, ok in checks])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    if args.png:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(14, 4))
        Ts = [r['T'] for r in rows]
        a1.plot(Ts, [r['lola_tok_s'] for r in rows], 'o-', label=f'LoLA (η=λ={eta})')
        a1.plot(Ts, [r['lola0_tok_s'] for r in rows], 's--', label='LoLA λ=0')
        sd = [(r['T'], r['sdpa_tok_s']) for r in rows if r['sdpa_tok_s']]
        a1.plot(*zip(*sd), '^-', label='SDPA causal')
        a1.set(xscale='log', xlabel='prefill length T', ylabel='tokens / s', title='Prefill throughput (CPU)')
        a2.plot(Ts, [r['lola_decode_ms'] for r in rows], 'o-', label='LoLA (fixed state, in place)')
        a2.plot(Ts, [r['lola_decode_ms_all_t'] for r in rows], 'x:', label='LoLA, every T stepped in turn')
        a2.plot(Ts, [r['sdpa_decode_ms'] for r in rows], '^-', label='SDPA (T-token KV cache)')
        a2.set(xscale='log', yscale='log', xlabel='tokens before the step', ylabel='ms', title='Decode step')
        if mem_rows:
            a3.plot([r['T'] for r in mem_rows], [r['peak_prefill_bytes'] / 2**20 for r in mem_rows], 'o-',
                    label='LoLA peak prefill memory')
            a3.plot([r['T'] for r in mem_rows], [r['input_bytes'] / 2**20 for r in mem_rows], 's--',
                    label='input tensors q, k, v, φq, φk')
        a3.set(xscale='log', yscale='log', xlabel='prefill length T', ylabel='MiB', title='Prefill memory')
        for a in (a1, a2, a3):
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return result


if __name__ == '__main__':
    main()
