"""The `fla-lola` command on a tiny model saved in the Hub layout: convert (with LoLCATs stage 1 + stage 2 checked
against peft's own merge), distill (checkpoints, resume), passkey, load with AutoModelForCausalLM, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

import fla_lola  # noqa: F401  (registers model_type "lola")
from fla_lola.pipeline.convert import convert_to_lola
from fla_lola.pipeline.distill import lola_layers
from fla_lola.pipeline.lolcats import load_lolcats_checkpoint, lolcats_state_dict
from tiny_hub import CORPUS, build_tokenizer, run_cli, tiny_llama3_config

@pytest.fixture(scope="module")
def hub_model(tmp_path_factory):
    """A random Llama-3-style checkpoint directory: llama3 RoPE, GQA, tied embeddings, safetensors, tokenizer."""
    path = tmp_path_factory.mktemp("hub") / "tiny-llama3"
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama3_config(tokenizer)).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def teacher_of(path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def ids(T=96, vocab=64):
    return torch.randint(3, vocab, (2, T), generator=torch.Generator().manual_seed(1))


def test_console_script_help_shows_examples():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "fla-lola"), "convert", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "examples:" in out.stdout and "fla-lola convert" in out.stdout and "accelerate launch" in out.stdout


def test_convert_writes_a_loadable_directory_equal_to_the_in_memory_conversion(hub_model, tmp_path):
    out = tmp_path / "lola"
    assert run_cli("convert", hub_model, out, "--window-size", 8, "--cache-size", 96, "--feature-dim", 16,
                   "--max-shard-size", 40_000) == 0
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(f.endswith(".safetensors") for f in files) > 1  # sharded
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # no temporary directory left
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.rope_parameters["rope_type"] == "llama3" and loaded.config.tie_word_embeddings
    teacher = teacher_of(hub_model)
    memory = convert_to_lola(teacher, window_size=8, cache_size=96, feature_dim=16)
    x = ids()
    with torch.no_grad():
        got = loaded(input_ids=x, use_cache=False).logits
        assert torch.equal(got, memory(input_ids=x, use_cache=False).logits)  # same tensors, same seeded maps
        assert (got - teacher(input_ids=x).logits).abs().max() < 1e-4  # float32, ε of the op (test_convert)


def test_cli_selection_choices_are_the_layers(hub_model, tmp_path):
    out = tmp_path / "loo"
    assert run_cli("convert", hub_model, out, "--window-size", 8, "--cache-size", 8, "--feature-dim", 16,
                   "--selection", "loo") == 0
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.selection == "loo"
    assert {layer.attn.selection for layer in loaded.model.layers} == {"loo"}


def test_convert_casts_to_the_requested_dtype(hub_model, tmp_path):
    assert run_cli("convert", hub_model, tmp_path / "bf16", "--window-size", 8, "--cache-size", 8,
                   "--feature-dim", 16, "--dtype", "bfloat16") == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert loaded.dtype == torch.bfloat16 and json.load(open(tmp_path / "bf16" / "config.json"))["dtype"] == "bfloat16"


def lolcats_files(teacher, tmp_path, prefix="base_model.model.", adapter=".default", r=4):
    """A stage-1 checkpoint (random feature maps) and a stage-2 one (peft LoRA with random B), LoLCATs' layout;
    returns their paths and peft's own merge of the LoRA into the teacher."""
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(teacher), LoraConfig(
        r=r, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], lora_dropout=0.0))
    gen = torch.Generator().manual_seed(5)
    lora = {}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                key = name if prefix else name.removeprefix("base_model.model.")
                lora[key if adapter else key.replace(".default", "")] = p.detach().clone()
    merged = peft_model.merge_and_unload().eval()
    H, D, f = 4, 16, 16
    stage1 = {}
    for i in range(2):
        base = f"{prefix}model.layers.{i}.self_attn."
        stage1[base + "feature_map_q.mlp.layer"] = torch.randn(H, D, f, generator=gen)
        stage1[base + "feature_map_k.mlp.layer"] = torch.randn(H, D, f, generator=gen)
        stage1[base + "window_factors"] = torch.randn(1, H, 1, 1, generator=gen)
    torch.save({"model_state_dict": stage1, "step": 10}, tmp_path / "attn.pt")
    torch.save({"model_state_dict": lora, "step": 20}, tmp_path / "finetune.pt")
    return tmp_path / "attn.pt", tmp_path / "finetune.pt", merged, stage1


