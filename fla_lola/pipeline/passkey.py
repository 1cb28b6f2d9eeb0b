"""Synthetic pass-key retrieval in miniature (RULER style): three tasks, a tokenizer, a teacher, exact match.

A document is a haystack with one or more needles, then the question, then the answer::

    <bos> The grass is green . The sky is blue . ... The pass key is 4 0 7 1 3 . Remember it . ...
    ... Here we go . What is the pass key ? The pass key is 4 0 7 1 3

Tasks (:data:`TASKS`):

- ``single``: one needle in a repetitive filler (the haystack above);
- ``text``: one needle in natural English prose, the Python language reference that ships with every CPython
  (``pydoc_data.topics``), its prose paragraphs split by a hash of their text into training passages (3/4) and
  held-out evaluation passages (1/4), so evaluation documents are prose no training step saw;
- ``multikey``: three needles with different names ("The pass key for ORCHID is 4 0 7 1 3 .") in the
  repetitive filler; the question asks for one of them, and only its key counts.

Tokens are words, punctuation marks and single digits; the vocabulary is the task words, the ten digits and the
:data:`PROSE_WORDS` most frequent words of the *training* passages, everything else reads as ``<unk>``. Each digit of
the 5-digit key is one token, and a document has exactly the requested number of tokens, answer included. A needle
starts at a sentence boundary of the haystack at a chosen depth (0 = first sentence, 1 = last before the question).

Exact match is judged teacher-forced: one forward pass over the whole document, and a document counts as
retrieved when the argmax at each of the 5 answer positions is the right digit. This is the same verdict
as greedy decoding of 5 tokens (greedy decoding is right on all 5 exactly when each teacher-forced argmax
is), and LoLA's prefill equals its token-by-token decoding, so one pass per document suffices.
"""

from __future__ import annotations

import collections
import functools
import math
import random
import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TASKS = ("single", "text", "multikey")
FILLER = "The grass is green . The sky is blue . The sun is yellow . Here we go . There and back again ."
NEEDLE = "The pass key is {key} . Remember it ."
QUESTION = "What is the pass key ? The pass key is"
NAMED_NEEDLE = "The pass key for {name} is {key} . Remember it ."
NAMED_QUESTION = "What is the pass key for {name} ? The pass key for {name} is"
NAMES = ["ORCHID", "TULIP", "LOTUS", "DAISY", "LILY", "IRIS", "ROSE", "POPPY", "ASTER", "DAHLIA", "VIOLET", "LILAC"]
N_NEEDLES = 3  # multikey: needles per document
KEY_DIGITS = 5
PROSE_WORDS = 1000  # the most frequent words of the training passages that get their own token

SPECIALS = ["<pad>", "<bos>", "<unk>"]
_TEMPLATES = (FILLER, NEEDLE, QUESTION, NAMED_NEEDLE, NAMED_QUESTION)
WORDS = sorted({w for t in _TEMPLATES for w in t.replace("{key}", "").replace("{name}", "").split()} | set(NAMES))
DIGITS = [str(d) for d in range(10)]
_TOKEN = re.compile(r"[A-Za-z]+|\d|[^\sA-Za-z\d]")  # a word, one digit, or one other visible character


def split_words(text: str) -> list[str]:
    return _TOKEN.findall(text)


@functools.lru_cache(maxsize=None)
def prose_passages() -> dict[str, list[list[str]]]:
    """The prose paragraphs of ``pydoc_data.topics`` as word lists, split into ``train`` and ``eval`` passages.

    A paragraph is prose when it has at least 12 tokens and at least 70 % of them are words (this drops code
    examples, grammar rules and tables). ``crc32`` of its text picks the split, so it is fixed everywhere.
    """
    from pydoc_data.topics import topics

    out = {"train": [], "eval": []}
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            words = split_words(para)
            if len(words) >= 12 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
                out["eval" if zlib.crc32(" ".join(words).encode()) % 4 == 0 else "train"].append(words)
    return out


