"""LoLA's torch backend vs PyTorch SDPA on this CPU, measured in one run.

    python benchmarks/cpu.py [--lengths 1024 4096 16384 65536] [--json out.json] [--png out.png]

B=1, H=8, D=Dv=64, F=128, η=λ=64, float32 by default. For each length: prefill tokens/s of LoLA and of
causal SDPA, the decode step after a T-token prefill (LoLA's fixed state vs SDPA over a T-token KV cache),
state bytes vs KV-cache bytes, and the cost of λ=64 over λ=0. Every time is the median of ``--repeats``
runs after one warm-up; ratios compare numbers from this same run. Targets (issue 3) are printed with the
measured ratio and whether it was met: keep the machine otherwise idle while this runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from fla_lola import lola_attention


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inputs(T, H, D, Fdim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, T, H, D, generator=g, dtype=dtype) for _ in range(3))
    fq, fk = (torch.softmax(torch.randn(1, T, H, Fdim, generator=g), -1).to(dtype) for _ in range(2))
    return q, k, v, fq, fk, torch.full((H,), 0.5, dtype=dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--lengths', type=int, nargs='+', default=[1024, 4096, 16384, 65536])
    ap.add_argument('--sdpa-max-len', type=int, default=16384, help='longest T at which SDPA prefill is timed')
    ap.add_argument('--heads', type=int, default=8)
    ap.add_argument('--head-dim', type=int, default=64)
    ap.add_argument('--feature-dim', type=int, default=128)
    ap.add_argument('--window-size', type=int, default=64)
    ap.add_argument('--cache-size', type=int, default=64)
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--decode-repeats', type=int, default=50)
    ap.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s own choice)')
    ap.add_argument('--json', default=None)
    ap.add_argument('--png', default=None)
    args = ap.parse_args()
    H, D, Fd, eta, lam = args.heads, args.head_dim, args.feature_dim, args.window_size, args.cache_size
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.float32
    rows = []
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; B=1 H={H} D=Dv={D} F={Fd} η={eta} λ={lam}")
    for T in args.lengths:
        q, k, v, fq, fk, gate = inputs(T + 1, H, D, Fd, dtype)
        pre = [x[:, :T] for x in (q, k, v, fq, fk)] + [gate]
        one = [x[:, T:] for x in (q, k, v, fq, fk)] + [gate]

        def lola(cache_size, selection='sre'):
            return lola_attention(*pre, window_size=eta, cache_size=cache_size, output_final_state=True,
                                  selection=selection, backend='torch', validate=False)

        t_lola = median_time(lambda: lola(lam), args.repeats)
        t_lola0 = median_time(lambda: lola(0), args.repeats)
        t_loo = median_time(lambda: lola(lam, 'loo'), args.repeats)
        _, state = lola(lam)
        t_dec = median_time(lambda: lola_attention(*one, window_size=eta, cache_size=lam, initial_state=state,
                                                   output_final_state=True, backend='torch', validate=False),
                            args.decode_repeats)
        qt, kt, vt = (x.transpose(1, 2) for x in pre[:3])
        t_sdpa = median_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), args.repeats) \
            if T <= args.sdpa_max_len else None
        q1 = one[0].transpose(1, 2)
        t_sdpa_dec = median_time(lambda: F.scaled_dot_product_attention(q1, kt, vt), args.decode_repeats)
        kv_bytes = 2 * T * H * D * q.element_size()
        rows.append(dict(
            T=T, lola_tok_s=T / t_lola, lola0_tok_s=T / t_lola0, sdpa_tok_s=None if t_sdpa is None else T / t_sdpa,
            prefill_speedup=None if t_sdpa is None else t_sdpa / t_lola, cache_cost=t_lola / t_lola0,
            loo_tok_s=T / t_loo, loo_cost=t_loo / t_lola,
            lola_decode_ms=t_dec * 1e3, sdpa_decode_ms=t_sdpa_dec * 1e3, decode_speedup=t_sdpa_dec / t_dec,
            state_bytes=state.nbytes(), kv_cache_bytes=kv_bytes,
        ))
        r = rows[-1]
        sdpa_txt = '—' if t_sdpa is None else f"{r['sdpa_tok_s']:.0f}"
        print(f"T={T:>6}: LoLA {r['lola_tok_s']:>8.0f} tok/s (λ=0: {r['lola0_tok_s']:.0f}, "
              f"LOO: {r['loo_tok_s']:.0f}), "
              f"SDPA {sdpa_txt} tok/s; decode {r['lola_decode_ms']:.3f} ms vs "
              f"SDPA {r['sdpa_decode_ms']:.3f} ms; state {r['state_bytes'] / 2**20:.2f} MiB vs KV "
              f"{kv_bytes / 2**20:.1f} MiB", flush=True)

    print("\n| T | LoLA prefill tok/s | SDPA prefill tok/s | ratio | λ=64 / λ=0 time | LoLA decode ms | "
          "SDPA decode ms | ratio | state MiB | KV cache MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sd = '—' if r['sdpa_tok_s'] is None else f"{r['sdpa_tok_s']:.0f}"
        ratio = '—' if r['prefill_speedup'] is None else f"{r['prefill_speedup']:.2f}×"
        print(f"| {r['T']} | {r['lola_tok_s']:.0f} | {sd} | {ratio} | {r['cache_cost']:.2f} | "
              f"{r['lola_decode_ms']:.3f} | {r['sdpa_decode_ms']:.3f} | {r['decode_speedup']:.1f}× | "
              f"{r['state_bytes'] / 2**20:.2f} | {r['kv_cache_bytes'] / 2**20:.1f} |")

    by_t = {r['T']: r for r in rows}
    toks = [r['lola_tok_s'] for r in rows]
    decs = [r['lola_decode_ms'] for r in rows]
    checks = []
    if 16384 in by_t and by_t[16384]['prefill_speedup'] is not None:
        checks.append(('prefill at 16K ≥ 5× SDPA', by_t[16384]['prefill_speedup'], by_t[16384]['prefill_speedup'] >= 5))
    spread = max(toks) / min(toks) - 1
    checks.append(('prefill tok/s flat across lengths within 25 % (max/min - 1)', spread, spread <= 0.25))
    if 16384 in by_t:
        checks.append(('decode ≥ 3× SDPA with a 16K KV cache', by_t[16384]['decode_speedup'],
                       by_t[16384]['decode_speedup'] >= 3))
    dspread = max(decs) / min(decs) - 1
    checks.append(('decode step flat in T (max/min - 1 ≤ 25 %)', dspread, dspread <= 0.25))
    worst = max(r['cache_cost'] for r in rows)
    checks.append((f'λ={lam} costs ≤ 1.5× λ=0 (worst length)', worst, worst <= 1.5))
    loo = max(r['loo_cost'] for r in rows)
    checks.append(('leave-one-out selection prefill ≤ 1.1× SRE (worst length)', loo, loo <= 1.1))
    print()
    for name, value, ok in checks:
        print(f"[{'met' if ok else 'MISSED'}] {name}: {value:.2f}")
    result = dict(config=dict(B=1, H=H, D=D, Dv=D, F=Fd, window_size=eta, cache_size=lam, dtype=str(dtype),
                              threads=torch.get_num_threads(), torch=torch.__version__),
                  rows=rows, targets=[dict(name=n, value=v, met=bool(ok)) for n, v, ok in checks])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    if args.png:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        Ts = [r['T'] for r in rows]
        a1.plot(Ts, toks, 'o-', label=f'LoLA (η=λ={eta})')
        a1.plot(Ts, [r['lola0_tok_s'] for r in rows], 's--', label='LoLA λ=0')
        sd = [(r['T'], r['sdpa_tok_s']) for r in rows if r['sdpa_tok_s']]
        a1.plot(*zip(*sd), '^-', label='SDPA causal')
        a1.set(xscale='log', xlabel='prefill length T', ylabel='tokens / s', title='Prefill throughput (CPU)')
        a2.plot(Ts, decs, 'o-', label='LoLA (fixed state)')
        a2.plot(Ts, [r['sdpa_decode_ms'] for r in rows], '^-', label='SDPA (T-token KV cache)')
        a2.set(xscale='log', yscale='log', xlabel='tokens before the step', ylabel='ms', title='Decode step')
        for a in (a1, a2):
            a.legend()
            a.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == '__main__':
    main()
