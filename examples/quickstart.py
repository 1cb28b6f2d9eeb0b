"""LoLA in a minute: a prefill, a few decode steps, agreement with the reference, state size vs a KV cache.

    python examples/quickstart.py
"""

from __future__ import annotations

import argparse

import torch

from fla_lola import lola_attention, naive_lola_attention


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--seq-len', type=int, default=300)
    ap.add_argument('--decode-steps', type=int, default=8)
    ap.add_argument('--window-size', type=int, default=16)
    ap.add_argument('--cache-size', type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)

    B, T, H, Hkv, D, F = 2, args.seq_len, 4, 2, 32, 32
    n = T + args.decode_steps
    q, k, v = torch.randn(B, n, H, D), torch.randn(B, n, Hkv, D), torch.randn(B, n, Hkv, D)
    # the layer makes these with a learned feature map; any non-negative features will do here
    fq, fk = torch.softmax(torch.randn(B, n, H, F), -1), torch.softmax(torch.randn(B, n, H, F), -1)
    gate = torch.sigmoid(torch.randn(H))
    opts = dict(window_size=args.window_size, cache_size=args.cache_size)

    # prefill, then decode one token at a time, carrying the fixed-size state
    o, state = lola_attention(q[:, :T], k[:, :T], v[:, :T], fq[:, :T], fk[:, :T], gate, **opts,
                              output_final_state=True)
    outs = [o]
    for t in range(T, n):
        o, state = lola_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], fq[:, t:t + 1], fk[:, t:t + 1], gate,
                                  **opts, initial_state=state, output_final_state=True)
        outs.append(o)
    streamed = torch.cat(outs, 1)

    # the spec, literally, in float64 over the whole sequence at once
    ref, ref_state = naive_lola_attention(*(x.double() for x in (q, k, v, fq, fk, gate)), **opts,
                                          output_final_state=True)
    err = (streamed.double() - ref).abs().max().item()
    same_cache = torch.equal(state.cache_pos, ref_state.cache_pos)
    kv_bytes = B * n * Hkv * 2 * D * 4
    print(f"prefill {T} tokens + {args.decode_steps} decode steps, B={B}, H={H} (GQA over {Hkv} kv heads), "
          f"window {args.window_size}, cache {args.cache_size}")
    print(f"max |streamed torch float32 - naive float64| = {err:.2e}; same cached positions: {same_cache}")
    print(f"cached positions of row 0, head 0: {state.cache_pos[0, 0].tolist()}")
    print(f"state {state.nbytes() / 1024:.1f} KiB (fixed) vs a KV cache of {kv_bytes / 1024:.1f} KiB (grows with T)")
    if err > 1e-4 or not same_cache:
        raise SystemExit("mismatch with the reference")


if __name__ == '__main__':
    main()
