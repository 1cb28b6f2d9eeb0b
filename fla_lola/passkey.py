"""Synthetic pass-key retrieval in miniature (RULER style): documents, a tokenizer, a teacher, exact match.

A document is a haystack of repetitive filler with one needle, then the question, then the answer::

    <bos> The grass is green . The sky is blue . ... The pass key is 4 0 7 1 3 . Remember it . ...
    ... Here we go . What is the pass key ? The pass key is 4 0 7 1 3

Every word is one token (a vocabulary of 35), each digit of the 5-digit key is one token, and a document
has exactly the requested number of tokens, answer included. The needle starts at a sentence boundary
of the filler at a chosen depth (0 = first sentence, 1 = last sentence before the question).

Exact match is judged teacher-forced: one forward pass over the whole document, and a document counts as
retrieved when the argmax at each of the 5 answer positions is the right digit. This is the same verdict
as greedy decoding of 5 tokens (greedy decoding is right on all 5 exactly when each teacher-forced argmax
is), and LoLA's prefill equals its token-by-token decoding, so one pass per document suffices.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FILLER = "The grass is green . The sky is blue . The sun is yellow . Here we go . There and back again ."
NEEDLE = "The pass key is {key} . Remember it ."
QUESTION = "What is the pass key ? The pass key is"
KEY_DIGITS = 5

SPECIALS = ["<pad>", "<bos>"]
WORDS = sorted(set(FILLER.split()) | set(NEEDLE.replace("{key}", "").split()) | set(QUESTION.split()))
DIGITS = [str(d) for d in range(10)]


class PassKeyTokenizer:
    """A word-level tokenizer: one token per whitespace-separated word, one per digit."""

    def __init__(self):
        self.vocab = SPECIALS + WORDS + DIGITS
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id = self.index["<pad>"]
        self.bos_token_id = self.index["<bos>"]
        self.digit_ids = [self.index[d] for d in DIGITS]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.index[w] for w in text.split()]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


TOKENIZER = PassKeyTokenizer()
_FILLER_IDS = TOKENIZER.encode(FILLER)
_SENTENCE_STARTS = [0] + [i + 1 for i, t in enumerate(_FILLER_IDS[:-1]) if t == TOKENIZER.index["."]]
_QUESTION_IDS = TOKENIZER.encode(QUESTION)
MIN_LENGTH = 1 + len(TOKENIZER.encode(NEEDLE.format(key="0 0 0 0 0"))) + len(_QUESTION_IDS) + KEY_DIGITS + 8


@dataclass
class PassKeyBatch:
    """Documents of one length. ``answer_start`` is the position of the first answer digit."""

    input_ids: torch.Tensor  # [B, T] int64
    answer_start: int
    keys: list[str]
    depths: list[float]

    @property
    def answers(self) -> torch.Tensor:
        return self.input_ids[:, self.answer_start:]


def make_document(length: int, key: str, depth: float, filler_offset: int = 0) -> list[int]:
    """One document of exactly ``length`` tokens; ``key`` is 5 digits, ``depth`` in [0, 1]."""
    if length < MIN_LENGTH:
        raise ValueError(f"length {length} is below the minimum document length {MIN_LENGTH}")
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ValueError(f"key must be {KEY_DIGITS} digits, got {key!r}")
    needle = TOKENIZER.encode(NEEDLE.format(key=" ".join(key)))
    answer = TOKENIZER.encode(" ".join(key))
    n_filler = length - 1 - len(needle) - len(_QUESTION_IDS) - len(answer)
    start = _SENTENCE_STARTS[filler_offset % len(_SENTENCE_STARTS)]
    reps = (start + n_filler) // len(_FILLER_IDS) + 1
    filler = (_FILLER_IDS * reps)[start:start + n_filler]
    # sentence boundaries inside the filler (positions where a sentence starts), plus its end
    bounds = [0] + [i + 1 for i, t in enumerate(filler) if t == TOKENIZER.index["."]]
    cut = bounds[min(len(bounds) - 1, round(depth * (len(bounds) - 1)))]
    doc = [TOKENIZER.bos_token_id] + filler[:cut] + needle + filler[cut:] + _QUESTION_IDS + answer
    assert len(doc) == length
    return doc


def make_batch(length: int, n: int, generator: random.Random, depths: list[float] | None = None) -> PassKeyBatch:
    """``n`` documents of ``length`` tokens with random keys (and random depths unless given)."""
    keys = ["".join(generator.choice(DIGITS) for _ in range(KEY_DIGITS)) for _ in range(n)]
    if depths is None:
        depths = [generator.random() for _ in range(n)]
    offsets = [generator.randrange(len(_SENTENCE_STARTS)) for _ in range(n)]
    docs = [make_document(length, k, d, o) for k, d, o in zip(keys, depths, offsets)]
    return PassKeyBatch(torch.tensor(docs), length - KEY_DIGITS, keys, list(depths))


EVAL_SEED = 20250528  # evaluation documents; training draws from its own seed and never uses this one


def eval_documents(length: int, n: int, seed: int = EVAL_SEED) -> PassKeyBatch:
    """The evaluation set at one length: ``n`` documents, needle depths evenly spread over [0, 1]."""
    depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    return make_batch(length, n, random.Random(f"passkey-eval-{seed}-{length}"), depths)


def answer_logits(model, input_ids: torch.Tensor, answer_start: int) -> torch.Tensor:
    """Logits predicting the answer digits: ``[B, 5, V]``."""
    out = model(input_ids=input_ids[:, :-1], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, answer_start - 1:]


@torch.no_grad()
def exact_match(model, batch: PassKeyBatch, batch_size: int = 8) -> torch.Tensor:
    """``[B]`` bool: every answer digit is the argmax at its position (teacher-forced, see module doc)."""
    hits = []
    for i in range(0, batch.input_ids.shape[0], batch_size):
        ids = batch.input_ids[i:i + batch_size]
        pred = answer_logits(model, ids, batch.answer_start).argmax(-1)
        hits.append((pred == ids[:, batch.answer_start:]).all(-1))
    return torch.cat(hits)


# ---------------------------------------------------------------- the teacher


def teacher_config(**overrides):
    """The demo's softmax teacher: a 2-layer Llama, hidden 128, 4 heads, MLP 256, RoPE θ = 1e4."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=len(TOKENIZER), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096, rope_theta=1e4,
        bos_token_id=TOKENIZER.bos_token_id, pad_token_id=TOKENIZER.pad_token_id, eos_token_id=None,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@dataclass
