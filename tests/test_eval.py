"""`fla-lola eval`: lm-evaluation-harness on LoLA model directories, offline. A tiny random Llama teacher (Hub layout,
a tokenizer trained here) converted at λ ≥ T gives, through the harness, the teacher's per-example loglikelihoods on a
local multiple-choice task; at λ = 0 it does not. RULER's `niah_single_1` runs end to end on a tiny LoLA model with
its own tokenizer, and lm-eval's result files say so."""

from __future__ import annotations

import glob
import json
import logging
import os
import sys

import pytest
import torch
import transformers

pytest.importorskip("lm_eval", reason="the [eval] extra (lm-evaluation-harness) is not installed")

from tiny_hub import CORPUS, build_tokenizer, run_cli, tiny_llama3_config  # noqa: E402

from fla_lola.pipeline.checkpoint import convert_checkpoint  # noqa: E402
from fla_lola.pipeline.evaluate import evaluate  # noqa: E402

TASK = "lola_tiny_mc"
SENTENCES = [s.strip() + "." for s in CORPUS.split(".") if s.strip()][:9]
# float32 through two attention paths (SDPA vs LoLA's chunked softmax over window + cache): the converted model's
# logits match the teacher's to the op's ε (< 1e-4 in tests/test_convert.py, test_cli.py). A choice's loglikelihood
# sums ~10 log-softmax values: the largest difference measured here was 7.6e-6, so 1e-4 leaves 13x headroom, while
# λ = 0 with a 4-token window moved them by 0.11 (1,000x the tolerance; the test asks for 100x).
ATOL = 1e-4


def task_yaml(data_file) -> str:
    return f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}} Next:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The teacher (Hub layout), its conversions at λ ≥ T and at λ = 0, and a local task (YAML + JSONL)."""
    root = tmp_path_factory.mktemp("eval")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(tiny_llama3_config(tokenizer, max_position_embeddings=2048))
    with torch.no_grad():  # peaked attention, as trained models have (random init's is near uniform)
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    # λ = 256 ≥ every request here (< 170 tokens): exact; λ = 0 and a 4-token window: not
    assert run_cli("convert", root / "teacher", root / "exact", "--window-size", 8, "--cache-size", 256,
                   "--feature-dim", 16) == 0
    convert_checkpoint(root / "teacher", root / "lambda0", window_size=4, cache_size=0, feature_dim=16,
                       progress=False)
    docs = [{"context": " ".join(SENTENCES[i:] + SENTENCES[:i]), "choices": SENTENCES[:4], "answer": i % 4}
            for i in range(6)]
    (root / "tasks").mkdir()
    (root / "tasks" / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks" / "tiny_mc.yaml").write_text(task_yaml(root / "tasks" / "mc.jsonl"))
    return root


@pytest.fixture(scope="module")
def task_manager(dirs):
    """One task index for the in-process runs (building it reads every task YAML lm-eval ships: ~10 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(dirs / "tasks"))


def loglikelihoods(samples) -> list[list[float]]:
    """Per example, per choice: the loglikelihood (lm-eval's `resps`, in memory or as its JSONL writes them)."""
    return [[float(choice[0][0]) for choice in s["resps"]] for s in sorted(samples, key=lambda s: s["doc_id"])]


def test_harness_loglikelihoods_of_the_converted_model_equal_the_teachers(dirs, task_manager, tmp_path, caplog):
    import lm_eval

    # the teacher as `lm_eval --model hf --model_args pretrained=DIR,dtype=float32` runs it
    teacher = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(dirs / "teacher"), "dtype": "float32"},
                                      tasks=[TASK], device="cpu", batch_size=4, task_manager=task_manager,
                                      log_samples=True, bootstrap_iters=0)
    want = torch.tensor(loglikelihoods(teacher["samples"][TASK]))
    assert want.shape == (6, 4) and torch.isfinite(want).all()

    # the converted directory through `fla-lola eval`, read back from the files lm-eval wrote
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert run_cli("eval", dirs / "exact", "--tasks", TASK, "--include-path", dirs / "tasks", "--device", "cpu",
                       "--dtype", "float32", "--batch-size", 4, "--output-path", out, "--log-samples",
                       "--bootstrap-iters", 0) == 0
    assert "neither" not in caplog.text and "Overrode HF model backend type" in caplog.text  # causal, not a guess
    [results_file] = glob.glob(str(out / "*" / "results_*.json"))
    [samples_file] = glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl"))
    results = json.load(open(results_file))
    assert results["results"][TASK]["acc,none"] == teacher["results"][TASK]["acc,none"]
    assert results["n-samples"][TASK] == {"original": 6, "effective": 6}
    assert results["config"]["model_args"]["backend"] == "causal"
    got = torch.tensor(loglikelihoods([json.loads(line) for line in open(samples_file)]))
    assert (got - want).abs().max() < ATOL, (got - want).abs().max()

    # λ = 0 (window only: LoLCATs-style linear memory for the rest) through the Python entry: it differs
    lam0 = evaluate(dirs / "lambda0", TASK, device="cpu", dtype="float32", batch_size=4, task_manager=task_manager,
                    log_samples=True, bootstrap_iters=0)
    off = (torch.tensor(loglikelihoods(lam0["samples"][TASK])) - want).abs().max()
    assert off > 100 * ATOL, off


