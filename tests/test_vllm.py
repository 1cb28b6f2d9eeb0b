"""Serving with vLLM (`make test-vllm`, in `.venv-vllm`): greedy tokens from vLLM's engine and its OpenAI-compatible
server equal `LoLAForCausalLM.generate`, under chunked prefill (prompts split mid-chunk and into 1-token pieces), fewer
state slots than prompts, eager and compiled; and they stop being equal when two sequences' slots are swapped.

The models are tiny random teachers converted here (no network): a Llama-3 (llama3 RoPE, GQA, tied embeddings), a
Qwen3 (q/k norm, yarn RoPE, untied, `selection="loo"`), a Qwen2 (q/k/v biases, linear RoPE, λ = 0) and a Mistral
(plain RoPE, no GQA). Every prompt is longer than λ + 2η, so the sparse cache and the linear memory are used. Engines
run in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), one at a time; each starts in a few seconds, the compiled
one in about a minute.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytestmark = pytest.mark.vllm
vllm = pytest.importorskip("vllm")

import transformers  # noqa: E402

from fla_lola import LoLAForCausalLM  # noqa: E402
from fla_lola.pipeline.convert import convert_to_lola  # noqa: E402
from fla_lola.pipeline.vllm.layer import LoLAMixer  # noqa: E402
from tiny_hub import LLAMA3, build_tokenizer  # noqa: E402

PROMPT_LENGTHS = (26, 33, 45, 58, 77, 101)   # all > λ + 2η, none a multiple of η: chunks split everywhere
NEW_TOKENS = 10
ENGINE = dict(dtype="float32", max_model_len=512, enable_prefix_caching=False)

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # engines in this process: monkeypatch reaches them
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


TEACHERS = {
    # name: (transformers config class, config fields, LoLA settings)
    "llama3": (transformers.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=True,
                                              rope_parameters=dict(LLAMA3)), dict(window_size=8, cache_size=8)),
    "qwen3-loo": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                                  "original_max_position_embeddings": 128}),
                  dict(window_size=4, cache_size=6, selection="loo")),
    "qwen2-bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), dict(window_size=8, cache_size=0)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=4, tie_word_embeddings=False, sliding_window=None),
                dict(window_size=8, cache_size=4)),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Tiny random teachers (weights drawn wide, so greedy tokens vary with the context) converted to LoLA."""
    root = tmp_path_factory.mktemp("vllm-models")
    dirs = {}
    for name, (config_class, fields, lola) in TEACHERS.items():
        config = config_class(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=512, initializer_range=0.4,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **fields)
        torch.manual_seed(0)
        teacher = transformers.AutoModelForCausalLM.from_config(config).eval()
        if name == "qwen2-bias":   # Qwen2 initializes its q/k/v biases at zero: give them values to load
            with torch.no_grad():
                for layer in teacher.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.4)
        dirs[name] = root / name
        convert_to_lola(teacher, **lola).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 290, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def reference(model_dirs, prompts):
    """`LoLAForCausalLM.generate`'s greedy tokens, one prompt at a time, for every model."""
    out = {}
    for name, path in model_dirs.items():
        model = LoLAForCausalLM.from_pretrained(path).eval()
        model.generation_config.eos_token_id = None   # as vLLM's ignore_eos: always NEW_TOKENS tokens
        out[name] = [model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                     for p in prompts]
    return out


def run_vllm(path, prompts, **engine):
    """Greedy token ids from a fresh in-process engine, which is shut down before returning."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(path), **{**ENGINE, **engine})
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        shutdown = getattr(llm.llm_engine.engine_core, "shutdown", None)
        if shutdown is not None:
            shutdown()
        del llm
        gc.collect()


@pytest.fixture
def step_log(monkeypatch):
    """Every row LoLA's layer 0 sees: (query length, context length, counted as a decode)."""
    rows = []
    step = LoLAMixer._step

    def logged(self, q, k, v, fq, fk, gate, output):
        from vllm.forward_context import get_forward_context

        md = get_forward_context().attn_metadata
        md = md.get(self.prefix) if isinstance(md, dict) else md
        if md is not None and self.prefix.endswith("layers.0.attn"):
            n = md.num_decodes + md.num_prefills
            qsl = md.query_start_loc[:n + 1].tolist()
            for i, seq_len in enumerate(md.seq_lens[:n].tolist()):
                qlen = qsl[i + 1] - qsl[i]
                rows.append((qlen, seq_len - qlen, i < md.num_decodes))
        return step(self, q, k, v, fq, fk, gate, output)

    monkeypatch.setattr(LoLAMixer, "_step", logged)
    return rows


