"""Peak memory of `fla-lola convert` on a random checkpoint with Llama-3.2-1B's shapes (not run in CI: ~2.5 GB on disk).

    python benchmarks/convert_memory.py --workdir /tmp/convert-mem [--dtype bfloat16]

Writes a bfloat16 checkpoint with Llama-3.2-1B's config (16 layers, hidden 2048, 32 heads, 8 key/value heads, vocab
128256, llama3 RoPE, tied embeddings) tensor by tensor, then runs `fla-lola convert` in a child process and prints its
peak resident memory (ru_maxrss) beside the size of the converted weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from safetensors.torch import save_file

LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                   rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                    "rope_theta": 500000.0})


def write_random_checkpoint(path: str) -> int:
    from transformers import LlamaConfig

    config = LlamaConfig(**LLAMA_32_1B, dtype="bfloat16")
    config.save_pretrained(path)
    c, h, kv = config, config.hidden_size, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (c.intermediate_size, h),
                       p + "mlp.up_proj.weight": (c.intermediate_size, h),
                       p + "mlp.down_proj.weight": (h, c.intermediate_size)})
    weight_map, total, shard, n = {}, 0, {}, 0
    for name, shape in shapes.items():  # one tensor at a time, shards of ~1 GB, as the Hub stores them
        shard[name] = (torch.randn(shape) * 0.02).to(torch.bfloat16)
        total += shard[name].numel()
        if sum(t.numel() for t in shard.values()) > 5e8 or name == list(shapes)[-1]:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, n = {}, n + 1
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 2 * total}, "weight_map": weight_map}, f)
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    src, out = os.path.join(args.workdir, "llama-1b-random"), os.path.join(args.workdir, "lola-1b")
    os.makedirs(src, exist_ok=True)
    params = write_random_checkpoint(src)
    cmd = [sys.executable, "-m", "fla_lola.cli", "convert", src, out, "--window-size", "64", "--cache-size", "64",
           "--dtype", args.dtype]
    subprocess.run(cmd, check=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(json.dumps({"params": params, "converted_weights_gib": round(size / 2**30, 2),
                      "convert_peak_rss_gib": round(peak, 2)}))


if __name__ == "__main__":
    main()