@pytest.mark.parametrize("prefix,adapter", [("base_model.model.", ".default"), ("", "")])
def test_lolcats_stage1_and_stage2_import_matches_peft_merge(hub_model, tmp_path, prefix, adapter):
    teacher = teacher_of(hub_model)
    attn, finetune, merged, stage1 = lolcats_files(teacher, tmp_path, prefix, adapter)
    out = tmp_path / "lola"
    # no --feature-dim: the width (16) is read from the stage-1 file, as LoRA's rank is
    assert run_cli("convert", hub_model, out, "--window-size", 8, "--cache-size", 4,
                   "--lolcats-attn", attn, "--lolcats-finetune", finetune, "--lora-alpha", 16) == 0
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert loaded.config.mix == "lolcats" and loaded.config.feature_dim == 16
    # reference: peft's merge_and_unload, then the in-memory conversion and stage-1 import
    reference = convert_to_lola(merged, window_size=8, cache_size=4, feature_dim=16)
    load_lolcats_checkpoint(reference, {"model_state_dict": stage1})
    x = ids()
    with torch.no_grad():
        gap = (loaded(input_ids=x, use_cache=False).logits - reference(input_ids=x, use_cache=False).logits)
    assert gap.abs().max() < 1e-5
    # and the LoRA mattered: without it the projections differ
    plain = convert_to_lola(teacher, window_size=8, cache_size=4, feature_dim=16)
    q_loaded, q_plain = lola_layers(loaded)[0].q_proj.weight, lola_layers(plain)[0].q_proj.weight
    assert (q_loaded - q_plain).abs().max() > 1e-2
    torch.testing.assert_close(lolcats_state_dict(loaded), lolcats_state_dict(reference), rtol=0, atol=0)