def test_ruler_niah_single_1_runs_offline_end_to_end(dirs, tmp_path):
    """RULER's single needle (a repeated-sentence haystack, wonderwords keys, 7-digit values) at 1,024 tokens, built
    with the model's own tokenizer, generated by a tiny LoLA model (λ = 256 < T: the sparse cache at work)."""
    out = tmp_path / "ruler"
    metadata = json.dumps({"max_seq_lengths": [1024], "tokenizer": str(dirs / "exact")})
    assert run_cli("eval", dirs / "exact", "--tasks", "niah_single_1", "--metadata", metadata, "--limit", 2,
                   "--device", "cpu", "--batch-size", 2, "--output-path", out, "--log-samples") == 0
    [results_file] = glob.glob(str(out / "*" / "results_*.json"))
    results = json.load(open(results_file))
    assert set(results["results"]) == {"niah_single_1"}
    score = results["results"]["niah_single_1"]["1024,none"]
    assert 0.0 <= score <= 1.0  # a random model's score means nothing; that it was measured at 1024 does
    assert results["n-samples"]["niah_single_1"]["effective"] == 2
    task_config = results["configs"]["niah_single_1"]
    assert task_config["metadata"]["max_seq_lengths"] == [1024] and task_config["output_type"] == "generate_until"
    [samples_file] = glob.glob(str(out / "*" / "samples_niah_single_1_*.jsonl"))
    samples = [json.loads(line) for line in open(samples_file)]
    assert len(samples) == 2
    tokenizer = transformers.AutoTokenizer.from_pretrained(dirs / "exact")
    for s in samples:
        assert s["doc"]["max_length"] == 1024 and len(s["target"]) > 0
        prompt = s["arguments"]["gen_args_0"]["arg_0"]
        assert "special magic number" in prompt and 512 < len(tokenizer(prompt)["input_ids"]) <= 1024
        assert isinstance(s["resps"][0][0], str)  # the generated answer


def test_unknown_tasks_are_refused_before_any_model_loads(dirs, task_manager):
    with pytest.raises(ValueError, match="unknown task.*no_such_task"):
        evaluate(dirs / "exact", [TASK, "no_such_task"], task_manager=task_manager)


def test_eval_errors_exit_2_with_one_line(dirs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["eval", tmp_path / "missing", "--tasks", TASK], "is not a directory"),
        (["eval", tmp_path / "empty", "--tasks", TASK], "no config.json"),
        (["eval", dirs / "exact", "--tasks", TASK, "--metadata", "[1"], "--metadata is not valid JSON"),
        (["eval", dirs / "exact", "--tasks", TASK, "--metadata", "[1]"], "--metadata must be a JSON object"),
        (["eval", dirs / "exact", "--tasks", TASK, "--log-samples"], "--log-samples needs --output-path"),
        (["eval", dirs / "exact", "--tasks", TASK, "--batch-size", "big"], "--batch-size"),
        (["eval", dirs / "exact", "--tasks", TASK, "--include-path", tmp_path / "nope"], "is not a directory"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("fla-lola: error:") and message in err and "\n" not in err, (args, err)


def test_help_imports_neither_lm_eval_nor_datasets(monkeypatch, capsys):
    """Both load lazily (seconds, and log lines): any import of them during `fla-lola eval --help` would fail here."""
    from fla_lola.cli import main

    for name in ("lm_eval", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SystemExit) as done:
        main(["eval", "--help"])
    assert done.value.code == 0 and "--metadata" in capsys.readouterr().out
