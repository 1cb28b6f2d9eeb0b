"""The pass-key pipeline: documents, conversion, attention transfer, LoLCATs import, selection, the demo."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from fla_lola import lola_attention
from fla_lola.pipeline import passkey as pk
from fla_lola.pipeline.convert import convert_to_lola, set_lola
from fla_lola.pipeline.distill import attention_transfer, lola_layers, layer_mse
from fla_lola.pipeline.lolcats import load_lolcats_checkpoint, lolcats_state_dict
from fla_lola.ops.utils import random_score

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(kind="llama", **kw):
    """A random 2-layer transformers model with GQA (4 query heads, 2 key/value heads)."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[kind]
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases start at zero; make them matter
                p.normal_(0, 0.5)
    return model


# ---------------------------------------------------------------- documents


def test_documents_have_the_requested_length_needle_and_answer():
    for length in (pk.MIN_LENGTH, 100, 512):
        for depth in (0.0, 0.37, 1.0):
            doc = pk.make_document(length, "40713", depth, filler_offset=3)
            text = pk.TOKENIZER.decode(doc)
            assert len(doc) == length
            assert text.count("The pass key is 4 0 7 1 3 . Remember it .") == 1
            assert text.endswith("What is the pass key ? The pass key is 4 0 7 1 3")
    early = pk.TOKENIZER.decode(pk.make_document(512, "11111", 0.0)).index("pass key")
    late = pk.TOKENIZER.decode(pk.make_document(512, "11111", 1.0)).index("pass key")
    assert early < 20 < late
    with pytest.raises(ValueError, match="minimum document length"):
        pk.make_document(pk.MIN_LENGTH - 1, "12345", 0.5)


def test_text_documents_hide_the_needle_in_prose_held_out_from_training():
    passages = pk.prose_passages()
    train = {" ".join(p) for p in passages["train"]}
    assert passages["eval"] and not train & {" ".join(p) for p in passages["eval"]}
    batch = pk.eval_documents(1024, 5, task="text")
    eval_stream, _ = pk._prose_stream("eval")
    cyclic = "," + ",".join(map(str, eval_stream * 2)) + ","
    for doc, key in zip(batch.input_ids.tolist(), batch.keys):
        text = pk.TOKENIZER.decode(doc)
        assert len(doc) == 1024 and text.count("The pass key is") == 2  # the needle and the question
        # without the needle and the question, the haystack is a contiguous stretch of the held-out stream
        needle = pk.TOKENIZER.encode(pk.NEEDLE.format(key=" ".join(key)))
        i = next(j for j in range(len(doc)) if doc[j:j + len(needle)] == needle)
        hay = doc[1:i] + doc[i + len(needle):len(doc) - len(pk.TOKENIZER.encode(pk.QUESTION)) - pk.KEY_DIGITS]
        assert "," + ",".join(map(str, hay)) + "," in cyclic
    assert len(pk.TOKENIZER) < 1100 and pk.TOKENIZER.encode("zyzzyva") == [pk.TOKENIZER.unk_token_id]


def test_multikey_documents_have_three_named_needles_and_ask_for_one():
    batch = pk.eval_documents(512, 6, task="multikey")
    for doc, key, depth in zip(batch.input_ids.tolist(), batch.keys, batch.depths):
        text = pk.TOKENIZER.decode(doc)
        asked = text.split("What is the pass key for ")[1].split(" ")[0]
        needles = text.split("The pass key for ")[1:-1]          # the last one is in the question
        assert len(doc) == 512 and len(needles) == pk.N_NEEDLES
        names = [n.split(" ")[0] for n in needles]
        assert asked in names and len(set(names)) == pk.N_NEEDLES
        assert f"The pass key for {asked} is {' '.join(key)} . Remember it ." in text
        assert text.endswith(f"The pass key for {asked} is {' '.join(key)}")
    with pytest.raises(ValueError, match="name"):
        pk.make_document(512, "12345", 0.5, task="multikey")