def test_bad_input_exits_with_one_line_and_leaves_no_output(hub_model, tmp_path, capsys):
    teacher = teacher_of(hub_model)
    attn, finetune, _, stage1 = lolcats_files(teacher, tmp_path)
    lora = torch.load(finetune)["model_state_dict"]
    stray = dict(lora, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight": torch.zeros(4, 64)})
    torch.save({"model_state_dict": stray}, tmp_path / "stray.pt")
    wrong = {k: (v[:, :32] if k.endswith("lora_A.default.weight") else v) for k, v in lora.items()}
    torch.save({"model_state_dict": wrong}, tmp_path / "wrong.pt")
    small = {k: v[..., :8] if "feature_map" in k else v for k, v in stage1.items()}
    torch.save({"model_state_dict": small}, tmp_path / "small.pt")
    gemma = tmp_path / "gemma"
    transformers.GemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=16).save_pretrained(gemma)
    (tmp_path / "exists").mkdir()
    common = ["--window-size", 8, "--cache-size", 8, "--feature-dim", 16]
    cases = [
        (["convert", tmp_path / "missing", tmp_path / "o1", *common], "is not a directory"),
        (["convert", gemma, tmp_path / "o2", *common], "model_type"),
        (["convert", hub_model, tmp_path / "exists", *common], "already exists"),
        (["convert", hub_model, tmp_path / "o3", *common, "--lolcats-finetune", tmp_path / "stray.pt"],
         "neither LoRA"),
        (["convert", hub_model, tmp_path / "o4", *common, "--lolcats-finetune", tmp_path / "wrong.pt"],
         "_proj is ["),
        (["convert", hub_model, tmp_path / "o5", *common, "--lolcats-attn", tmp_path / "small.pt"],
         "feature-dim"),
        (["passkey", tmp_path / "missing", "--lengths", 64], "is not a directory"),
        (["distill", hub_model, tmp_path / "o6", "--data", tmp_path / "none.txt", *common], "does not exist"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("fla-lola: error:") and message in err and "\n" not in err, (args, err)
    assert sorted(os.listdir(tmp_path)) == sorted(["attn.pt", "finetune.pt", "stray.pt", "wrong.pt", "small.pt",
                                                   "gemma", "exists"])
    assert os.listdir(tmp_path / "exists") == []


def test_distill_resumes_to_what_an_uninterrupted_run_gives(hub_model, tmp_path, monkeypatch):
    import fla_lola.pipeline.distill as distill

    (tmp_path / "a.txt").write_text(CORPUS)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": CORPUS[::-1]}) + "\n")
    args = ["distill", hub_model, None, "--data", tmp_path / "a.txt", tmp_path / "b.jsonl", "--window-size", 8,
            "--cache-size", 8, "--feature-dim", 16, "--steps", 4, "--batch-size", 2, "--seq-len", 32,
            "--save-every", 2]
    full = tmp_path / "full"
    assert run_cli(*[full if a is None else a for a in args]) == 0
    assert not (tmp_path / "full.ckpt").exists()  # checkpoints removed once OUT is written

    original = distill.attention_transfer

    def interrupted(*a, on_step, **kw):
        def step(n, opt):
            on_step(n, opt)
            if n == 3:
                raise KeyboardInterrupt
        return original(*a, on_step=step, **kw)

    part = tmp_path / "part"
    monkeypatch.setattr(distill, "attention_transfer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_cli(*[part if a is None else a for a in args])
    monkeypatch.setattr(distill, "attention_transfer", original)
    assert not part.exists() and (tmp_path / "part.ckpt" / "distill_state.pt").exists()
    assert torch.load(tmp_path / "part.ckpt" / "distill_state.pt")["step"] == 2
    assert run_cli(*[part if a is None else a for a in args]) == 2  # a checkpoint exists: say --resume
    assert run_cli(*[part if a is None else a for a in args], "--resume") == 0
    a, b = (lolcats_state_dict(AutoModelForCausalLM.from_pretrained(p)) for p in (full, part))
    torch.testing.assert_close(a, b)
    init = convert_to_lola(teacher_of(hub_model), window_size=8, cache_size=8, feature_dim=16)
    assert any((a[k] - v).abs().max() > 1e-3 for k, v in lolcats_state_dict(init).items())  # it trained


def test_end_to_end_convert_distill_passkey_generate(hub_model, tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS)
    common = ["--window-size", 8, "--cache-size", 16, "--feature-dim", 16]
    assert run_cli("distill", hub_model, tmp_path / "student", "--data", tmp_path / "a.txt", *common,
                   "--steps", 2, "--batch-size", 2, "--seq-len", 32) == 0
    assert run_cli("convert", hub_model, tmp_path / "converted", *common) == 0
    assert run_cli("passkey", tmp_path / "student", "--lengths", 300, 400, "--depths", 2,
                   "--out", tmp_path / "pk") == 0
    result = json.load(open(tmp_path / "pk.json"))
    assert set(result["accuracy"]) == {"300", "400"} and len(result["trials"]) == 4
    assert all(t["tokens"] <= t["length"] and t["tokens"] > t["length"] - 40 for t in result["trials"])
    assert {t["depth"] for t in result["trials"]} == {0.0, 1.0}
    assert os.path.getsize(tmp_path / "pk.png") > 1000
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "student")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    prompt = tokenizer("The grass is green.", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 5)
    assert isinstance(tokenizer.decode(out[0]), str)
