"""LoLA's Triton backend vs PyTorch SDPA and fla's linear attention on one GPU, measured in one run.

    python benchmarks/gpu.py          # the full run: prints every target met/MISSED, writes gpu.json and gpu.png
    python benchmarks/gpu.py [--lengths 1024 ... 65536] [--cache-sizes 64 256] [--json out.json] [--png out.png]
    TRITON_INTERPRET=1 python benchmarks/gpu.py --smoke --json /tmp/x.json     # CPU, seconds: checks the script runs

Without ``--json`` / ``--png`` a full run writes ``benchmarks/gpu.json`` and ``benchmarks/gpu.png`` (a smoke run
writes only what it is asked to).

Shapes (issue 4): bf16, B=1, H=32 (and as many key heads), D=Dv=128, F=128, η=64, λ ∈ {64, 256}, T from 1K to 64K.

Prefill, per length T:
- ``lola_triton``: ``lola_attention(..., backend="triton")`` with the final state, one row per λ;
- ``lola_loo``: the same with ``selection="loo"`` (leave-one-out scores) at the first λ;
- ``sdpa``: ``scaled_dot_product_attention(is_causal=True)`` restricted to the FlashAttention backend;
- ``chunk_linear_attn``: fla's ``fla.ops.linear_attn.chunk_linear_attn`` on the same features (F=128) and values,
  normalized, with its final state;
- ``sliding_window``: fla's ``fla.ops.attn.parallel_attn(window_size=W)``, W = 2η by default (the most keys LoLA's
  window holds: the previous chunk and the current one). ``chunk_linear_attn + sliding_window`` is what the
  LoLCATs-style baseline (terraced window + linear memory) costs when computed by two fla kernels.

Decode step after a T-token prefill (one new token, B=1):
- ``lola_triton``: the single-token kernel over LoLA's fixed-size state (λ cache slots, 2η window, H, s);
- ``sdpa``: the new query against a T-token KV cache (no mask needed);
- ``linear_attn_step``: fla's ``fused_recurrent_linear_attn`` for one token from a [F, Dv] state;
- ``sliding_window``: SDPA of the new query against the last W keys (a window KV cache).

Every time is the median of ``--repeats`` runs after ``--warmup`` runs, timed with CUDA events on a GPU and
``time.perf_counter`` on CPU; peak memory is ``torch.cuda.max_memory_allocated`` during the call minus what was
allocated before it (inputs excluded). Ratios compare numbers from this same run. Targets (issue 4), printed with
the measured value and met/MISSED: LoLA prefill ≤ 1.25× (chunk_linear_attn + sliding_window) at every T; LoLA
prefill ≥ 3× faster than SDPA at 32K; the LoLA decode step flat in T (max/min − 1 ≤ 25 %); (issue 12) the
leave-one-out prefill ≤ 1.1× the self-recall-error prefill at every T. Keep the GPU otherwise
idle while this runs. ``--smoke`` runs tiny shapes (T ∈ {64, 128}, H=2, D=F=16, η=32) on CPU under
``TRITON_INTERPRET=1`` (or on a GPU if there is one): its numbers mean nothing, it checks that the script works.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fla_lola import lola_attention


# method → (what its prefill row times, what its decode row times)
OPS = {
    'lola_triton': ('lola_attention(backend="triton"), T tokens', 'lola_attention(backend="triton"), 1 token'),
    'lola_loo': ('lola_attention(backend="triton", selection="loo"), T tokens',
                 'lola_attention(backend="triton", selection="loo"), 1 token'),
    'sdpa': ('scaled_dot_product_attention(is_causal=True), flash', 'scaled_dot_product_attention, T-token KV cache'),
    'chunk_linear_attn': ('fla chunk_linear_attn(normalize=True)', 'fla fused_recurrent_linear_attn, 1 token'),
    'sliding_window': ('fla parallel_attn(window_size=W)', 'scaled_dot_product_attention, last W keys'),
}


def timer(device):
    """``time(fn, warmup, repeats)`` → median milliseconds."""
    if device.type == 'cuda':
        def time_cuda(fn, warmup, repeats):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)
        return time_cuda

    def time_cpu(fn, warmup, repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    return time_cpu


def peak_mib(fn, device):
    """Peak memory the call allocates on top of what is already allocated (None off CUDA)."""
    if device.type != 'cuda':
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def inputs(T, H, Hkv, D, Fd, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32)

    q = randn(1, T, H, D).to(dtype)
    k, v = randn(1, T, Hkv, D).to(dtype), randn(1, T, Hkv, D).to(dtype)
    fq, fk = (torch.softmax(randn(1, T, H, Fd), -1).to(dtype) for _ in range(2))
    return q, k, v, fq, fk, torch.full((H,), 0.5, dtype=dtype, device=device)


def sdpa_flash(device):
    """Context forcing SDPA's FlashAttention backend on CUDA (CPU: PyTorch's own choice)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if device.type == 'cuda' else nullcontext()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--lengths', type=int, nargs='+', default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    ap.add_argument('--cache-sizes', type=int, nargs='+', default=[64, 256])
    ap.add_argument('--heads', type=int, default=32)
    ap.add_argument('--kv-heads', type=int, default=None, help='key/value heads (default: --heads)')
    ap.add_argument('--head-dim', type=int, default=128)
    ap.add_argument('--feature-dim', type=int, default=128)
    ap.add_argument('--window-size', type=int, default=64, help='η')
    ap.add_argument('--swa-window', type=int, default=None, help='sliding-window baseline window (default 2η)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--repeats', type=int, default=10)
    ap.add_argument('--decode-repeats', type=int, default=50)
    ap.add_argument('--smoke', action='store_true', help='tiny shapes in seconds (CPU under TRITON_INTERPRET=1)')
    ap.add_argument('--json', default=None)
    ap.add_argument('--png', default=None)
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if not args.smoke:
        args.json = args.json or os.path.join(here, 'gpu.json')
        args.png = args.png or os.path.join(here, 'gpu.png')
    if args.smoke:
        args.lengths, args.cache_sizes = [64, 128], [8, 32]
        args.heads, args.kv_heads, args.head_dim, args.feature_dim, args.window_size = 2, 2, 16, 16, 32
        args.warmup, args.repeats, args.decode_repeats = 1, 2, 2

    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if device.type == 'cpu' and os.environ.get('TRITON_INTERPRET') != '1':
        sys.exit('no CUDA device: run on a GPU, or with TRITON_INTERPRET=1 --smoke to check the script on CPU')
    from fla.ops.attn import parallel_attn
    from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn

    H, D, Fd, eta = args.heads, args.head_dim, args.feature_dim, args.window_size
    Hkv = args.kv_heads or H
    W = args.swa_window or 2 * eta
    dtype = torch.bfloat16
    clock = timer(device)
    torch.set_grad_enabled(False)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (Triton interpreter)'
    print(f"{name}; torch {torch.__version__}; bf16 B=1 H={H} Hkv={Hkv} D=Dv={D} F={Fd} η={eta} "
          f"λ∈{args.cache_sizes} sliding window {W}{' [smoke: timings mean nothing]' if args.smoke else ''}")
    from fla_lola import LoLAState
    from fla_lola.kernels.chunk import SNAPSHOT_BUDGET, segment_length
    memory = []
    for lam in args.cache_sizes:
        state = LoLAState.empty(1, H, Hkv, D, D, Fd, eta, lam, dtype=dtype, device='meta').nbytes()
        memory.append(dict(cache_size=lam, state_bytes=state, kv_cache_bytes_per_token=2 * Hkv * D * 2,
                           snapshot_bytes_per_token=4 * H * (Fd * (D + 1) + lam) / eta,
                           prefill_segment_tokens=segment_length(1, H, Fd, D, eta, lam, 4),
                           snapshot_budget_bytes=SNAPSHOT_BUDGET))
        print(f"λ={lam}: state {state / 2**20:.2f} MiB at any T (a bf16 KV cache: {2 * Hkv * D * 2} B/token); prefill "
              f"snapshots {memory[-1]['snapshot_bytes_per_token']:.0f} B/token, at most "
              f"{SNAPSHOT_BUDGET / 2**20:.0f} MiB (prefills over {memory[-1]['prefill_segment_tokens']} tokens run in "
              f"segments)")

    lam0 = args.cache_sizes[0]
    methods = [('lola_triton', lam) for lam in args.cache_sizes] + [('lola_loo', lam0), ('sdpa', None),
                                                                    ('chunk_linear_attn', None),
                                                                    ('sliding_window', None)]
    configs = [(T, m) for T in args.lengths for m in methods]
    rows = []
    cached_T, data = None, None
    for T, (method, lam) in tqdm(configs, desc='configurations', unit='cfg'):
        if T != cached_T:
            data = None
            if device.type == 'cuda':
                torch.cuda.empty_cache()
            data = inputs(T + 1, H, Hkv, D, Fd, dtype, device)
            cached_T = T
        pre = [x[:, :T].contiguous() for x in data[:5]] + [data[5]]
        one = [x[:, T:].contiguous() for x in data[:5]] + [data[5]]
        q, k, v, fq, fk, gate = pre
        q1, k1, v1, fq1, fk1, _ = one

        if method in ('lola_triton', 'lola_loo'):
            lola = dict(window_size=eta, cache_size=lam, selection='loo' if method == 'lola_loo' else 'sre',
                        output_final_state=True, backend='triton', validate=False)

            def prefill():
                return lola_attention(*pre, **lola)
            _, state = prefill()

            def decode():
                return lola_attention(*one, initial_state=state, **lola)
        elif method == 'sdpa':
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
            q1t = q1.transpose(1, 2)
            gqa = dict(enable_gqa=True) if Hkv != H else {}

            def prefill():
                with sdpa_flash(device):
                    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **gqa)

            def decode():
                with sdpa_flash(device):
                    return F.scaled_dot_product_attention(q1t, kt, vt, **gqa)
        elif method == 'chunk_linear_attn':
            vr = v.repeat_interleave(H // Hkv, 2) if Hkv != H else v
            v1r = v1.repeat_interleave(H // Hkv, 2) if Hkv != H else v1

            def prefill():
                return chunk_linear_attn(fq, fk, vr, output_final_state=True, normalize=True)
            (h_state, _) = prefill()[1]

            def decode():
                return fused_recurrent_linear_attn(fq1, fk1, v1r, initial_state=h_state, output_final_state=True)
        else:  # sliding window
            kr, vr = (x.repeat_interleave(H // Hkv, 2) if Hkv != H else x for x in (k, v))

            def prefill():
                return parallel_attn(q, kr, vr, window_size=W)
            q1t = q1.transpose(1, 2)
            kw, vw = (x[:, -W:].transpose(1, 2) for x in (kr, vr))

            def decode():
                with sdpa_flash(device):
                    return F.scaled_dot_product_attention(q1t, kw, vw)

        ops = OPS[method]
        ms = clock(prefill, args.warmup, args.repeats)
        rows.append(dict(kind='prefill', method=method, op=ops[0], cache_size=lam, T=T, ms=ms, tok_s=T / ms * 1e3,
                         peak_mib=peak_mib(prefill, device)))
        ms = clock(decode, args.warmup, args.decode_repeats)
        rows.append(dict(kind='decode', method=method, op=ops[1], cache_size=lam, T=T, ms=ms, tok_s=1 / ms * 1e3,
                         peak_mib=peak_mib(decode, device)))
        del prefill, decode

    def get(kind, method, T, lam=None):
        return next(r for r in rows if (r['kind'], r['method'], r['T'], r['cache_size']) == (kind, method, T, lam))

    lolas = [f'lola_triton λ={lam}' for lam in args.cache_sizes] + [f'lola_loo λ={lam0}']
    for kind in ('prefill', 'decode'):
        print(f"\n{kind} (ms; peak MiB in parentheses; ratios = baseline / LoLA, > 1: LoLA faster)")
        head = lolas + ['sdpa', 'chunk_linear_attn' if kind == 'prefill' else 'linear_attn_step', 'sliding_window']
        head += [f'sdpa / λ={args.cache_sizes[0]}',
                 f'(cla + swa) / λ={args.cache_sizes[0]}' if kind == 'prefill' else f'swa / λ={args.cache_sizes[0]}']
        print('| T | ' + ' | '.join(head) + ' |')
        print('|---' * (len(head) + 1) + '|')
        for T in args.lengths:
            cells = []
            for method, lam in methods:
                r = get(kind, method, T, lam)
                cells.append(f"{r['ms']:.3f}" + ('' if r['peak_mib'] is None else f" ({r['peak_mib']:.0f})"))
            lola = get(kind, 'lola_triton', T, args.cache_sizes[0])['ms']
            cells.append(f"{get(kind, 'sdpa', T)['ms'] / lola:.2f}×")
            other = get(kind, 'sliding_window', T)['ms'] + \
                (get(kind, 'chunk_linear_attn', T)['ms'] if kind == 'prefill' else 0)
            cells.append(f"{other / lola:.2f}×")
            print(f"| {T} | " + ' | '.join(cells) + ' |')

    checks = []
    for lam in args.cache_sizes:
        worst = max(get('prefill', 'lola_triton', T, lam)['ms'] /
                    (get('prefill', 'chunk_linear_attn', T)['ms'] + get('prefill', 'sliding_window', T)['ms'])
                    for T in args.lengths)
        checks.append((f'λ={lam}: prefill ≤ 1.25× (chunk_linear_attn + sliding window), worst T', worst,
                       worst <= 1.25))
        if 32768 in args.lengths:
            speedup = get('prefill', 'sdpa', 32768)['ms'] / get('prefill', 'lola_triton', 32768, lam)['ms']
            checks.append((f'λ={lam}: prefill at 32K ≥ 3× faster than SDPA (flash)', speedup, speedup >= 3))
        decs = [get('decode', 'lola_triton', T, lam)['ms'] for T in args.lengths]
        spread = max(decs) / min(decs) - 1
        checks.append((f'λ={lam}: decode step flat in T (max/min − 1 ≤ 25 %)', spread, spread <= 0.25))
    loo = max(get('prefill', 'lola_loo', T, lam0)['ms'] / get('prefill', 'lola_triton', T, lam0)['ms']
              for T in args.lengths)
    checks.append((f'λ={lam0}: leave-one-out prefill ≤ 1.1× SRE prefill, worst T', loo, loo <= 1.1))
    print()
    for text, value, ok in checks:
        print(f"[{'met' if ok else 'MISSED'}] {text}: {value:.2f}")

    result = dict(config=dict(B=1, H=H, Hkv=Hkv, D=D, Dv=D, F=Fd, window_size=eta, cache_sizes=args.cache_sizes,
                              sliding_window=W, dtype=str(dtype), device=name, torch=torch.__version__,
                              warmup=args.warmup, repeats=args.repeats, decode_repeats=args.decode_repeats,
                              smoke=args.smoke),
                  memory=memory, rows=rows, targets=[dict(name=n, value=v, met=bool(ok)) for n, v, ok in checks])
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=2)
    if args.png:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        series = [('lola_triton', lam, f'LoLA triton λ={lam}', 'o-') for lam in args.cache_sizes] + [
            ('lola_loo', lam0, f'LoLA triton LOO λ={lam0}', 'x:'),
            ('sdpa', None, 'SDPA flash causal', '^-'), ('chunk_linear_attn', None, 'fla chunk_linear_attn', 's--'),
            ('sliding_window', None, f'sliding window {W}', 'd--')]
        for ax, kind in zip(axes, ('prefill', 'decode')):
            for method, lam, label, style in series:
                if kind == 'decode' and method == 'chunk_linear_attn':
                    label = 'fla fused_recurrent_linear_attn (1 token)'
                ax.plot(args.lengths, [get(kind, method, T, lam)['ms'] for T in args.lengths], style, label=label)
            ax.set(xscale='log', yscale='log', xlabel='T (tokens; decode: tokens before the step)', ylabel='ms',
                   title=f'{kind.capitalize()} ({name}, bf16, H={H}, D={D})')
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == '__main__':
    main()
