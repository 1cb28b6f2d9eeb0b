"""Serving with vLLM: a LoLA model against its softmax teacher, the same weights (issue 31's targets).

The teacher is a random ``LlamaForCausalLM`` of ``benchmarks/model.py``'s shape (hidden 512, 4 layers, 8 heads, MLP
1408, vocabulary 32000, float32) served by vLLM's own Llama (paged attention); the student is
``convert_to_lola(teacher, window_size=64, cache_size=64)`` served by the plugin (``fla_lola.pipeline.vllm``). For each:

- state / KV bytes per sequence at each prompt length: LoLA's slot page (every layer, from the state layout vLLM
  allocates), the teacher's KV blocks (``ceil(T / block) · block`` tokens × layers × 2 × kv heads × head dim × 4 B);
- the most concurrent sequences one cache budget (``--budget-gib``) holds;
- decode throughput: ``N`` sequences of ``T`` prompt tokens at once, generating ``M`` tokens greedily, the engine
  stepped by hand: decode tokens/s = ``N`` × the steps where all ``N`` sequences decode / their time.

Engines run in this process, eager (``enforce_eager``), one worker thread (vLLM's CPU default on 2 cores). Then each
target of the issue is printed as met or MISSED with its figures, and ``--json`` / ``--png`` are written.

    .venv-vllm/bin/python benchmarks/serving.py --lengths 1024 4096 --json benchmarks/serving.json \\
        --png benchmarks/serving.png
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

import torch  # noqa: E402
import transformers  # noqa: E402

FULL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
            intermediate_size=1408, vocab_size=32000)
SMOKE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=128, vocab_size=256)
WINDOW, CACHE = 64, 64
BLOCK = 16   # vLLM's KV block size on CPU here (tokens)


def build(root: str, dims: dict, max_len: int) -> tuple[str, str]:
    from fla_lola.pipeline.convert import convert_to_lola

    config = transformers.LlamaConfig(**dims, max_position_embeddings=max_len, bos_token_id=1, eos_token_id=2,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(config).eval()
    paths = os.path.join(root, "teacher"), os.path.join(root, "lola")
    teacher.save_pretrained(paths[0])
    convert_to_lola(teacher, window_size=WINDOW, cache_size=CACHE).save_pretrained(paths[1])
    return paths


def lola_bytes(dims: dict) -> int:
    from fla_lola.pipeline.vllm.layer import state_layout

    H, Hkv = dims["num_attention_heads"], dims["num_key_value_heads"]
    D = dims["hidden_size"] // H
    layout = state_layout(H, Hkv, D, D, 2 * 64, WINDOW, CACHE, torch.float32)   # feature_dim 64 -> F = 128
    page = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layout.values())
    return dims["num_hidden_layers"] * (page + (-page % 8))


def teacher_bytes(dims: dict, T: int) -> int:
    H, Hkv = dims["num_attention_heads"], dims["num_key_value_heads"]
    D = dims["hidden_size"] // H
    tokens = math.ceil(T / BLOCK) * BLOCK
    return dims["num_hidden_layers"] * 2 * Hkv * D * 4 * tokens


def decode_rate(path: str, lengths: list[int], n: int, m: int, vocab: int) -> dict:
    """Prefill and decode of ``n`` sequences of each length, stepping vLLM's engine by hand: the decode rate counts
    only the steps after every sequence has its first token (all ``n`` decoding)."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=max(lengths) + m + 8,
              max_num_seqs=n, max_num_batched_tokens=max(2048, n), enable_prefix_caching=False,
              skip_tokenizer_init=True)
    engine = llm.llm_engine
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, detokenize=False,
                            output_kind=RequestOutputKind.CUMULATIVE)
    out = {}
    try:
        # warm-up (first-call allocations and lazy initialization), not timed
        llm.generate([{"prompt_token_ids": list(range(3, 3 + 64))}] * n, params.clone(), use_tqdm=False)
        for T in lengths:
            g = torch.Generator().manual_seed(T)
            for i in range(n):
                engine.add_request(f"{T}-{i}", {"prompt_token_ids": torch.randint(3, vocab, (T,), generator=g)
                                                .tolist()}, params)
            produced, prefill_s, decode_s, decode_steps = {}, 0.0, 0.0, 0
            while engine.has_unfinished_requests():
                all_decoding = len(produced) == n and min(produced.values()) >= 1 and max(produced.values()) < m
                t = time.perf_counter()
                outputs = engine.step()
                dt = time.perf_counter() - t
                for o in outputs:
                    produced[o.request_id] = len(o.outputs[0].token_ids)
                if all_decoding:
                    decode_s, decode_steps = decode_s + dt, decode_steps + 1
                elif len(produced) < n or min(produced.values()) < 1 or decode_steps == 0:
                    prefill_s += dt
            out[T] = dict(prefill_s=prefill_s, decode_steps=decode_steps, decode_s=decode_s,
                          decode_tok_s=n * decode_steps / max(decode_s, 1e-9))
            print(f"  {os.path.basename(path)} T={T}: prefill {prefill_s:.2f} s, {decode_steps} decode steps "
                  f"{decode_s:.2f} s, decode {out[T]['decode_tok_s']:.1f} tok/s", flush=True)
    finally:
        shutdown = getattr(engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm, engine
        gc.collect()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--bytes-lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--seqs", type=int, default=4, help="N concurrent sequences")
    parser.add_argument("--new-tokens", type=int, default=32, help="M tokens generated per sequence")
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true", help="a tiny model, for a quick check of the script")
    parser.add_argument("--json")
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    dims = SMOKE if args.smoke else FULL
    budget = int(args.budget_gib * 2 ** 30)

    mem = {T: dict(lola=lola_bytes(dims), teacher=teacher_bytes(dims, T)) for T in args.bytes_lengths}
    for T, b in mem.items():
        b["lola_seqs"], b["teacher_seqs"] = budget // b["lola"], budget // b["teacher"]
        print(f"T={T}: bytes/sequence LoLA {b['lola']:,} teacher {b['teacher']:,}; in {args.budget_gib:g} GiB: "
              f"LoLA {b['lola_seqs']:,} sequences, teacher {b['teacher_seqs']:,}", flush=True)

    with tempfile.TemporaryDirectory() as root:
        teacher_dir, lola_dir = build(root, dims, max(args.lengths) + args.new_tokens + 64)
        rates = {"lola": decode_rate(lola_dir, args.lengths, args.seqs, args.new_tokens, dims["vocab_size"]),
                 "teacher": decode_rate(teacher_dir, args.lengths, args.seqs, args.new_tokens, dims["vocab_size"])}

    targets = []

    def target(name, ok, figures):
        targets.append(dict(target=name, met=ok, figures=figures))
        print(f"{'met   ' if ok else 'MISSED'} {name}: {figures}")

    sizes = {mem[T]["lola"] for T in mem}
    target("LoLA's bytes per sequence constant in T", len(sizes) == 1,
           ", ".join(f"{T}: {mem[T]['lola']:,} B" for T in mem))
    top = max(mem)
    ratio = mem[top]["lola_seqs"] / max(mem[top]["teacher_seqs"], 1)
    target(f"at {top}: >= 8x the teacher's concurrent sequences in {args.budget_gib:g} GiB", ratio >= 8,
           f"{mem[top]['lola_seqs']:,} vs {mem[top]['teacher_seqs']:,} ({ratio:.1f}x)")
    longest = max(args.lengths)
    speedup = rates["lola"][longest]["decode_tok_s"] / rates["teacher"][longest]["decode_tok_s"]
    target(f"at {longest} (16K asked): >= 4x the teacher's decode tokens/s", speedup >= 4 and longest >= 16384,
           f"{rates['lola'][longest]['decode_tok_s']:.1f} vs {rates['teacher'][longest]['decode_tok_s']:.1f} tok/s "
           f"({speedup:.2f}x)" + ("" if longest >= 16384 else f"; 16K not measured, longest {longest}"))
    lo, hi = min(args.lengths), longest
    drift = rates["lola"][hi]["decode_tok_s"] / rates["lola"][lo]["decode_tok_s"] - 1
    target(f"LoLA's decode tokens/s flat within 15 % from {lo} to {hi} (16K asked)",
           abs(drift) <= 0.15 and hi >= 16384,
           f"{rates['lola'][lo]['decode_tok_s']:.1f} -> {rates['lola'][hi]['decode_tok_s']:.1f} tok/s ({drift:+.0%})"
           + ("" if hi >= 16384 else f"; 16K not measured"))

    result = dict(config=dict(model=dims, window_size=WINDOW, cache_size=CACHE, dtype="float32", seqs=args.seqs,
                              new_tokens=args.new_tokens, budget_gib=args.budget_gib, enforce_eager=True,
                              torch_threads=torch.get_num_threads(), python=sys.version.split()[0],
                              vllm=__import__("vllm").__version__, torch=torch.__version__),
                  bytes_per_sequence={str(T): v for T, v in mem.items()},
                  decode={k: {str(T): v for T, v in r.items()} for k, r in rates.items()}, targets=targets)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        Ts = sorted(mem)
        a.plot(Ts, [mem[T]["lola"] / 2 ** 20 for T in Ts], "o-", label="LoLA state (η=64, λ=64)")
        a.plot(Ts, [mem[T]["teacher"] / 2 ** 20 for T in Ts], "s-", label="softmax KV cache")
        a.set(xscale="log", yscale="log", xlabel="prompt length", ylabel="MiB per sequence",
              title="memory per sequence")
        a.legend()
        Ts = sorted(args.lengths)
        for key, marker, label in (("lola", "o-", "LoLA"), ("teacher", "s-", "softmax teacher")):
            b.plot(Ts, [rates[key][T]["decode_tok_s"] for T in Ts], marker, label=label)
        b.set(xscale="log", xlabel="prompt length", ylabel="decode tokens/s",
              title=f"{args.seqs} concurrent sequences, vLLM CPU")
        b.legend()
        fig.tight_layout()
        fig.savefig(args.png, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