def test_training_documents_that_ask_every_needle():
    plain = pk.make_batch(600, 4, random.Random("ask"), task="multikey")
    asked = pk.make_batch(600, 4, random.Random("ask"), task="multikey", ask_all=True)
    assert asked.input_ids.shape == (4, 600) and plain.more_answers == () and len(asked.more_answers) == 2
    assert asked.keys == plain.keys and asked.depths == plain.depths  # the same draws
    first = asked.answer_start + pk.KEY_DIGITS
    for doc, key in zip(asked.input_ids.tolist(), asked.keys):
        text = pk.TOKENIZER.decode(doc)
        # up to its first answer, an ordinary multikey document: three needles, one question, its key
        head = pk.TOKENIZER.decode(doc[:first])
        assert head.endswith(f"is {' '.join(key)}") and head.count("What is") == 1
        assert text.count("What is the pass key for ") == pk.N_NEEDLES
        for start in asked.answer_starts:  # every answer is the key of the needle its question names
            name = pk.TOKENIZER.decode(doc[:start]).split("What is the pass key for ")[-1].split(" ")[0]
            digits = " ".join(pk.TOKENIZER.vocab[t] for t in doc[start:start + pk.KEY_DIGITS])
            assert f"The pass key for {name} is {digits} . Remember it ." in text
    single = pk.make_batch(300, 2, random.Random("ask"), ask_all=True)  # one needle: nothing more to ask
    assert single.more_answers == ()
    assert torch.equal(single.input_ids, pk.make_batch(300, 2, random.Random("ask")).input_ids)
    # the loss takes every answer: an oracle's logits give it no answer loss, corrupting one later answer does
    ids = asked.input_ids
    logits = torch.full((*ids.shape, len(pk.TOKENIZER)), -20.0).scatter(-1, ids.roll(-1, 1)[..., None], 20.0)
    _, ans = pk.passkey_loss(logits, ids, asked.answer_starts)
    assert ans < 1e-6
    logits[:, asked.more_answers[-1] + 1] = 0.0
    assert pk.passkey_loss(logits, ids, asked.answer_starts)[1] > 0.1
    assert pk.passkey_loss(logits, ids, asked.answer_start)[1] < 1e-6


@pytest.mark.parametrize("task", pk.TASKS)
def test_gapped_positions_skip_filler_only_and_reach_the_span(task):
    rng = random.Random(f"gap-{task}")
    batch = pk.make_batch(400, 6, rng, task=task, ask_all=True)
    question = batch.answer_start - len(pk._question(pk.NAMES[0] if task == "multikey" else None))
    gaps = set()
    for _ in range(5):
        pos = pk.gapped_positions(batch, rng, 3000)
        assert pos.shape == batch.input_ids.shape and pos.dtype == torch.int64 and pos[:, 0].eq(0).all()
        steps = pos.diff(dim=1)
        assert steps.ge(1).all() and steps.ne(1).sum(1).le(1).all()   # in order, at most one jump a document
        assert pos[:, -1].max() < 3000 and pos[:, -1].unique().numel() == 1   # one gap for the batch, within span
        gaps.add(pos[0, -1].item() + 1 - 400)
        for doc, row in zip(batch.input_ids.tolist(), pos.tolist()):
            cut = next((j for j in range(1, 400) if row[j] - row[j - 1] > 1), None)
            if cut is None:
                continue
            assert cut <= question and (cut == question or doc[cut - 1] == pk.TOKENIZER.index["."])
            # a needle's sentence (name, key and its period) never straddles the cut
            last_needle = pk.TOKENIZER.decode(doc[:cut]).rsplit("The pass key", 1)
            assert len(last_needle) == 1 or " ." in last_needle[1]
    assert len(gaps) > 1 and 0 < min(gaps)
    # no room for a gap: the positions are 0 .. T - 1
    assert torch.equal(pk.gapped_positions(batch, rng, 400), torch.arange(400).repeat(6, 1))