class PassKeyTokenizer:
    """Words, punctuation marks and single digits; unknown words read as ``<unk>``."""

    def __init__(self, prose_words: int = PROSE_WORDS):
        fixed = SPECIALS + WORDS + DIGITS
        counts = collections.Counter(w for p in prose_passages()["train"] for w in p)
        known = set(fixed)
        # most frequent first, ties alphabetical: a fixed order on every machine
        prose = [w for w, _ in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if w not in known][:prose_words]
        self.vocab = fixed + prose
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_token_id = self.index["<pad>"]
        self.bos_token_id = self.index["<bos>"]
        self.unk_token_id = self.index["<unk>"]
        self.digit_ids = [self.index[d] for d in DIGITS]

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return self.encode_words(split_words(text))

    def encode_words(self, words: list[str]) -> list[int]:
        return [self.index.get(w, self.unk_token_id) for w in words]

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids)


TOKENIZER = PassKeyTokenizer()
_PERIOD = TOKENIZER.index["."]
_FILLER_IDS = TOKENIZER.encode(FILLER)
_SENTENCE_STARTS = [0] + [i + 1 for i, t in enumerate(_FILLER_IDS[:-1]) if t == _PERIOD]
_QUESTION_IDS = TOKENIZER.encode(QUESTION)


@functools.lru_cache(maxsize=None)
def _prose_stream(split: str) -> tuple[list[int], list[int]]:
    """All passages of a split as one token stream, and the offsets where passages start."""
    ids, starts = [], []
    for p in prose_passages()[split]:
        starts.append(len(ids))
        ids += TOKENIZER.encode_words(p)
    return ids, starts


def _needle(key: str, name: str | None) -> list[int]:
    spaced = " ".join(key)
    return TOKENIZER.encode(NEEDLE.format(key=spaced) if name is None else NAMED_NEEDLE.format(name=name, key=spaced))


def _question(name: str | None) -> list[int]:
    return _QUESTION_IDS if name is None else TOKENIZER.encode(NAMED_QUESTION.format(name=name))


def min_length(task: str = "single") -> int:
    """The shortest document of ``task``: the needles, the question, the answer and 8 filler tokens."""
    name = max(NAMES, key=len) if task == "multikey" else None
    needles = (N_NEEDLES if task == "multikey" else 1) * len(_needle("0" * KEY_DIGITS, name))
    return 1 + needles + len(_question(name)) + KEY_DIGITS + 8


MIN_LENGTH = min_length("single")


@dataclass
class PassKeyBatch:
    """Documents of one length. ``answer_start`` is the position of the first answer digit; ``more_answers`` the
    first digits of further answers (training documents that ask every needle, see :func:`make_batch`)."""

    input_ids: torch.Tensor  # [B, T] int64
    answer_start: int
    keys: list[str]
    depths: list[float]
    task: str = "single"
    more_answers: tuple = ()

    @property
    def answer_starts(self) -> tuple:
        return (self.answer_start, *self.more_answers)

    @property
    def answers(self) -> torch.Tensor:
        return self.input_ids[:, self.answer_start:]


def _filler(task: str, n: int, offset: int, split: str) -> list[int]:
    """``n`` haystack tokens starting at a sentence (repetitive filler) or passage (prose) start, cyclically."""
    if task == "text":
        stream, starts = _prose_stream(split)
        start = starts[offset % len(starts)]
    else:
        stream, start = _FILLER_IDS, _SENTENCE_STARTS[offset % len(_SENTENCE_STARTS)]
    reps = (start + n) // len(stream) + 1
    return (stream * reps)[start:start + n]


