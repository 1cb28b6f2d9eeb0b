"""Pass-key retrieval of any causal LM with its own tokenizer, in RULER's single-needle format (``niah_single``).

A prompt hides one needle, ``One of the special magic numbers for {key} is: {value}.``, in a haystack of
repeated filler sentences, at a chosen depth (0 = before the first sentence, 1 = after the last), and ends with
the question. The model answers by greedy decoding; an answer is right when the decoded text contains the
7-digit value. Prompt lengths are counted in the model's own tokens, answer excluded.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass

import torch

PREAMBLE = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
            "I will quiz you about the numbers afterwards.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? "
            "The special magic number for {key} mentioned in the provided text is")
KEYS = ("harbor", "lantern", "meadow", "quartz", "saddle", "thistle", "violet", "walnut", "cobalt", "ember")


def _sentences() -> list[str]:
    return [s.strip() + "." for s in FILLER.split(".") if s.strip()]


def build_prompt(n_sentences: int, key: str, value: str, depth: float) -> str:
    """The prompt with ``n_sentences`` filler sentences and the needle at ``depth`` (a sentence boundary)."""
    base = _sentences()
    hay = [base[i % len(base)] for i in range(n_sentences)]
    hay.insert(round(depth * n_sentences), NEEDLE.format(key=key, value=value))
    return PREAMBLE + " ".join(hay) + QUESTION.format(key=key)


def fit_prompt(tokenizer, length: int, key: str, value: str, depth: float) -> list[int]:
    """Token ids of the longest prompt of at most ``length`` tokens (``ValueError`` if even no filler is too long)."""
    def ids(n):
        return tokenizer(build_prompt(n, key, value, depth), add_special_tokens=True)["input_ids"]

    if len(ids(0)) > length:
        raise ValueError(f"--lengths: {length} tokens cannot hold the question and needle ({len(ids(0))} tokens)")
    lo, hi = 0, 1
    while len(ids(hi)) <= length:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(ids(mid)) <= length else (lo, mid)
    return ids(lo)


@dataclass
class Trial:
    length: int
    depth: float
    tokens: int
    key: str
    value: str
    answer: str
    correct: bool


@torch.no_grad()
def run_passkey(model, tokenizer, lengths, depths: int = 5, seed: int = 0, progress: bool = True) -> list[Trial]:
    """Greedy pass-key retrieval at each length and at ``depths`` needle depths spread over [0, 1]."""
    from tqdm.auto import tqdm

    if depths < 1:
        raise ValueError(f"--depths must be at least 1, got {depths}")
    rng = random.Random(seed)
    spread = [i / (depths - 1) for i in range(depths)] if depths > 1 else [0.5]
    device = next(model.parameters()).device
    trials = []
    bar = tqdm(total=len(lengths) * len(spread), desc="passkey", disable=not progress, mininterval=2)
    for length in lengths:
        for depth in spread:
            key, value = rng.choice(KEYS), str(rng.randrange(10**6, 10**7))
            ids = fit_prompt(tokenizer, length, key, value, depth)
            want = len(tokenizer(" " + value, add_special_tokens=False)["input_ids"])
            out = model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long, device=device), max_new_tokens=want + 4, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
            trials.append(Trial(length, depth, len(ids), key, value, answer, value in answer))
            bar.update()
    bar.close()
    return trials


def summarize(trials: list[Trial]) -> dict:
    """``{'accuracy': {length: fraction}, 'trials': [...]}``."""
    lengths = sorted({t.length for t in trials})
    acc = {str(n): sum(t.correct for t in trials if t.length == n) / sum(t.length == n for t in trials)
           for n in lengths}
    return {"accuracy": acc, "trials": [asdict(t) for t in trials]}


def write_results(trials: list[Trial], json_path, png_path, title: str = "") -> dict:
    """JSON of every trial plus a PNG: accuracy per length, and each trial as a dot (length × depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(trials)
    with open(json_path, "w") as f:
        json.dump({"title": title, **summary}, f, indent=2)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    lengths = [int(n) for n in summary["accuracy"]]
    ax1.plot(lengths, [100 * a for a in summary["accuracy"].values()], marker="o")
    ax1.set(xscale="log", xlabel="prompt length (tokens)", ylabel="exact retrieval (%)", ylim=(-5, 105),
            title="accuracy per length")
    for t in trials:
        ax2.scatter(t.length, t.depth, c="tab:green" if t.correct else "tab:red", marker="o" if t.correct else "x")
    ax2.set(xscale="log", xlabel="prompt length (tokens)", ylabel="needle depth", title="trials (green: retrieved)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return summary


__all__ = ["build_prompt", "fit_prompt", "run_passkey", "summarize", "write_results", "Trial"]
