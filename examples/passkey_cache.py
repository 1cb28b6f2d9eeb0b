"""Which pairs does each selection score keep? The needle's share of LoLA's exact memory, per score and layer.

    python examples/passkey_cache.py                        # shipped student, 20 documents per task at 2K
    python examples/passkey_cache.py --length 4096 --docs 10 --json out/passkey_cache.json

The accuracy table of ``examples/passkey.py`` says *whether* a variant retrieves the key; this says *why*. The
shipped student (``examples/passkey_student.*``) reads each evaluation document up to the question (the prompt a
model would have before answering), with η = λ = 64 and each selection score in turn. Then, for every layer, it
counts which of the asked needle's five key digits are still stored exactly, in the sparse cache or in the window,
averaged over heads and documents (1.0: every head of that layer holds all five digits). It also reports where the
needle's digits rank by value norm among every token of the prompt, per layer and head (the ``value_norm`` score's
view): a percentile near 100 means a value-norm score finds the same pairs as the self-recall error.

Writes a table, JSON and a PNG (bars per task: fraction of the needle held, per score, layers side by side).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fla_lola.pipeline import passkey as pk
from fla_lola.cache_names import OUTPUT_CACHE_FIELD
from fla_lola.pipeline.convert import set_lola

HERE = os.path.dirname(os.path.abspath(__file__))
ETA, LAM = pk.STUDENT["window_size"], pk.STUDENT["cache_size"]  # the demo student's η, λ
SCORES = ("sre", "loo", "value_norm", "recency", "random")


def needle_positions(prompt: list[int], key: str) -> list[int]:
    """Positions of the asked needle's key digits in ``prompt``: the one occurrence of the key's digit sequence
    (empty if it occurs twice, e.g. when another needle of a multikey document shares the key: the caller skips
    that document)."""
    digits = pk.TOKENIZER.encode(" ".join(key))
    hits = [i for i in range(len(prompt) - 4) if prompt[i:i + 5] == digits]
    return list(range(hits[0], hits[0] + 5)) if len(hits) == 1 else []


@torch.no_grad()
def analyse(student, task: str, length: int, docs: int) -> dict:
    """``held[score][layer]``: mean fraction of the needle's digits stored exactly; ``value_rank[layer]``: the
    needle digits' mean value-norm percentile among the prompt's tokens (over heads and documents)."""
    from fla_lola.pipeline.distill import lola_layers

    batch = pk.eval_documents(length, docs, task=task)
    what = pk.TOKENIZER.index["What"]
    layers = lola_layers(student)
    held = {s: [0.0] * len(layers) for s in SCORES}
    value_rank, used = [0.0] * len(layers), 0
    values = {}
    hooks = [layer.v_proj.register_forward_hook(lambda m, i, o, j=j: values.__setitem__(j, o))
             for j, layer in enumerate(layers)]
    try:
        for b in range(docs):
            ids = batch.input_ids[b].tolist()
            end = max(i for i, t in enumerate(ids) if t == what)   # the prompt: everything before the question
            where = needle_positions(ids[:end], batch.keys[b])
            if not where:
                continue
            used += 1
            x = batch.input_ids[b:b + 1, :end]
            for score in SCORES:
                set_lola(student, selection=score)
                out = student(input_ids=x, use_cache=True)
                for j in range(len(layers)):
                    st = getattr(out, OUTPUT_CACHE_FIELD)[j]["recurrent_state"]
                    stored = torch.cat([st.cache_pos[0], st.window_pos[0][None].expand(st.cache_pos.shape[1], -1)],
                                       -1)                                   # [H, λ + 2η]
                    kept = torch.stack([(stored == p).any(-1) for p in where], -1)  # [H, 5]
                    held[score][j] += kept.float().mean().item()
                if score == SCORES[0]:
                    for j in range(len(layers)):
                        v = values[j][0].view(end, layers[j].num_kv_heads, -1).norm(dim=-1)   # [T, Hkv]
                        rank = (v[None] < v[where][:, None]).float().mean(1)                  # [5, Hkv]
                        value_rank[j] += 100 * rank.mean().item()
    finally:
        for h in hooks:
            h.remove()
        set_lola(student, selection="sre")
    n = max(used, 1)
    return dict(documents=used, held={s: [x / n for x in xs] for s, xs in held.items()},
                value_norm_percentile=[x / n for x in value_rank])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=HERE, help="directory of passkey_student.{safetensors,json}")
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--docs", type=int, default=20)
    p.add_argument("--tasks", nargs="+", default=list(pk.TASKS), choices=list(pk.TASKS))
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None, help="default: next to --json, else passkey_cache.png")
    args = p.parse_args(argv)

    student = pk.load_student(os.path.join(args.weights, "passkey_student"))
    set_lola(student, window_size=ETA, cache_size=LAM)
    result = dict(length=args.length, window_size=ETA, cache_size=LAM, docs=args.docs,
                  tasks={t: analyse(student, t, args.length, args.docs) for t in args.tasks})
    print(f"Needle digits stored exactly (cache or window) after a {args.length}-token prompt, η = {ETA}, λ = {LAM}; "
          "mean over heads and documents, per layer:")
    for task, r in result["tasks"].items():
        print(f"task: {task} ({r['documents']} documents)")
        for s in SCORES:
            print(f"  {s:<11} " + "  ".join(f"L{j} {x:5.2f}" for j, x in enumerate(r["held"][s])))
        print("  value-norm percentile of the needle digits among the prompt's tokens: "
              + "  ".join(f"L{j} {x:5.1f}" for j, x in enumerate(r["value_norm_percentile"])))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "passkey_cache.png")
    plot(result, png)
    print(f"plot: {png}" + (f", numbers: {args.json}" if args.json else ""))
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(result["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.8), sharey=True, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        held = result["tasks"][task]["held"]
        L = len(held[SCORES[0]])
        width = 0.8 / L
        for j in range(L):
            ax.bar([i + j * width for i in range(len(SCORES))], [held[s][j] for s in SCORES], width,
                   label=f"layer {j}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(SCORES))], SCORES, rotation=30)
        ax.set_title(f"task: {task}")
        ax.set_ylim(0, 1.05)
    axes[0][0].set_ylabel("needle digits stored exactly")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"What each score keeps: {result['length']}-token prompts, η = λ = {result['cache_size']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