def make_document(length: int, key: str, depth: float, filler_offset: int = 0, *, task: str = "single",
                  split: str = "train", name: str | None = None, others: tuple = ()) -> list[int]:
    """One document of exactly ``length`` tokens; ``key`` is 5 digits, ``depth`` in [0, 1].

    ``task="text"`` takes its prose from ``split`` ("train" or "eval"). ``task="multikey"`` needs the asked
    needle's ``name`` and ``others``: ``(name, key, depth)`` of the other needles.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if length < min_length(task):
        raise ValueError(f"length {length} is below the minimum document length {min_length(task)} of task {task!r}")
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ValueError(f"key must be {KEY_DIGITS} digits, got {key!r}")
    if (task == "multikey") != (name is not None):
        raise ValueError("name (and others) are given for task 'multikey' only, and it needs them")
    needles = [(depth, _needle(key, name))] + [(d, _needle(k, n)) for n, k, d in others]
    question, answer = _question(name), TOKENIZER.encode(" ".join(key))
    n_filler = length - 1 - sum(len(x) for _, x in needles) - len(question) - len(answer)
    filler = _filler(task, n_filler, filler_offset, split)
    # sentence boundaries inside the filler (positions where a sentence starts), plus its end
    bounds = [0] + [i + 1 for i, t in enumerate(filler) if t == _PERIOD]
    cuts = sorted((bounds[min(len(bounds) - 1, round(d * (len(bounds) - 1)))], i) for i, (d, _) in enumerate(needles))
    doc, prev = [TOKENIZER.bos_token_id], 0
    for cut, i in cuts:
        doc += filler[prev:cut] + needles[i][1]
        prev = cut
    doc += filler[prev:] + question + answer
    assert len(doc) == length
    return doc


_QA_LENGTH = len(_question(NAMES[0])) + KEY_DIGITS  # a named question and its answer: every name is one token


def _more_length(task: str, ask_all: bool) -> int:
    """Tokens that ``ask_all`` appends to a ``task`` document: the other needles' questions and answers."""
    return (N_NEEDLES - 1) * _QA_LENGTH if ask_all and task == "multikey" else 0


def make_batch(length: int, n: int, generator: random.Random, depths: list[float] | None = None,
               task: str = "single", split: str = "train", ask_all: bool = False) -> PassKeyBatch:
    """``n`` documents of ``length`` tokens with random keys (and random depths unless given).

    ``ask_all`` (``multikey`` only, for training): after the answer, ask the other needles in turn, each question
    followed by its answer, so that a document teaches ``N_NEEDLES`` retrievals instead of one. The document up to
    its first answer is an ordinary ``multikey`` document, ``N_NEEDLES - 1`` question-answer pairs shorter, and the
    random draws are the same as without ``ask_all``.
    """
    extra = _more_length(task, ask_all)
    keys = ["".join(generator.choice(DIGITS) for _ in range(KEY_DIGITS)) for _ in range(n)]
    if depths is None:
        depths = [generator.random() for _ in range(n)]
    docs = []
    for key, depth in zip(keys, depths):
        kw = {}
        if task == "multikey":
            names = generator.sample(NAMES, N_NEEDLES)
            others = tuple((nm, "".join(generator.choice(DIGITS) for _ in range(KEY_DIGITS)), generator.random())
                           for nm in names[1:])
            kw = dict(name=names[0], others=others)
        offset = generator.randrange(1 << 30)
        more = []
        if extra:
            more = [_question(nm) + TOKENIZER.encode(" ".join(k)) for nm, k, _ in kw["others"]]
        doc = make_document(length - extra, key, depth, offset, task=task, split=split, **kw)
        docs.append(doc + [t for qa in more for t in qa])
    first = length - extra - KEY_DIGITS
    more_starts = tuple(first + i * _QA_LENGTH for i in range(1, N_NEEDLES)) if extra else ()
    return PassKeyBatch(torch.tensor(docs), first, keys, list(depths), task, more_starts)


EVAL_SEED = 20250528  # evaluation documents; training draws from its own seed and never uses this one


def eval_documents(length: int, n: int, seed: int = EVAL_SEED, task: str = "single") -> PassKeyBatch:
    """The evaluation set of ``task`` at one length: ``n`` documents, needle depths evenly spread over [0, 1]
    (``text`` documents draw their prose from the held-out passages)."""
    depths = [i / (n - 1) for i in range(n)] if n > 1 else [0.5]
    tag = "" if task == "single" else f"{task}-"
    return make_batch(length, n, random.Random(f"passkey-eval-{seed}-{tag}{length}"), depths, task=task,
                      split="eval")


