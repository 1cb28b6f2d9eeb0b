"""Where leave-one-out selection beats self-recall error: a needle among repeating pairs, at the op level.

    python examples/loo_duplicates.py                       # 100 trials per cell, 256 / 1K / 4K tokens, ~30 s
    python examples/loo_duplicates.py --trials 20 --json out/loo_duplicates.json

The pass-key models of ``examples/passkey.py`` cannot tell SRE and LOO apart (docs/results.md). This isolates the case LOO is
built for, with no model in the way: ``lola_attention`` alone (float64, η = λ = 16, one head of D = F = 16) reads a
sequence of P = 8 key-value patterns repeated in turn, one of whose tokens is replaced by a unique needle (uniform
depth, at least 3η before the end). The last token queries the needle's key. Per selection score, it reports how
often the needle is still in the sparse cache at the end, and how often the output points at the needle's value
(cosine > 0.9), for two feature maps:

- ``separating``: φ(k) one-hot per pattern (the needle has its own feature), so the linear memory recalls a folded
  pattern exactly. SRE still loses the needle: copies of a pattern that sit in the cache were never folded, so
  the memory does not know them, each copy scores as "hard" as the needle, and they crowd it out. Under LOO each
  copy is read against the other copies and scores ≈ 0, while the needle, alone on its feature, keeps the
  largest score: it stays in the cache in every trial (a test checks this).
- ``random``: φ(k) = softmax(W k) with a random W: patterns collide in the memory, as in a real feature map.

Values are Gaussian (their norms differ), so ``value_norm`` keeps the largest values whatever they are; ``recency``
and ``random`` are the trivial baselines. Writes a table, JSON and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fla_lola import lola_attention

SCORES = ("sre", "loo", "value_norm", "recency", "random")
FEATURES = ("separating", "random")
ETA = LAM = 16
PATTERNS, DIM = 8, 16


@torch.no_grad()
def trial_batch(length: int, features: str, selection: str, trials: int, seed: int = 0) -> dict:
    """``trials`` independent sequences (the batch) of ``length`` tokens; the same draws for every ``selection``.

    Returns per-trial ``kept`` (needle in the final sparse cache) and ``retrieved`` (output cosine > 0.9)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)
    P, D = PATTERNS, DIM
    keys = F.normalize(torch.randn(trials, P + 1, D, generator=g, dtype=torch.float64), dim=-1)  # row P: needle
    values = torch.randn(trials, P + 1, D, generator=g, dtype=torch.float64) / D ** 0.5
    proj = torch.randn(D, D, generator=g, dtype=torch.float64)
    needle = torch.randint(0, length - 3 * ETA, (trials,), generator=g)
    rows = torch.arange(trials)
    pattern = torch.arange(length).remainder(P).repeat(trials, 1)
    pattern[rows, needle] = P

    def per_token(x):  # [trials, P+1, D] -> [trials, length, 1 head, D]
        return x.gather(1, pattern[..., None].expand(-1, -1, D))[:, :, None]

    k, v = per_token(keys), per_token(values)
    if features == "separating":
        fk = F.one_hot(pattern, D).to(torch.float64)[:, :, None]
    else:
        fk = torch.softmax(k @ proj.T, -1)
    q, fq = k.clone(), fk.clone()
    q[:, -1, 0] = 10 * D ** 0.5 * keys[:, P]           # the last token asks for the needle (softmax logit 10)
    fq[:, -1] = fk[rows, needle]
    o, state = lola_attention(q, k, v, fq, fk, torch.full((1,), 0.5, dtype=torch.float64), window_size=ETA,
                              cache_size=LAM, selection=selection, output_final_state=True)
    kept = (state.cache_pos[:, 0] == needle[:, None]).any(-1)
    retrieved = F.cosine_similarity(o[:, -1, 0], values[:, P], dim=-1) > 0.9
    return dict(kept=kept, retrieved=retrieved)


def run(lengths, trials: int, seed: int = 0, progress: bool = True) -> dict:
    cells = [(f, L, s) for f in FEATURES for L in lengths for s in SCORES]
    out = {f: {"kept": {s: {} for s in SCORES}, "retrieved": {s: {} for s in SCORES}} for f in FEATURES}
    for f, L, s in tqdm(cells, desc="cells", disable=not progress):
        r = trial_batch(L, f, s, trials, seed)
        for metric in ("kept", "retrieved"):
            out[f][metric][s][str(L)] = r[metric].double().mean().item()
    return dict(window_size=ETA, cache_size=LAM, patterns=PATTERNS, dim=DIM, trials=trials, seed=seed,
                lengths=list(lengths), features=out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None, help="default: next to --json, else loo_duplicates.png")
    args = p.parse_args(argv)
    if min(args.lengths) < 3 * ETA + 1:
        p.error(f"--lengths must be > {3 * ETA} (the needle sits at least 3η = {3 * ETA} tokens before the end)")

    result = run(args.lengths, args.trials, args.seed)
    print(f"Needle kept in the sparse cache / retrieved at the end, {args.trials} trials per cell, η = λ = {ETA}, "
          f"{PATTERNS} repeating patterns:")
    for f, r in result["features"].items():
        print(f"features: {f}")
        print("  score       " + "  ".join(f"{L:>11}" for L in args.lengths))
        for s in SCORES:
            print(f"  {s:<11} " + "  ".join(f"{r['kept'][s][str(L)]:5.0%}/{r['retrieved'][s][str(L)]:<5.0%}"
                                            for L in args.lengths))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    png = args.png or (os.path.splitext(args.json)[0] + ".png" if args.json else "loo_duplicates.png")
    plot(result, png)
    print(f"plot: {png}" + (f", numbers: {args.json}" if args.json else ""))
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    feats = list(result["features"])
    lengths = result["lengths"]
    fig, axes = plt.subplots(1, len(feats), figsize=(4.8 * len(feats), 3.8), sharey=True, squeeze=False)
    for ax, f in zip(axes[0], feats):
        for s in SCORES:
            ax.plot(lengths, [100 * result["features"][f]["kept"][s][str(L)] for L in lengths], marker="o", label=s)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{L // 1024}K" if L >= 1024 else str(L) for L in lengths])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(f"feature map: {f}")
        ax.set_ylim(-3, 103)
    axes[0][0].set_ylabel("needle kept in the sparse cache (%)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"A needle among {result['patterns']} repeating pairs, η = λ = {result['cache_size']}, "
                 f"{result['trials']} trials per point")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
