"""``fla-lola``: convert a transformers checkpoint to LoLA, distill it, test pass-key retrieval, and evaluate it with
lm-evaluation-harness.

Every command exits 0 on success, and 2 with one line ``fla-lola: error: ...`` on bad input; a command that fails
never leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import os
import sys

from fla_lola.ops.utils import SELECTIONS

EXAMPLES = """\
examples:
  # a Llama-3.2-1B checkpoint directory -> a LoLA model directory (η = 64, λ = 64), in bfloat16
  fla-lola convert ./Llama-3.2-1B ./lola-1b --window-size 64 --cache-size 64 --dtype bfloat16

  # with LoLCATs stage-1 (feature maps) and stage-2 (LoRA) checkpoints
  fla-lola convert ./Meta-Llama-3.1-8B ./lola-8b --window-size 64 --cache-size 64 \\
      --lolcats-attn attn.pt --lolcats-finetune finetune.pt --lora-alpha 16

  # attention transfer on local text, 8 GPUs, checkpoints every 100 steps (rerun with --resume after a stop)
  accelerate launch --num_processes 8 -m fla_lola.cli distill ./Meta-Llama-3.1-8B ./lola-8b \\
      --data corpus/*.txt --window-size 64 --cache-size 64 --steps 2000 --batch-size 8 --dtype bfloat16

  # pass-key retrieval with the model's own tokenizer: results.json + results.png
  fla-lola passkey ./lola-1b --lengths 1024 2048 4096 --depths 5 --out results

  # lm-evaluation-harness (pip install '.[eval]'): RULER's needle task at 4K and 8K, lm-eval's JSON in eval/
  fla-lola eval ./lola-1b --tasks niah_single_1 --metadata '{"max_seq_lengths": [4096, 8192]}' \\
      --max-length 8320 --batch-size 4 --output-path eval
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fla-lola", description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in (_convert_args, _distill_args, _env_args, _passkey_args, _eval_args):
        add(sub)
    return p


def _lola_args(q, feature_dim=64, feature_dim_help="default 64"):
    q.add_argument("--window-size", type=int, required=True, help="η, the sliding window (and chunk) size")
    q.add_argument("--cache-size", type=int, required=True, help="λ, the sparse cache size")
    q.add_argument("--feature-dim", type=int, default=feature_dim,
                   help=f"f of the LoLCATs feature map ({feature_dim_help})")
    q.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: the source's)")


def _selection_arg(q, default, what):
    q.add_argument("--selection", choices=SELECTIONS, default=default,
                   help=f"cache selection score {what}: sre (self-recall error), loo (leave-one-out), or the "
                        "ablations recency, value_norm, random")


def _convert_args(sub) -> None:
    c = sub.add_parser("convert", help="transformers checkpoint dir -> LoLA model dir", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("src", help="transformers checkpoint directory (Llama, Mistral, Qwen2, Qwen3)")
    c.add_argument("out", help="new LoLA model directory (must not exist)")
    _lola_args(c, None, "default: the width of the --lolcats-attn / --lolcats-finetune feature maps, else 64")
    c.add_argument("--lolcats-attn", help="LoLCATs stage-1 checkpoint (.pt: feature maps, window factors)")
    c.add_argument("--lolcats-finetune", help="LoLCATs stage-2 checkpoint (.pt: peft LoRA on q/k/v/o), merged")
    c.add_argument("--lora-alpha", type=float, default=16.0, help="LoRA alpha (default 16, LoLCATs'); r is read "
                   "from the tensors")
    c.add_argument("--seed", type=int, default=0, help="seed of the initial feature maps")
    c.add_argument("--max-shard-size", type=int, default=2 * 2**30, help="bytes per safetensors shard")
    _selection_arg(c, "sre", "stored in the config (default sre)")


def _distill_args(sub) -> None:
    d = sub.add_parser("distill", help="attention transfer (LoLCATs stage 1) on local text", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("src", help="teacher: transformers checkpoint directory")
    d.add_argument("out", help="new LoLA model directory (must not exist)")
    d.add_argument("--data", nargs="+", required=True,
                   help=".txt files (one document each), .jsonl (one per line); with `datasets` ([eval] extra): "
                        ".json, .parquet, .csv, .arrow (also .gz/.bz2/.xz), a save_to_disk directory, or a Hub "
                        "dataset name owner/name[:config] in the local cache (HF_DATASETS_OFFLINE=1)")
    d.add_argument("--text-field", default="text", help="the documents' field in .jsonl and datasets (default text)")
    d.add_argument("--split", default="train", help="split of a DatasetDict directory or Hub dataset (default train)")
    d.add_argument("--max-documents", type=int, default=None,
                   help="read at most N documents (streamed: a large dataset is read no further)")
    _lola_args(d)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--batch-size", type=int, default=8, help="global batch (split over processes)")
    d.add_argument("--seq-len", type=int, default=1024)
    d.add_argument("--lr", type=float, default=1e-2)
    d.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps (to OUT.ckpt)")
    d.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    d.add_argument("--seed", type=int, default=0)


def _env_args(sub) -> None:
    sub.add_parser("env", help="import the package and print the versions it runs with (for bug reports)")


def _passkey_args(sub) -> None:
    k = sub.add_parser("passkey", help="pass-key retrieval (RULER single needle): JSON + PNG", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("model", help="a model directory with its tokenizer (LoLA or any causal LM)")
    k.add_argument("--lengths", type=int, nargs="+", required=True, help="prompt lengths in tokens")
    k.add_argument("--depths", type=int, default=5, help="needle depths spread over [0, 1] (default 5)")
    k.add_argument("--out", default="passkey", help="writes OUT.json and OUT.png (default passkey)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--device", default=None, help="default: cuda if available")
    _selection_arg(k, None, "for this run, on every LoLA layer (default: the model's own)")


def _eval_args(sub) -> None:
    e = sub.add_parser("eval", help="lm-evaluation-harness tasks on a model directory (needs the [eval] extra)",
                       description="lm-eval's Hugging Face model class (HFLM, causal) on MODEL with fla_lola "
                                   "registered; options as lm_eval's (underscored spellings accepted too)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", help="a model directory with its tokenizer (LoLA or any transformers causal LM)")
    e.add_argument("--tasks", nargs="+", required=True,
                   help="lm-eval task names or globs (space or comma separated), task YAML files, or a directory")
    e.add_argument("--batch-size", "--batch_size", default="1", help="N, auto or auto:N (default 1)")
    e.add_argument("--max-batch-size", "--max_batch_size", type=int, default=None, help="cap for auto (default 64)")
    e.add_argument("--max-length", "--max_length", type=int, default=None,
                   help="tokens per request (default: lm-eval's, the config's max_position_embeddings)")
    e.add_argument("--device", default=None, help="default: cuda if available")
    e.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="default auto (the config's)")
    e.add_argument("--limit", type=float, default=None, help="examples per task (< 1: a fraction); for testing")
    e.add_argument("--num-fewshot", "--num_fewshot", type=int, default=None)
    e.add_argument("--metadata", default=None,
                   help="JSON object for the tasks, e.g. RULER's '{\"max_seq_lengths\": [4096], \"tokenizer\": ...}' "
                        "(the tokenizer defaults to MODEL's)")
    e.add_argument("--include-path", "--include_path", nargs="+", default=None,
                   help="directories of local task YAMLs")
    e.add_argument("--output-path", "--output_path", "-o", default=None,
                   help="write lm-eval's results JSON (and samples) under this directory")
    e.add_argument("--log-samples", "--log_samples", action="store_true",
                   help="also write every example's inputs and outputs (needs --output-path)")
    e.add_argument("--gen-kwargs", "--gen_kwargs", default=None, help="generation arguments, k=v,k=v")
    e.add_argument("--apply-chat-template", "--apply_chat_template", action="store_true")
    e.add_argument("--model-args", "--model_args", default=None,
                   help="further HFLM arguments, k=v,k=v (e.g. add_bos_token=True)")
    e.add_argument("--tokenizer", default=None, help="tokenizer directory or name (default: MODEL's)")
    e.add_argument("--bootstrap-iters", "--bootstrap_iters", type=int, default=100000,
                   help="bootstrap iterations for standard errors (0: none)")


def _convert(a) -> str:
    from fla_lola.pipeline.checkpoint import convert_checkpoint

    out = convert_checkpoint(a.src, a.out, window_size=a.window_size, cache_size=a.cache_size,
                             feature_dim=a.feature_dim, dtype=a.dtype, lolcats_attn=a.lolcats_attn,
                             lolcats_finetune=a.lolcats_finetune, lora_alpha=a.lora_alpha, seed=a.seed,
                             max_shard_size=a.max_shard_size, selection=a.selection)
    return f"wrote {out}"


def _distill(a) -> str:
    from fla_lola.pipeline.checkpoint import distill_checkpoint

    if a.max_documents is not None and a.max_documents < 1:
        raise ValueError(f"--max-documents must be positive, got {a.max_documents}")
    distill_checkpoint(a.src, a.out, a.data, window_size=a.window_size, cache_size=a.cache_size,
                       feature_dim=a.feature_dim, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                       lr=a.lr, save_every=a.save_every, resume=a.resume, dtype=a.dtype, seed=a.seed,
                       text_field=a.text_field, split=a.split, max_documents=a.max_documents)
    return f"wrote {a.out}"


def _passkey(a) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fla_lola  # noqa: F401  (registers model_type "lola")
    from fla_lola.pipeline.ruler import write_results

    if not os.path.isdir(a.model):
        raise ValueError(f"MODEL {a.model!r} is not a directory")
    if any(n < 1 for n in a.lengths):
        raise ValueError(f"--lengths must be positive, got {a.lengths}")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out: directory {out_dir!r} does not exist")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).to(device).eval()
    if a.selection is not None:
        from fla_lola.pipeline.convert import set_lola

        set_lola(model, selection=a.selection)
    from fla_lola.pipeline.ruler import run_passkey

    trials = run_passkey(model, tokenizer, a.lengths, depths=a.depths, seed=a.seed)
    summary = write_results(trials, a.out + ".json", a.out + ".png", title=os.path.basename(a.model.rstrip("/")))
    acc = ", ".join(f"{n}: {100 * v:.0f}%" for n, v in summary["accuracy"].items())
    return f"wrote {a.out}.json, {a.out}.png ({acc})"


def _eval(a) -> str:
    import json

    from fla_lola.pipeline.evaluate import evaluate, format_results

    metadata = None
    if a.metadata is not None:
        try:
            metadata = json.loads(a.metadata)
        except json.JSONDecodeError as e:
            raise ValueError(f"--metadata is not valid JSON ({e})") from None
        if not isinstance(metadata, dict):
            raise ValueError(f"--metadata must be a JSON object, got {a.metadata!r}")
    batch_size = a.batch_size
    if batch_size.isdigit() and int(batch_size) > 0:
        batch_size = int(batch_size)
    elif not (batch_size == "auto" or (batch_size.startswith("auto:") and batch_size[5:].isdigit())):
        raise ValueError(f"--batch-size must be a positive integer, auto or auto:N, got {a.batch_size!r}")
    limit = a.limit
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"--limit must be positive, got {a.limit}")
        limit = int(limit) if limit >= 1 and limit == int(limit) else limit
    if a.log_samples and a.output_path is None:
        raise ValueError("--log-samples needs --output-path")
    results = evaluate(a.model, a.tasks, tokenizer=a.tokenizer, batch_size=batch_size,
                       max_batch_size=a.max_batch_size, max_length=a.max_length, device=a.device, dtype=a.dtype,
                       limit=limit, num_fewshot=a.num_fewshot, metadata=metadata, include_path=a.include_path,
                       output_path=a.output_path, log_samples=a.log_samples, gen_kwargs=a.gen_kwargs,
                       apply_chat_template=a.apply_chat_template, bootstrap_iters=a.bootstrap_iters,
                       model_args=a.model_args)
    lines = [f"{a.model}: limit {limit}, num_fewshot {a.num_fewshot}, batch_size {batch_size}", format_results(results)]
    lines += [f"wrote {f}" for f in results.get("output_files", [])]
    return "\n".join(lines)


ENV_PACKAGES = ("fla-lola", "torch", "transformers", "flash-linear-attention", "triton", "kernels", "accelerate")


def _env(args) -> str:
    """The whole package imported (models, registry, Triton kernels' module), then one line per version."""
    import importlib.metadata
    import platform

    import torch

    import fla_lola
    import fla_lola.kernels  # noqa: F401  (the Triton module imports even where no GPU runs it)

    lines = [f"python {platform.python_version()} ({sys.executable})",
             f"fla_lola from {os.path.dirname(fla_lola.__file__)}"]
    for name in ENV_PACKAGES:
        try:
            lines.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            lines.append(f"{name} not installed")
    lines.append(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run = {"convert": _convert, "distill": _distill, "env": _env, "eval": _eval, "passkey": _passkey}[args.command]
    try:
        message = run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, OSError) as e:
        print(f"fla-lola: error: {e}", file=sys.stderr)
        return 2
    print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