def answer_logits(model, input_ids: torch.Tensor, answer_start: int) -> torch.Tensor:
    """Logits predicting the answer digits: ``[B, 5, V]``."""
    out = model(input_ids=input_ids[:, :-1], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    return logits[:, answer_start - 1:]


@torch.no_grad()
def predict_answers(model, batch: PassKeyBatch, batch_size: int = 8) -> torch.Tensor:
    """``[B, 5]``: the argmax token at each answer position (teacher-forced, see module doc)."""
    return torch.cat([answer_logits(model, batch.input_ids[i:i + batch_size], batch.answer_start).argmax(-1)
                      for i in range(0, batch.input_ids.shape[0], batch_size)])


def exact_match(model, batch: PassKeyBatch, batch_size: int = 8) -> torch.Tensor:
    """``[B]`` bool: every answer digit is the argmax at its position."""
    return (predict_answers(model, batch, batch_size) == batch.answers).all(-1)


# How a prediction of the answer went wrong, one character per document (``examples/passkey.py`` records them):
# "1" right; "k" another key of the prompt, whole (another needle's, in `multikey`); "s" wrong digits that each
# equal the digit at the same place of another key of the prompt (copied from the wrong needle); "0" other wrong
# digits. A key of the prompt is any run of 5 digit tokens other than the asked key.
VERDICTS = {"1": "right", "k": "another key", "s": "digits from another key, same place", "0": "other wrong digits"}


def verdict(prompt: list[int], answer: list[int], pred: list[int]) -> str:
    """The :data:`VERDICTS` character of ``pred`` (the predicted answer tokens) for ``answer`` after ``prompt``."""
    if pred == answer:
        return "1"
    digits = set(TOKENIZER.digit_ids)
    others = [prompt[i:i + KEY_DIGITS] for i in range(len(prompt) - KEY_DIGITS + 1)
              if all(t in digits for t in prompt[i:i + KEY_DIGITS]) and prompt[i:i + KEY_DIGITS] != answer]
    if pred in others:
        return "k"
    wrong = [j for j in range(KEY_DIGITS) if pred[j] != answer[j]]
    return "s" if all(any(o[j] == pred[j] for o in others) for j in wrong) else "0"


# ---------------------------------------------------------------- the teacher


def teacher_config(**overrides):
    """The demo's softmax teacher: a 3-layer Llama, hidden 128, 4 heads, MLP 256, RoPE θ = 1e4."""
    from transformers import LlamaConfig

    kw = dict(
        vocab_size=len(TOKENIZER), hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192, rope_theta=1e4,
        bos_token_id=TOKENIZER.bos_token_id, pad_token_id=TOKENIZER.pad_token_id, eos_token_id=None,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@dataclass
class Phase:
    """``steps`` optimizer steps on documents of ``min_len..max_len`` tokens (log-uniform) at ``lr``; each step draws
    its task by ``tasks`` (weights; default :data:`TASK_WEIGHTS`). ``decay``: the learning rate follows a cosine from
    ``lr`` to 0 over the phase (after the warm-up every phase has); ``ask_all``: ``multikey`` documents ask every
    needle (:func:`make_batch`); ``gap``: the probability that a step's documents skip positions
    (:func:`gapped_positions`) so that they span up to ``span`` positions; ``lm_weight``: of the next-token loss on
    every token beside the answer loss (:func:`passkey_loss`; at 0 the head runs on the answer positions only)."""

    steps: int
    min_len: int
    max_len: int
    lr: float
    tasks: dict | None = None
    decay: bool = False
    ask_all: bool = False
    gap: float = 0.0
    span: int = 0
    lm_weight: float = 0.1


# Short documents first, `single` and `multikey` mixed from the first step (the answer loss sits at chance until
# retrieval is found), then short documents mostly of `multikey`, then every task up to 1K, and last every task at
# 1K-3K and then 2K-4.6K with a cosine learning rate and `multikey` drawn 60 % of the time. From the second phase on,
# `multikey` documents ask every needle (three answers per document instead of one). From the third, a share of the
# steps skip positions (`gap`, :func:`gapped_positions`) so that documents of up to 3-4.6K tokens teach distances of
# up to 6K; the last two phases train the answer loss alone (`lm_weight=0`: the head runs on ~15 positions instead of
# every one, 7-15 % off a long step). The model does not extrapolate past the distances it trained on.
# What the gaps are for (measured on the previous teacher, trained without them; `multikey`, 50 documents a cell):
# its misses at 4K sat where the needle is 3-4K tokens from the question, and 1K documents whose question was moved
# 1K positions on scored 98 %, moved 3K on 34 %: the distance, not the filler in between, is what it had not learned.
# Adding them (same steps, same cost) took `multikey` from 92 / 92 / 89 / 76 % at 512-4K (100 documents a cell) to
# 98 / 98 / 94 / 90 % (50); then the shorter 4th phase, no next-token loss in the long phases and `multikey` at 60 %
# (was 50 %, `single` 20 %) cut the teacher's time from 1,722 to 1,624 s and gave 96 / 98 / 100 / 90 % (50), 98 / 98 /
# 97 / 98 % on the shipped evaluation's 100 documents a cell.
# Earlier: `multikey` misses are never another needle's whole key; up to 2K most are digits read from another needle's
# key at the same place (:func:`verdict`). Measured while choosing the first phases (answer loss per digit on
# `multikey`): a 2-layer model stayed near chance (1.9 after 350 multikey-heavy steps); 3 layers trained on `single`
# alone first learned to copy *a* needle but not to match the name (0.4-0.5 after 700 such steps; the first digit right
# about a third of the time); mixing `multikey` in from the first step broke through (0.15 after 950 steps). 4 layers
# or 8 heads of 16 dimensions learned more slowly than 3 layers of 4 × 32.
LONG_TASK_WEIGHTS = {"single": 0.1, "text": 0.3, "multikey": 0.6}
TEACHER_SCHEDULE = [
    Phase(500, 73, 160, 1e-3, {"single": 0.5, "multikey": 0.5}),
    Phase(700, 73, 256, 1e-3, {"single": 0.2, "text": 0.2, "multikey": 0.6}, ask_all=True),
    Phase(600, 128, 1024, 1e-3, ask_all=True, gap=0.3, span=4096),
    Phase(1000, 1024, 3072, 5e-4, LONG_TASK_WEIGHTS, decay=True, ask_all=True, gap=0.6, span=6144, lm_weight=0),
    Phase(1000, 2048, 4608, 3e-4, LONG_TASK_WEIGHTS, decay=True, ask_all=True, gap=0.5, span=6144, lm_weight=0),
]
TEACHER_TOKENS_PER_STEP = 4096  # a step is one document when the length is above this
# every training step draws one task with these weights (multikey, the hardest, most often)
TASK_WEIGHTS = {"single": 0.25, "text": 0.35, "multikey": 0.4}


def random_batch(rng: random.Random, min_len: int, max_len: int, tokens: int, weights=None,
                 ask_all: bool = False) -> PassKeyBatch:
    """A training batch: a task drawn by ``weights``, a log-uniform length, ``tokens // length`` documents."""
    weights = weights or TASK_WEIGHTS
    task = rng.choices(list(weights), list(weights.values()))[0]
    length = round(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
    length = max(length, min_length(task) + _more_length(task, ask_all))
    return make_batch(length, max(1, tokens // length), rng, task=task, split="train", ask_all=ask_all)


def gapped_positions(batch: PassKeyBatch, rng: random.Random, span: int) -> torch.Tensor:
    """``[B, T]`` position ids with one gap: a document's tokens from a random sentence start up to its question
    (inclusive) on keep their order but sit ``G`` positions further on, ``T + G`` log-uniform in ``[T, span]`` (one
    draw for the batch, one cut for each document). RoPE sees only relative positions, so what changes is the
    distance from the needles before the cut to the question: a document of ``T`` tokens teaches the distances of one
    of up to ``span``, at the cost of ``T`` (positional skip-wise training, PoSE; no token is hidden, only the filler
    of the gap is missing). Every other neighbourhood, needles, question and answer, keeps its spacing."""
    ids = batch.input_ids
    T = ids.shape[1]
    gap = round(math.exp(rng.uniform(math.log(T), math.log(max(T, span))))) - T
    question = batch.answer_start - len(_question(NAMES[0] if batch.task == "multikey" else None))  # names: 1 token
    pos = torch.arange(T).repeat(ids.shape[0], 1)
    for row, doc in zip(pos, ids[:, :question].tolist()):
        cut = rng.choice([j for j in range(1, question) if doc[j - 1] == _PERIOD] + [question])
        row[cut:] += gap
    return pos


def answer_positions(answer_start) -> torch.Tensor:
    """The positions of the answer digits: of one answer (``answer_start`` an int) or of each (a sequence)."""
    starts = [answer_start] if isinstance(answer_start, int) else list(answer_start)
    return torch.tensor([s + j for s in starts for j in range(KEY_DIGITS)])


def passkey_loss(logits: torch.Tensor, ids: torch.Tensor, answer_start, lm_weight: float = 0.1):
    """Cross-entropy on the answer digits, plus ``lm_weight`` × next-token loss on every token. ``answer_start``:
    the first digit of the answer, or of each answer (a sequence, :attr:`PassKeyBatch.answer_starts`)."""
    pos = answer_positions(answer_start)
    ans = F.cross_entropy(logits[:, pos - 1].flatten(0, 1), ids[:, pos].flatten())
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return ans + lm_weight * lm, ans


def train_teacher(model, schedule=TEACHER_SCHEDULE, tokens_per_step: int = TEACHER_TOKENS_PER_STEP, seed: int = 0,
                  progress: bool = True, log_every: int = 50, log=print):
    """Train ``model`` (a causal LM returning ``.logits``) on random pass-key documents. Returns the losses."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(f"passkey-train-{seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=schedule[0].lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    history, recent = [], collections.defaultdict(list)
    total = sum(p.steps for p in schedule)
    bar = tqdm(total=total, desc="teacher", disable=not progress, mininterval=2)
    step = 0
    for phase in schedule:
        for g in opt.param_groups:
            g["lr"] = phase.lr
        for i in range(phase.steps):
            scale = min(1.0, (i + 1) / 50)  # short warm-up at every phase change
            if phase.decay:
                scale *= 0.5 * (1 + math.cos(math.pi * i / phase.steps))
            for g in opt.param_groups:
                g["lr"] = phase.lr * scale
            batch = random_batch(rng, phase.min_len, phase.max_len, tokens_per_step, phase.tasks, phase.ask_all)
            length = batch.input_ids.shape[1]
            kw = {}
            if phase.gap and rng.random() < phase.gap:
                kw["position_ids"] = gapped_positions(batch, rng, phase.span)
            if phase.lm_weight:
                logits = model(input_ids=batch.input_ids, **kw).logits
                loss, ans = passkey_loss(logits, batch.input_ids, batch.answer_starts, phase.lm_weight)
            else:  # the head only where it predicts an answer digit
                pos = answer_positions(batch.answer_starts)
                logits = model(input_ids=batch.input_ids, logits_to_keep=pos - 1, **kw).logits
                loss = ans = F.cross_entropy(logits.flatten(0, 1), batch.input_ids[:, pos].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            history.append(ans.item())
            recent[batch.task].append(ans.item())
            step += 1
            bar.update(1)
            if step % log_every == 0:
                every = [x for xs in recent.values() for x in xs]
                per_task = ", ".join(f"{t} {sum(xs) / len(xs):.2f}" for t, xs in sorted(recent.items()))
                msg = f"step {step}/{total} len {length} answer loss {sum(every) / len(every):.3f} ({per_task})"
                bar.set_postfix_str(msg.split(" answer ")[1])
                if log is not None:
                    log(msg)
                recent = collections.defaultdict(list)
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
    from fla_lola.pipeline.convert import convert_to_lola
    from fla_lola.pipeline.distill import attention_transfer

    student = convert_to_lola(teacher, seed=seed, **{**STUDENT, **student})

    def batch(i):
        return random_batch(random.Random(f"passkey-distill-{seed}-{i}"), min_len, max_len, tokens_per_step).input_ids

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