CASES = {
    # id: (model, engine settings)
    "llama3-eager-1token-pieces": ("llama3", dict(enforce_eager=True, max_num_batched_tokens=4, max_num_seqs=4)),
    "llama3-eager-packed": ("llama3", dict(enforce_eager=True, max_num_batched_tokens=64, max_num_seqs=6)),
    "llama3-compiled": ("llama3", dict(enforce_eager=False, max_num_batched_tokens=16, max_num_seqs=3)),
    "qwen3-loo-eager": ("qwen3-loo", dict(enforce_eager=True, max_num_batched_tokens=8, max_num_seqs=3)),
    "qwen2-bias-eager": ("qwen2-bias", dict(enforce_eager=True, max_num_batched_tokens=16, max_num_seqs=5)),
    "mistral-eager": ("mistral", dict(enforce_eager=True, max_num_batched_tokens=16, max_num_seqs=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens_equal_generate(case, model_dirs, prompts, reference, step_log):
    name, engine = CASES[case]
    got = run_vllm(model_dirs[name], prompts, **engine)
    for i, (want, have) in enumerate(zip(reference[name], got)):
        assert have == want, f"prompt {i} ({len(prompts[i])} tokens): vLLM {have} != generate {want}"
    # the scheduling the case claims really happened
    eta = TEACHERS[name][2]["window_size"]
    assert any(c > 0 and c % eta and q > 1 for q, c, _ in step_log), "no prompt resumed mid-chunk"
    if engine["max_num_batched_tokens"] <= 4:
        # a one-token row whose length no generated token of any prompt can have is a piece of a prompt
        decode_lengths = {n + j for n in PROMPT_LENGTHS for j in range(1, NEW_TOKENS)}
        assert any(q == 1 and is_decode and c + 1 not in decode_lengths for q, c, is_decode in step_log), \
            "no 1-token piece of a prompt counted as a decode"
    if engine["max_num_seqs"] < len(prompts):
        assert sum(1 for q, c, _ in step_log if c == 0) == len(prompts)  # each prompt started once, slots reused


def test_swapped_slots_change_the_tokens(model_dirs, prompts, reference, monkeypatch):
    """A sequence must read only its own state: serve with each step's slots reversed (row i reads and writes the
    slot of row N-1-i) and the tokens must differ from generate's; `test_greedy_tokens_equal_generate` shows the
    same engine settings give generate's tokens with the slots as vLLM assigns them."""
    gather, scatter = LoLAMixer.gather, LoLAMixer.scatter
    monkeypatch.setattr(LoLAMixer, "gather", lambda self, slots, fresh: gather(self, slots.flip(0), fresh.flip(0)))
    monkeypatch.setattr(LoLAMixer, "scatter", lambda self, slots, state: scatter(self, slots.flip(0), state))
    got = run_vllm(model_dirs["llama3"], prompts, enforce_eager=True, max_num_batched_tokens=64, max_num_seqs=6)
    differ = [i for i, (want, have) in enumerate(zip(reference["llama3"], got)) if have != want]
    assert len(differ) >= 2, f"swapped slots changed only prompts {differ}"


def test_state_slots_hold_the_canonical_state(model_dirs):
    """The layer's slot views are exactly `LoLAState`'s fields (names, per-row shapes, dtypes), packed so every
    field is aligned, and the page is a multiple of 8 bytes."""
    from dataclasses import fields

    from fla_lola import LoLAState
    from fla_lola.pipeline.vllm.layer import page_order, state_layout

    layout = state_layout(4, 2, 16, 16, 128, 8, 8, torch.bfloat16)
    assert set(layout) == {f.name for f in fields(LoLAState)}
    empty = LoLAState.empty(3, 4, 2, 16, 16, 128, 8, 8, dtype=torch.bfloat16)
    for name, (shape, dtype) in layout.items():
        tensor = getattr(empty, name)
        assert tuple(tensor.shape[1:]) == shape and tensor.dtype == dtype, name
    offset = 0
    for name in page_order(layout):
        shape, dtype = layout[name]
        assert offset % dtype.itemsize == 0, name
        offset += int(torch.Size(shape).numel()) * dtype.itemsize


# -- the OpenAI-compatible server ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=120):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(model_dirs, tmp_path_factory):
    """vLLM's OpenAI-compatible server on 127.0.0.1 (a free port) in its own process, stopped within 60 s at
    teardown."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm-serve.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    # `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: vllm-cpu's `vllm` command asks for the
    # version of a distribution named `vllm` and exits (vllm-cpu 0.32.0); the server is the same
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dirs["llama3"]),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--enforce-eager", "--max-num-seqs", "4", "--max-num-batched-tokens", "32", "--served-model-name", "lola"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server not ready in 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=10)


def test_server_answers_concurrent_requests_as_generate(server, prompts, reference):
    requests = [prompts[i % len(prompts)] for i in range(8)]   # 8 at once, 4 slots: queued and reused

    def complete(p):
        body = {"model": "lola", "prompt": p, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        return post(f"{server}/v1/completions", body)["choices"][0]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, requests, timeout=300))
    for i, answer in enumerate(answers):
        want = reference["llama3"][i % len(prompts)]
        assert answer["token_ids"] == want, f"request {i}: {answer['token_ids']} != {want}"