def test_training_passes_gapped_positions_and_answer_positions_to_the_model():
    seen = []

    class Recorder(torch.nn.Module):  # a bigram model that records what training asks of it
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(len(pk.TOKENIZER), len(pk.TOKENIZER))

        def forward(self, input_ids, position_ids=None, logits_to_keep=None):
            seen.append((input_ids, position_ids, logits_to_keep))
            logits = self.emb(input_ids)
            return type("Out", (), {"logits": logits if logits_to_keep is None else logits[:, logits_to_keep]})

    schedule = [pk.Phase(3, 100, 120, 1e-3, gap=1.0, span=1000), pk.Phase(2, 100, 120, 1e-3),
                pk.Phase(2, 100, 120, 0.0, {"multikey": 1.0}, ask_all=True, lm_weight=0)]  # lr 0: nothing moves
    model = Recorder()
    losses = pk.train_teacher(model, schedule, tokens_per_step=256, progress=False, log=None)
    assert all(p is not None and p[:, -1].max() < 1000 for _, p, _ in seen[:3])
    assert all(p is None and k is None for _, p, k in seen[3:5])
    # lm_weight=0: the head runs only where the digits of the three answers are predicted; the loss is the answer
    # loss of the full logits
    ids, _, keep = seen[-1]
    assert keep.numel() == pk.N_NEEDLES * pk.KEY_DIGITS
    assert all(pk.TOKENIZER.vocab[t] in pk.DIGITS for t in ids[:, keep + 1].flatten().tolist())
    with torch.no_grad():
        _, expected = pk.passkey_loss(model(ids).logits, ids, tuple((keep[::pk.KEY_DIGITS] + 1).tolist()))
    assert losses[-1] == pytest.approx(expected.item(), rel=1e-5)


def test_eval_documents_are_fixed_and_spread_in_depth():
    a, b = pk.eval_documents(256, 11), pk.eval_documents(256, 11)
    assert torch.equal(a.input_ids, b.input_ids)
    assert a.depths == [i / 10 for i in range(11)]
    assert len(set(a.keys)) == 11
    train = pk.make_batch(256, 11, random.Random("passkey-train-0"))
    assert not set(train.keys) & set(a.keys)


def test_exact_match_scores_an_oracle_and_a_guesser():
    batch = pk.eval_documents(128, 6)

    def oracle(input_ids, use_cache=False):  # puts all mass on the true next token
        nxt = batch.input_ids[:, 1:input_ids.shape[1] + 1]
        return torch.nn.functional.one_hot(nxt, len(pk.TOKENIZER)).float()

    def zeros(input_ids, use_cache=False):  # always says "0 0 0 0 0"
        logits = torch.zeros(*input_ids.shape, len(pk.TOKENIZER))
        logits[..., pk.TOKENIZER.index["0"]] = 1
        return logits

    assert pk.exact_match(oracle, batch).all()
    assert (pk.exact_match(zeros, batch, batch_size=4) == torch.tensor([k == "00000" for k in batch.keys])).all()


