"""Pass-key retrieval in miniature: a softmax teacher, its linearized student, and LoLA's sparse cache.

    python examples/passkey.py                     # evaluate the shipped weights (every task, 100 documents a cell)
    python examples/passkey.py --processes 2       # the same, the cells spread over 2 worker processes
    python examples/passkey.py --docs 20 --tasks text   # a cheaper slice
    python examples/passkey.py --docs-at 8192=20   # 100 documents a cell, 20 at 8K
    python examples/passkey.py --cache-size 16 --lengths 1024 2048 --variants lola lola_loo lola_value_norm
                                                   # the selection scores with a tighter sparse cache
    python examples/passkey.py --train             # retrain teacher and student from scratch first (≤ 30 min)
    python examples/passkey.py --smoke --json o.json   # tiny end-to-end run (CI)

The teacher is a 3-layer softmax Llama trained on synthetic RULER-style pass-key documents of three tasks
(``fla_lola.pipeline.passkey``: ``single`` needle in a repetitive filler, ``text`` needle in held-out English prose,
``multikey`` three named needles, one asked); the student is the same model with every attention layer converted to LoLA
(``fla_lola.pipeline.convert``) and its feature maps and mixing logits fitted by attention transfer with an empty
cache (``fla_lola.pipeline.distill``). One student then runs every variant, since η, λ and the selection score
change no weight:

- ``lambda0``: λ = 0, η = 64, LoLCATs' window + linear attention;
- ``lola``: η = 64, λ = 64, self-recall-error selection (the paper's method);
- ``lola_loo``: the same with leave-one-out self-recall error (``selection="loo"``, beyond the paper);
- ``bigger_window``: λ = 0 and η = 96, i.e. the same number of stored key-value pairs as LoLA
  (λ + 2η = 2η' = 192 per layer and head: LoLA keeps its cache, the previous chunk and the current one; the
  window-only model keeps two chunks; both also hold the same linear memory H, s);
- ``lola_recency``, ``lola_value_norm``, ``lola_random``: LoLA with another cache selection score.

Accuracy is exact match of the 5 key digits (teacher-forced argmax, equal to greedy decoding) on
documents of 512, 1K, 2K, 4K and 8K tokens, needle depths evenly spread, from a seed no training step uses
(``text`` documents from prose passages no training step saw). The JSON keeps every document's verdict
(``hits``: one character per document, "1" right or how it went wrong,
``fla_lola.pipeline.passkey.VERDICTS``: "k" another key of the prompt, "s" digits copied from another key at their
place, "0" other wrong digits), so a slice can be re-checked exactly (tests/test_passkey.py does). The table counts the misses of each kind.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))

from fla_lola.pipeline import passkey as pk
from fla_lola.pipeline.convert import set_lola

ETA, LAM = pk.STUDENT["window_size"], pk.STUDENT["cache_size"]


def variant_configs(cache_size: int = LAM) -> dict:
    """Each variant's η, λ and score (``None``: the teacher), with the LoLA variants' cache at ``cache_size``; the
    bigger window keeps the same number of exact pairs (2η' = λ + 2η)."""
    def lola(score):
        return dict(window_size=ETA, cache_size=cache_size, selection=score)

    return {
        "teacher": None,
        "lambda0": dict(window_size=ETA, cache_size=0, selection="sre"),
        "lola": lola("sre"),
        "lola_loo": lola("loo"),
        "bigger_window": dict(window_size=ETA + cache_size // 2, cache_size=0, selection="sre"),
        "lola_recency": lola("recency"),
        "lola_value_norm": lola("value_norm"),
        "lola_random": lola("random"),
    }


VARIANTS = variant_configs()


def variant_labels(cache_size: int = LAM) -> dict:
    return {
        "teacher": "softmax teacher (full KV cache)",
        "lambda0": f"λ=0, η={ETA} (LoLCATs)",
        "lola": f"LoLA η={ETA}, λ={cache_size}, SRE",
        "lola_loo": "LoLA, leave-one-out SRE",
        "bigger_window": f"window only, η={ETA + cache_size // 2}",
        "lola_recency": "LoLA, recency",
        "lola_value_norm": "LoLA, value norm",
        "lola_random": "LoLA, random",
    }


def stored_pairs(variant: str, length: int, cache_size: int = LAM) -> int:
    """Exact key-value pairs one layer keeps per head after ``length`` tokens."""
    cfg = variant_configs(cache_size)[variant]
    if cfg is None:
        return length
    return min(length, cfg["cache_size"] + 2 * cfg["window_size"])


def train(out: str, smoke: bool, log) -> None:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if smoke:
        schedule, tokens = [pk.Phase(20, 48, 96, 1e-3)], 512
        distill = dict(steps=3, min_len=128, max_len=192, tokens_per_step=512)
    else:
        schedule, tokens, distill = pk.TEACHER_SCHEDULE, pk.TEACHER_TOKENS_PER_STEP, {}
    t0 = time.time()
    teacher = LlamaForCausalLM._from_config(pk.teacher_config(), attn_implementation="sdpa")
    pk.train_teacher(teacher, schedule, tokens_per_step=tokens, log=log)
    log(f"teacher trained in {time.time() - t0:.0f} s")
    pk.save_model(teacher, os.path.join(out, "passkey_teacher"))
    t1 = time.time()
    student = pk.distill_student(teacher, log=log, **distill)
    log(f"student distilled in {time.time() - t1:.0f} s")
    pk.save_model(student, os.path.join(out, "passkey_student"))


def cell_hits(model, task: str, length: int, docs: int, batch_size: int, first: int | None = None,
              on_batch=None) -> str:
    """The verdicts on the evaluation documents of one (task, length), one :data:`fla_lola.pipeline.passkey.VERDICTS`
    character per document: "1" right, "k" / "s" / "0" the ways a miss goes wrong.

    ``first`` evaluates only the first documents of the ``docs``-document set (the set itself, with its evenly
    spread depths, depends on ``docs``). Batches hold at most ``batch_size`` documents and ~16K tokens.
    """
    batch = pk.eval_documents(length, docs, task=task)
    n = docs if first is None else min(first, docs)
    step = max(1, min(batch_size, 16384 // length))
    out = []
    for i in range(0, n, step):
        ids = batch.input_ids[i:min(n, i + step)]
        pred = pk.predict_answers(model, pk.PassKeyBatch(ids, batch.answer_start, [], []), batch_size=step)
        out += [pk.verdict(d[:batch.answer_start], d[batch.answer_start:], p)
                for d, p in zip(ids.tolist(), pred.tolist())]
        if on_batch is not None:
            on_batch(ids.shape[0])
    return "".join(out)


def load_models(weights: str):
    return pk.load_teacher(os.path.join(weights, "passkey_teacher")), pk.load_student(os.path.join(weights, "passkey_student"))


def model_for(variant: str, teacher, student, cache_size: int = LAM):
    cfg = variant_configs(cache_size)[variant]
    if cfg is None:
        return teacher
    set_lola(student, **cfg)
    return student


def docs_at(docs: int | dict, length: int) -> int:
    """Documents per cell at ``length``: one number for every length, or ``{"8192": 20, ...}`` per length."""
    return docs[str(length)] if isinstance(docs, dict) else docs


_WORKER_MODELS = {}


def _cell_job(weights: str, variant: str, task: str, length: int, docs: int, batch_size: int, threads: int,
              cache_size: int):
    """One (variant, task, length) cell in a worker process; the models are loaded once per process."""
    torch.set_num_threads(threads)
    if weights not in _WORKER_MODELS:
        _WORKER_MODELS[weights] = load_models(weights)
    t0 = time.time()
    hits = cell_hits(model_for(variant, *_WORKER_MODELS[weights], cache_size), task, length, docs, batch_size)
    return variant, task, length, hits, time.time() - t0


def evaluate(weights: str, tasks: list[str], lengths: list[int], docs: int | dict, variants: list[str],
             batch_size: int, processes: int = 1, cache_size: int = LAM) -> tuple[dict, dict]:
    """``hits[task][variant][str(length)]`` and the seconds each variant took (summed over processes).

    ``processes > 1`` spreads the cells over that many worker processes (each with ``1/processes`` of torch's
    threads); every cell is computed exactly as in one process.
    """
    from tqdm.auto import tqdm

    hits, seconds = {t: {v: {} for v in variants} for t in tasks}, {v: 0.0 for v in variants}
    total = len(tasks) * len(variants) * sum(docs_at(docs, L) for L in lengths)
    bar = tqdm(total=total, desc="evaluating", unit="doc", mininterval=2)
    if processes > 1:
        import concurrent.futures as cf
        import multiprocessing as mp

        threads = max(1, torch.get_num_threads() // processes)
        cells = sorted(((v, t, L) for v in variants for t in tasks for L in lengths), key=lambda c: -c[2])
        with cf.ProcessPoolExecutor(processes, mp_context=mp.get_context("spawn")) as pool:
            jobs = [pool.submit(_cell_job, weights, v, t, L, docs_at(docs, L), batch_size, threads, cache_size)
                    for v, t, L in cells]
            for job in cf.as_completed(jobs):
                v, t, L, h, sec = job.result()
                hits[t][v][str(L)] = h
                seconds[v] += sec
                bar.update(len(h))
                bar.set_postfix_str(f"{t}: {v} @ {L}")
        bar.close()
        # the cells in the order one process writes them
        return {t: {v: {str(L): hits[t][v][str(L)] for L in lengths} for v in variants} for t in tasks}, seconds
    teacher, student = load_models(weights)
    for name in variants:
        t0 = time.time()
        model = model_for(name, teacher, student, cache_size)
        for task in tasks:
            for L in lengths:
                bar.set_postfix_str(f"{task}: {name} @ {L}")
                hits[task][name][str(L)] = cell_hits(model, task, L, docs_at(docs, L), batch_size,
                                                     on_batch=bar.update)
        seconds[name] = time.time() - t0
    bar.close()
    return hits, seconds


def accuracy(hits: str) -> float:
    return hits.count("1") / len(hits)


def docs_label(docs: int | dict) -> str:
    if not isinstance(docs, dict):
        return f"{docs} documents per cell"
    groups = {}
    for L, n in docs.items():
        groups.setdefault(n, []).append(L)
    return "; ".join(f"{n} documents per cell at {', '.join(Ls)}" for n, Ls in groups.items())


def table(result: dict) -> str:
    lengths = [str(L) for L in next(iter(result["tasks"].values()))["lengths"]]
    head = f"{'variant':<34} {'pairs':>6} " + " ".join(f"{L:>7}" for L in lengths)
    rows, names = [], variant_labels(result["cache_size"])
    for task, res in result["tasks"].items():
        rows += [f"task: {task}", head, "-" * len(head)]
        for name, accs in res["accuracy"].items():
            rows.append(f"{names[name]:<34} {result['stored_pairs'][name]:>6} "
                        + " ".join(f"{100 * accs[L]:>6.1f}%" for L in lengths))
        kinds = [c for c in pk.VERDICTS if c != "1"]
        counts = {name: "/".join(str(sum(h.count(c) for h in per_len.values())) for c in kinds)
                  for name, per_len in res["hits"].items()}
        rows.append(f"misses, all lengths ({' / '.join(f'{c} {pk.VERDICTS[c]}' for c in kinds)}): "
                    + ", ".join(f"{name} {n}" for name, n in counts.items()))
        rows.append("")
    max_len = lengths[-1]
    rows.append(f"pairs = exact key-value pairs kept per layer and head at {max_len} tokens "
                f"(the teacher's KV cache holds {result['kv_pairs'][max_len]}); "
                f"{docs_label(result['documents_per_length'])}.")
    return "\n".join(rows)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, names = list(result["tasks"]), variant_labels(result["cache_size"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks) + 3, 4.5), sharey=True, squeeze=False)
    lengths = result["tasks"][tasks[0]]["lengths"]
    for ax, task in zip(axes[0], tasks):
        for name, accs in result["tasks"][task]["accuracy"].items():
            ax.plot(lengths, [100 * accs[str(L)] for L in lengths], marker="o",
                    label=f"{names[name]} ({result['stored_pairs'][name]} pairs)",
                    linewidth=2.5 if name in ("lola", "lola_loo") else 1.5,
                    linestyle="--" if name == "lola_loo" else "-")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
        ax.set_ylim(-3, 103)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(f"task: {task}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pass-key exact match (%)")
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.suptitle(f"Pass-key retrieval: {docs_label(result['documents_per_length'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", action="store_true", help="train teacher and student from scratch first (≤ 30 min)")
    p.add_argument("--smoke", action="store_true", help="tiny end-to-end run: a few training steps, short documents")
    p.add_argument("--weights", default=None,
                   help="directory of passkey_{teacher,student}.{safetensors,json}; default: examples/, or out/passkey "
                        "with --train")
    p.add_argument("--docs", type=int, default=None, help="documents per length (default 100; 4 with --smoke)")
    p.add_argument("--docs-at", nargs="+", default=[], metavar="LENGTH=N",
                   help="documents per cell at chosen lengths, overriding --docs there (e.g. 8192=20)")
    p.add_argument("--processes", type=int, default=1,
                   help="evaluate the cells in this many worker processes (threads are split between them)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="context lengths (default 512 1024 2048 4096 8192)")
    p.add_argument("--tasks", nargs="+", default=list(pk.TASKS), choices=list(pk.TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--cache-size", type=int, default=LAM,
                   help=f"λ of every LoLA variant (default {LAM}; the bigger window follows at equal memory)")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write all numbers here")
    p.add_argument("--png", default=None, help="write the plot here (default: next to --json, else passkey.png)")
    args = p.parse_args(argv)
    if args.cache_size < 1:
        p.error(f"--cache-size must be >= 1, got {args.cache_size}")

    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.lengths or ([128, 256] if args.smoke else [512, 1024, 2048, 4096, 8192])
    docs = args.docs or (4 if args.smoke else 100)
    if args.docs_at:
        try:
            over = {int(L): int(n) for L, n in (x.split("=") for x in args.docs_at)}
        except ValueError:
            p.error(f"--docs-at: expected LENGTH=N pairs, got {args.docs_at}")
        if not set(over) <= set(lengths) or min(over.values()) < 1:
            p.error(f"--docs-at: lengths must be among {lengths} and N >= 1, got {args.docs_at}")
        docs = {str(L): over.get(L, docs) for L in lengths}
    tmp = tempfile.TemporaryDirectory() if args.smoke and args.weights is None else None
    weights = args.weights or (tmp.name if tmp else os.path.join("out", "passkey") if args.train else HERE)
    log = (lambda s: None) if args.smoke else (lambda s: print(s, flush=True))
    t0 = time.time()
    if args.train or args.smoke:
        os.makedirs(weights, exist_ok=True)
        train(weights, args.smoke, log)
    train_seconds = time.time() - t0

    hits, seconds = evaluate(weights, args.tasks, lengths, docs, args.variants, args.batch_size, args.processes,
                             args.cache_size)
    tasks = {t: {"lengths": lengths,
                 "accuracy": {v: {L: accuracy(h) for L, h in per_len.items()} for v, per_len in hits[t].items()},
                 "hits": hits[t]} for t in args.tasks}
    result = {
        # the `single` task, where earlier versions of this file kept it
        "lengths": lengths if "single" in tasks else [],
        "accuracy": tasks["single"]["accuracy"] if "single" in tasks else {},
        "tasks": tasks,
        "window_size": ETA,
        "cache_size": args.cache_size,
        "stored_pairs": {v: stored_pairs(v, max(lengths), args.cache_size) for v in args.variants},
        "kv_pairs": {str(L): L for L in lengths},
        "variants": {v: variant_configs(args.cache_size)[v] for v in args.variants},
        "documents_per_length": docs,
        "eval_seed": pk.EVAL_SEED,
        "equal_memory": "stored pairs = λ + 2η per layer and head (cache + previous chunk + current chunk); "
                        "bigger_window has λ = 0 and η' = η + λ/2, so 2η' = λ + 2η; every LoLA variant also "
                        "holds the same linear memory (H, s)",
        "train_seconds": round(train_seconds, 1) if (args.train or args.smoke) else None,
        "eval_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "threads": torch.get_num_threads(),
        "eval_processes": args.processes,
        "weights": os.path.relpath(weights) if tmp is None else None,
    }
    if args.json:  # the numbers first: nothing after this can lose them
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(table(result))
    print(f"evaluated {docs_label(docs)} in {time.time() - t0 - train_seconds:.0f} s wall "
          f"({torch.get_num_threads()} threads, {args.processes} process(es))")
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "passkey.png")
    plot(result, png)
    print(f"plot: {png}" + (f", numbers: {args.json}" if args.json else ""))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