class Phase:
    """``steps`` optimizer steps on documents of ``min_len..max_len`` tokens (log-uniform) at ``lr``."""

    steps: int
    min_len: int
    max_len: int
    lr: float


# Short documents first (the answer loss sits at chance until retrieval is found), then every
# length evaluated: the model does not extrapolate past the lengths it trained on.
TEACHER_SCHEDULE = [
    Phase(1000, 48, 128, 1e-3),
    Phase(1000, 64, 1024, 1e-3),
    Phase(800, 512, 4096, 3e-4),
    Phase(400, 512, 4096, 1e-4),
]


def passkey_loss(logits: torch.Tensor, ids: torch.Tensor, answer_start: int, lm_weight: float = 0.1):
    """Cross-entropy on the answer digits, plus ``lm_weight`` × next-token loss on every token."""
    ans = F.cross_entropy(logits[:, answer_start - 1:-1].flatten(0, 1), ids[:, answer_start:].flatten())
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return ans + lm_weight * lm, ans


def train_teacher(model, schedule=TEACHER_SCHEDULE, tokens_per_step: int = 4096, seed: int = 0,
                  progress: bool = True, log_every: int = 50, log=print):
    """Train ``model`` (a causal LM returning ``.logits``) on random pass-key documents. Returns the losses."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(f"passkey-train-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=schedule[0].lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    history, recent = [], []
    total = sum(p.steps for p in schedule)
    bar = tqdm(total=total, desc="teacher", disable=not progress, mininterval=2)
    step = 0
    for phase in schedule:
        for g in opt.param_groups:
            g["lr"] = phase.lr
        for i in range(phase.steps):
            warm = min(1.0, (i + 1) / 50)  # short warm-up at every phase change
            for g in opt.param_groups:
                g["lr"] = phase.lr * warm
            length = round(math.exp(rng.uniform(math.log(phase.min_len), math.log(phase.max_len))))
            batch = make_batch(length, max(1, tokens_per_step // length), rng)
            logits = model(input_ids=batch.input_ids).logits
            loss, ans = passkey_loss(logits, batch.input_ids, batch.answer_start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history.append(ans.item())
            recent.append(ans.item())
            step += 1
            bar.update(1)
            if step % log_every == 0:
                msg = f"step {step}/{total} len {length} answer loss {sum(recent) / len(recent):.3f}"
                bar.set_postfix_str(msg.split(" answer ")[1])
                if log is not None:
                    log(msg)
                recent = []
    bar.close()
    model.eval()
    return history


# ---------------------------------------------------------------- the student

# The demo student: η = 64, λ = 64, F = 2 × 32 features per head. Attention transfer trains it with λ = 0.
STUDENT = dict(window_size=64, cache_size=64, feature_dim=32, mix="lola", selection="sre")


def distill_student(teacher, steps: int = 150, min_len: int = 256, max_len: int = 1024,
                    tokens_per_step: int = 4096, lr: float = 1e-2, seed: int = 0, progress: bool = True,
                    log=print, **student):
    """Convert ``teacher`` to LoLA and fit its feature maps and mixing logits by attention transfer."""
    from fla_lola.convert import convert_to_lola
    from fla_lola.distill import attention_transfer

    student = convert_to_lola(teacher, seed=seed, **{**STUDENT, **student})

    def batch(i):
        rng = random.Random(f"passkey-distill-{seed}-{i}")
        length = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
        return make_batch(length, max(1, tokens_per_step // length), rng).input_ids

    attention_transfer(student, teacher, batch, steps, lr=lr, progress=progress, log=log)
    return student


def save_model(model, path: str) -> None:
    """``path.safetensors`` (weights) and ``path.json`` (config)."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{path}.safetensors")
    model.config.to_json_file(f"{path}.json")


def load_teacher(path: str):
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM._from_config(LlamaConfig.from_json_file(f"{path}.json"), attn_implementation="sdpa")
    model.load_state_dict(load_file(f"{path}.safetensors"))
    return model.eval()


def load_student(path: str):
    from safetensors.torch import load_file

    from fla_lola.models.lola.configuration_lola import LoLAConfig
    from fla_lola.models.lola.modeling_lola import LoLAForCausalLM

    model = LoLAForCausalLM(LoLAConfig.from_json_file(f"{path}.json"))
    model.load_state_dict(load_file(f"{path}.safetensors"))
    return model.eval()