def test_verdict_tells_how_a_multikey_answer_went_wrong():
    """On real ``multikey`` documents: the asked key is "1", another needle's whole key "k", the asked key with one
    digit taken from another needle's key at the same place "s", a digit no key has at that place "0"."""
    batch = pk.eval_documents(256, 20, task="multikey")
    digit = {d: i for d, i in zip(pk.DIGITS, pk.TOKENIZER.digit_ids)}
    seen = set()
    for doc, key in zip(batch.input_ids.tolist(), batch.keys):
        prompt, answer = doc[:batch.answer_start], doc[batch.answer_start:]
        assert answer == [digit[d] for d in key]
        keys = [prompt[i:i + 5] for i in range(len(prompt) - 4) if all(t in digit.values() for t in prompt[i:i + 5])]
        others = [k for k in keys if k != answer]
        assert len(keys) == pk.N_NEEDLES and len(others) == pk.N_NEEDLES - 1   # the three needles' keys
        assert pk.verdict(prompt, answer, answer) == "1"
        assert pk.verdict(prompt, answer, others[0]) == "k"
        for j in range(5):
            at_j = {o[j] for o in others} - {answer[j]}
            for d in pk.TOKENIZER.digit_ids:
                if d != answer[j]:
                    pred = answer[:j] + [d] + answer[j + 1:]
                    want = "k" if pred in others else "s" if d in at_j else "0"
                    assert pk.verdict(prompt, answer, pred) == want
                    seen.add(want)
        # two wrong digits: "s" only when both come from other keys at their places
        o = others[0]
        j, k = [i for i in range(5) if o[i] != answer[i]][:2]
        both = answer[:j] + [o[j]] + answer[j + 1:k] + [o[k]] + answer[k + 1:]
        assert pk.verdict(prompt, answer, both) == ("k" if both in others else "s")
        stray = next(d for d in pk.TOKENIZER.digit_ids if d != answer[k] and all(x[k] != d for x in others))
        assert pk.verdict(prompt, answer, both[:k] + [stray] + both[k + 1:]) == "0"
    assert {"s", "0"} <= seen   # both kinds of single-digit miss occur in these documents
    assert pk.VERDICTS.keys() == {"1", "k", "s", "0"}


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2"])
def test_conversion_with_full_cache_gives_the_teachers_logits(kind):
    teacher = tiny(kind)
    T = 80
    student = convert_to_lola(teacher, window_size=8, cache_size=T, feature_dim=16)
    ids = torch.randint(0, 64, (2, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = teacher(input_ids=ids).logits
        got = student(input_ids=ids, use_cache=False).logits
        # the float rounding of the teacher itself (sdpa vs eager) bounds what exactness can mean
        other = type(teacher)._from_config(teacher.config, attn_implementation="sdpa")
        other.load_state_dict(teacher.state_dict())
        rounding = (other.eval()(input_ids=ids).logits - want).abs().max()
    assert (got - want).abs().max() <= 10 * rounding + 1e-5
    # λ = 0 is a different model (the window + linear memory): the test above is not vacuous
    set_lola(student, cache_size=0)
    with torch.no_grad():
        assert (student(input_ids=ids, use_cache=False).logits - want).abs().max() > 1e-3


def test_conversion_copies_shapes_and_initializes_as_lolcats():
    teacher = tiny("llama", rope_theta=5000.0)
    student = convert_to_lola(teacher, window_size=16, cache_size=8, feature_dim=32)
    c = student.config
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.rope_theta) == (4, 2, 16, 5000.0)
    for layer in lola_layers(student):
        assert layer.feature_map_q.weight.shape == (4, 16, 32)
        assert torch.equal(layer.feature_map_q.weight, layer.feature_map_k.weight)  # LoLCATs deep-copies q's map
        bound = (6 / (16 * 32)) ** 0.5  # kaiming_uniform_ on [H, D, f]
        assert layer.feature_map_q.weight.abs().max() <= bound
        torch.testing.assert_close(layer.gate, torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        convert_to_lola(tiny("llama", rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                       "partial_rotary_factor": 0.5}))


# ---------------------------------------------------------------- attention transfer


def test_attention_transfer_reduces_every_layer_mse():
    teacher = tiny("llama")
    student = convert_to_lola(teacher, window_size=8, cache_size=8, feature_dim=16)
    gen = torch.Generator().manual_seed(2)
    held_out = torch.randint(0, 64, (2, 96), generator=gen)
    before = layer_mse(student, teacher, held_out)
    frozen = {n: p.clone() for n, p in student.named_parameters()
              if not any(t in n for t in ("feature_map", "window_factors"))}

    losses = attention_transfer(student, teacher, lambda i: torch.randint(0, 64, (4, 96), generator=gen),
                                steps=30, lr=3e-2, progress=False)
    after = layer_mse(student, teacher, held_out)
    assert all(a < 0.7 * b for a, b in zip(after, before)), (before, after)
    assert losses[-1] < losses[0]
    assert all(m.cache_size == 8 for m in lola_layers(student))  # λ restored after training with λ = 0
    for n, p in student.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


# ---------------------------------------------------------------- LoLCATs checkpoints


def lolcats_checkpoint(H=4, D=16, f=8, layers=2, prefix="model.", tied=False):
    g = torch.Generator().manual_seed(3)
    sd = {}
    for i in range(layers):
        base = f"{prefix}layers.{i}.self_attn."
        sd[base + "feature_map_q.mlp.layer"] = torch.randn(H, D, f, generator=g)
        if not tied:
            sd[base + "feature_map_k.mlp.layer"] = torch.randn(H, D, f, generator=g)
        sd[base + "window_factors"] = torch.randn(1, H, 1, 1, generator=g)
    return {"model_state_dict": sd, "step": 100}


def test_lolcats_checkpoint_round_trip(tmp_path):
    student = convert_to_lola(tiny("llama"), window_size=8, cache_size=0, feature_dim=8)
    ckpt = lolcats_checkpoint()
    path = tmp_path / "distill.pt"
    torch.save(ckpt, path)
    report = load_lolcats_checkpoint(student, str(path))
    assert report == {"loaded": [0, 1], "unexpected": [], "missing": []}
    assert all(m.mix == "lolcats" for m in lola_layers(student)) and student.config.mix == "lolcats"
    exported = lolcats_state_dict(student)
    assert exported.keys() == ckpt["model_state_dict"].keys()
    for k, v in ckpt["model_state_dict"].items():
        assert torch.equal(exported[k], v), k
    gate = torch.sigmoid(ckpt["model_state_dict"]["model.layers.1.self_attn.window_factors"].flatten())
    torch.testing.assert_close(lola_layers(student)[1].gate, gate)


def test_lolcats_import_accepts_peft_prefix_and_tied_maps_and_rejects_mismatches():
    student = convert_to_lola(tiny("llama"), window_size=8, cache_size=0, feature_dim=8)
    tied = lolcats_checkpoint(prefix="base_model.model.model.", tied=True)["model_state_dict"]
    load_lolcats_checkpoint(student, tied, mix=None)
    layer = lola_layers(student)[0]
    assert layer.mix == "lola"
    assert torch.equal(layer.feature_map_k.weight, tied["base_model.model.model.layers.0.self_attn.feature_map_q.mlp.layer"])
    with pytest.raises(ValueError, match="shape"):
        load_lolcats_checkpoint(student, lolcats_checkpoint(f=4))
    extra = lolcats_checkpoint()
    extra["model_state_dict"]["model.layers.0.self_attn.q_proj.lora_A.default.weight"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="not attention-transfer"):
        load_lolcats_checkpoint(student, extra)
    with pytest.raises(ValueError, match="without weights"):
        load_lolcats_checkpoint(student, lolcats_checkpoint(layers=1))


# ---------------------------------------------------------------- selection scores


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_each_selection_score_keeps_its_pair_from_a_haystack(backend):
    """η = 2, λ = 1, one head: a repetitive filler (φk = e1, v = a) with one needle at position 2
    (φk = e2, v = a/2, the smallest value)."""
    # chunks: [0 1] [2 3] [4 5]. At the end of chunk 1 the memory is empty and W = {0, 1}: token 0 is
    # kept (tie on ‖v‖, the earlier wins), token 1 folded, so H recalls a for e1. At the end of chunk 2
    # the candidates are G ∪ W = {0, 2, 3}, scored against that memory:
    #   sre: filler 0 and 3 are recalled exactly (e = 0); the needle has φk = e2, never seen: e = ‖v‖ = 0.5
    #   recency: 3;  value_norm: 0 and 3 tie at ‖a‖ = 1 > 0.5, the earlier 0 wins;  random: a fixed hash
    a, e1, e2 = [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]
    v = torch.tensor([a, a, [0.5, 0.0], a, a, a], dtype=torch.float64)
    fk = torch.tensor([e1, e1, e2, e1, e1, e1], dtype=torch.float64)
    T = v.shape[0]
    q = torch.randn(1, T, 1, 2, dtype=torch.float64)
    k = torch.randn(1, T, 1, 2, dtype=torch.float64)
    fq = torch.rand(1, T, 1, 2, dtype=torch.float64)
    rnd = random_score(torch.tensor([0, 2, 3]), torch.zeros(3, dtype=torch.long))
    expect = {"sre": 2, "recency": 3, "value_norm": 0, "random": [0, 2, 3][int(rnd.argmax())]}
    for selection, keep in expect.items():
        _, state = lola_attention(q, k, v[None, :, None], fq, fk[None, :, None], torch.tensor([0.5], dtype=torch.float64),
                                  window_size=2, cache_size=1, selection=selection, output_final_state=True,
                                  backend=backend)
        assert state.cache_pos[0, 0].tolist() == [keep], selection


def test_selection_reaches_every_layer_of_a_converted_model():
    student = convert_to_lola(tiny("llama"), window_size=8, cache_size=4, feature_dim=8)
    ids = torch.randint(0, 64, (1, 64), generator=torch.Generator().manual_seed(4))
    outs = {}
    for selection in ("sre", "recency", "value_norm", "random"):
        set_lola(student, selection=selection)
        assert student.config.selection == selection
        assert all(m.selection == selection for m in lola_layers(student))
        with torch.no_grad():
            outs[selection] = student(input_ids=ids, use_cache=False).logits
    assert len({round(o.sum().item(), 4) for o in outs.values()}) == 4  # each score changes what is kept


# ---------------------------------------------------------------- the demo


def load_example(name: str):
    """``examples/<name>.py`` as a module (the examples are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_passkey_smoke_writes_json_and_png(tmp_path):
    out = tmp_path / "passkey.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "passkey.py"), "--smoke", "--json", str(out)],
                         capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    variants = {"teacher", "lambda0", "lola", "lola_loo", "bigger_window", "lola_recency", "lola_value_norm",
                "lola_random"}
    assert set(result["accuracy"]) == variants == set(result["stored_pairs"])
    assert result["lengths"] == [128, 256]
    assert set(result["tasks"]) == set(pk.TASKS) and result["tasks"]["single"]["accuracy"] == result["accuracy"]
    for task in result["tasks"].values():
        assert task["lengths"] == [128, 256] and set(task["accuracy"]) == variants
        for name, accs in task["accuracy"].items():
            assert set(accs) == {"128", "256"}
            assert all(accs[L] == task["hits"][name][L].count("1") / 4 for L in accs)
    assert (result["window_size"], result["cache_size"]) == (64, 64)
    assert result["stored_pairs"]["lola"] == result["stored_pairs"]["bigger_window"] == 192
    assert result["kv_pairs"] == {"128": 128, "256": 256}
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "LoLA η=64, λ=64, SRE" in run.stdout


def test_shipped_weights_reproduce_the_shipped_results():
    """The first 10 documents of each (task, length ≤ 1K) cell, for the teacher and four student variants, give
    exactly the verdicts the shipped JSON recorded for them in its full run (same code path, same documents)."""
    ex = load_example("passkey")
    with open(os.path.join(ROOT, "examples", "results", "passkey.json")) as f:
        result = json.load(f)
    teacher, student = ex.load_models(os.path.join(ROOT, "examples"))
    for variant in ("teacher", "lola", "lola_loo", "lola_value_norm", "lambda0"):
        model = ex.model_for(variant, teacher, student)
        for task, res in result["tasks"].items():
            for L in (512, 1024):
                shipped, docs = res["hits"][variant][str(L)], ex.docs_at(result["documents_per_length"], L)
                assert len(shipped) == docs and res["accuracy"][variant][str(L)] == shipped.count("1") / docs
                got = ex.cell_hits(model, task, L, docs, batch_size=10, first=10)
                assert got == shipped[:10], (task, variant, L)


RESULTS_DOC = os.path.join("docs", "results.md")  # where each pass-key table stands whole; the README shows a part


def table_docs() -> list:
    """The documents a pass-key table may stand in: README.md and every docs/*.md, relative to the repository."""
    docs = sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md"))
    return ["README.md", *docs]


def doc_rows(doc: str, task_cells: int) -> dict:
    """``doc``'s pass-key table rows with ``task_cells`` value cells, by task: [(label, [cells])] in order."""
    with open(os.path.join(ROOT, doc)) as f:
        text = f.read()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]
        if line.lstrip().startswith("| ") and cells[0] in pk.TASKS and len(cells) == 2 + task_cells:
            rows.setdefault(cells[0], []).append((cells[1], cells[2:]))
    return rows


def test_readme_tables_are_the_shipped_results():
    """Every number of the pass-key tables, in the README and in docs/, is the shipped JSON's, rounded to a point.
    ``docs/results.md`` holds each table whole: the accuracy table (task × variant × length, with the pairs each
    variant keeps), the cache-size table (λ = 8, 16, 32 from ``examples/results/cache_size/``, λ = 64 from the main
    results; 1K / 2K) and the table of SRE and LOO at λ = 64, 256 and 896, the last a quarter of the teacher's pairs
    at 4K (512 / 1K / 2K / 4K). The README shows rows of the accuracy table, labelled as there; any page's rows of any
    of the three tables are checked the same way."""
    ex = load_example("passkey")
    results = os.path.join(ROOT, "examples", "results")
    with open(os.path.join(results, "passkey.json")) as f:
        main = json.load(f)

    # the accuracy table: whole in docs/results.md, one row per variant in VARIANTS order, which names each label
    lengths = len(main["tasks"]["single"]["lengths"])
    rows = doc_rows(RESULTS_DOC, task_cells=lengths)
    assert list(rows) == list(main["tasks"])
    variant_of = {}
    for task in main["tasks"]:
        assert [label.rsplit(" (", 1)[1] for label, _ in rows[task]] == [
            f"{main['stored_pairs'][v]})" for v in ex.VARIANTS]
        variant_of.update({(task, label): v for (label, _), v in zip(rows[task], ex.VARIANTS)})
    assert len(variant_of) == len(main["tasks"]) * len(ex.VARIANTS)
    assert doc_rows("README.md", task_cells=lengths), "the README shows (part of) the accuracy table"
    for doc in table_docs():
        for task, task_rows in doc_rows(doc, task_cells=lengths).items():
            res = main["tasks"][task]
            for label, cells in task_rows:
                assert (task, label) in variant_of, (doc, task, label)  # a row of the whole table, labelled as there
                want = [f"{round(100 * res['accuracy'][variant_of[task, label]][str(L)])} %" for L in res["lengths"]]
                assert cells == want, (doc, task, label)

    scores = {"SRE": "lola", "leave-one-out": "lola_loo", "value norm": "lola_value_norm", "recency": "lola_recency"}
    by_lambda = {}
    for lam in (8, 16, 32):
        with open(os.path.join(results, "cache_size", f"passkey_lambda{lam}.json")) as f:
            by_lambda[lam] = json.load(f)
    by_lambda[64] = main
    rows = doc_rows(RESULTS_DOC, task_cells=len(by_lambda))
    assert list(rows) == list(pk.TASKS)
    assert all([score for score, _ in task_rows] == list(scores) for task_rows in rows.values())
    for doc in table_docs():
        for task, task_rows in doc_rows(doc, task_cells=len(by_lambda)).items():
            for score, cells in task_rows:
                acc = [by_lambda[lam]["tasks"][task]["accuracy"][scores[score]] for lam in by_lambda]
                want = [f"{round(100 * a['1024'])} / {round(100 * a['2048'])}" for a in acc]
                assert cells == want, (doc, task, score)

    columns = [main]
    for lam in (256, 896):
        with open(os.path.join(results, "cache_size", f"passkey_lambda{lam}.json")) as f:
            columns.append(json.load(f))
        assert columns[-1]["cache_size"] == lam
        assert columns[-1]["stored_pairs"]["lola"] == lam + 2 * columns[-1]["window_size"]
    assert columns[-1]["stored_pairs"]["lola"] == 4096 // 4
    rows = doc_rows(RESULTS_DOC, task_cells=len(columns))
    assert list(rows) == list(pk.TASKS)
    assert all([score for score, _ in task_rows] == ["SRE", "leave-one-out"] for task_rows in rows.values())
    for doc in table_docs():
        for task, task_rows in doc_rows(doc, task_cells=len(columns)).items():
            for score, cells in task_rows:
                assert cells == [" / ".join(str(round(100 * r["tasks"][task]["accuracy"][scores[score]][str(L)]))
                                            for L in (512, 1024, 2048, 4096)) for r in columns], (doc, task, score)


def test_passkey_variants_at_another_cache_size_keep_equal_memory():
    """``--cache-size`` moves λ of every LoLA variant and widens the window-only variant to the same number of exact
    pairs; ``model_for`` sets it on every layer of the student."""
    from fla_lola.pipeline.distill import lola_layers

    ex = load_example("passkey")
    for lam in (8, 16, 64):
        cfgs = ex.variant_configs(lam)
        assert set(cfgs) == set(ex.VARIANTS) and cfgs["teacher"] is None and cfgs["lambda0"]["cache_size"] == 0
        scores = {cfgs[n]["selection"] for n in cfgs if n.startswith("lola")}
        assert scores == {"sre", "loo", "recency", "value_norm", "random"}
        lola = [cfgs[n] for n in cfgs if n.startswith("lola")]
        assert all(c["cache_size"] == lam and c["window_size"] == ex.ETA for c in lola)
        assert ex.stored_pairs("bigger_window", 8192, lam) == ex.stored_pairs("lola", 8192, lam) == lam + 2 * ex.ETA
    assert ex.variant_configs() == ex.VARIANTS
    teacher, student = ex.load_models(os.path.join(ROOT, "examples"))
    ex.model_for("lola_loo", teacher, student, 16)
    assert {(layer.cache_size, layer.selection) for layer in lola_layers(student)} == {(16, "loo")}
    assert (student.config.cache_size, student.config.selection) == (16, "loo")


@pytest.mark.slow
def test_passkey_processes_and_per_length_documents_give_the_one_process_verdicts(tmp_path):
    """``--processes 2`` spreads the cells over worker processes, ``--docs-at`` changes one length's document
    count and ``--cache-size`` reaches the workers; every cell equals what one process computes for that length's
    document set."""
    out = tmp_path / "p.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "passkey.py"), "--weights",
                          os.path.join(ROOT, "examples"), "--tasks", "single", "multikey", "--lengths", "128", "256",
                          "--docs", "4", "--docs-at", "256=3", "--variants", "teacher", "lola", "--processes", "2",
                          "--threads", "2", "--cache-size", "8", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["documents_per_length"] == {"128": 4, "256": 3} and result["eval_processes"] == 2
    assert "4 documents per cell at 128; 3 documents per cell at 256" in run.stdout
    assert result["cache_size"] == result["variants"]["lola"]["cache_size"] == 8
    assert result["stored_pairs"]["lola"] == 8 + 2 * 64 and "LoLA η=64, λ=8, SRE" in run.stdout

    ex = load_example("passkey")
    teacher, student = ex.load_models(os.path.join(ROOT, "examples"))
    for task in ("single", "multikey"):
        for variant in ("teacher", "lola"):
            for L, docs in ((128, 4), (256, 3)):
                got = result["tasks"][task]["hits"][variant][str(L)]
                assert got == ex.cell_hits(ex.model_for(variant, teacher, student, 8), task, L, docs, batch_size=25)


@pytest.mark.slow
def test_cache_report_finds_the_needle_where_it_must_be(tmp_path):
    """``examples/passkey_cache.py``: a prompt that fits in λ + 2η slots keeps every pair, so every score holds the
    whole needle; in 1K-token prompts recency holds it only when the needle is recent (not at depth 0), and the
    report's JSON and PNG are written."""
    ex = load_example("passkey_cache")
    student = pk.load_student(os.path.join(ROOT, "examples", "passkey_student"))
    set_lola(student, window_size=64, cache_size=64)
    short = ex.analyse(student, "single", 160, 3)
    assert short["documents"] == 3
    assert all(x == 1.0 for xs in short["held"].values() for x in xs)
    long_ = ex.analyse(student, "single", 1024, 3)         # depths 0, 0.5, 1
    assert all(0 < x < 1 for x in long_["held"]["recency"])
    assert all(0 <= p <= 100 for p in long_["value_norm_percentile"])

    out = tmp_path / "c.json"
    result = ex.main(["--docs", "2", "--length", "256", "--tasks", "multikey", "--json", str(out)])
    assert json.loads(out.read_text()) == result and set(result["tasks"]) == {"multikey"}
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loo_duplicates_example_keeps_the_needle_where_copies_crowd_sre_out(tmp_path):
    """``examples/loo_duplicates.py``: with a feature per pattern, a copy read against the other copies is recalled
    exactly (LOO score ≈ 0) while the needle, alone on its feature, keeps the largest LOO score: LOO keeps it in
    every trial. SRE, which reads cached copies against a memory that never folded them, loses it in some; JSON and
    PNG are written, and a length that leaves no room for the needle is refused."""
    ex = load_example("loo_duplicates")
    out = tmp_path / "d.json"
    result = ex.main(["--trials", "16", "--lengths", "128", "256", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = result["features"]["separating"]["kept"]
    assert kept["loo"] == {"128": 1.0, "256": 1.0}
    assert kept["sre"]["256"] < 1.0
    for feats in result["features"].values():
        for metric in feats.values():
            assert set(metric) == set(ex.SCORES) and all(0 <= x <= 1 for s in metric.values() for x in s.values())
    with pytest.raises(SystemExit):
        ex.main(["--lengths", "48"])
