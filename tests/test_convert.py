"""Conversion of the paper's teachers: every RoPE Llama / Mistral / Qwen2 / Qwen3 configs carry, Qwen3's q/k norms,
LoLCATs stage 1 + stage 2 (LoRA) checkpoints, checked against the teacher's own logits (and peft's own merge)."""

from __future__ import annotations

import pytest
import torch
import transformers

from fla_lola.pipeline.convert import convert_to_lola, lola_config_from, set_lola
from fla_lola.pipeline.distill import lola_layers
from fla_lola.layers.rope import ScaledRotaryEmbedding, rope_init

ORIGINAL = 32  # the teachers' pre-training length: sequences of T > ORIGINAL are where the scaling bites
T = 80

ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
             "rope_theta": 10000.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0 + 0.5 * i for i in range(8)],
                 "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": ORIGINAL,
                 "rope_theta": 10000.0},
}


def tiny(kind="llama", rope=None, max_position_embeddings=4 * ORIGINAL, dtype=torch.float64, **kw):
    """A random 2-layer transformers model with GQA (4 query heads of 16, 2 key/value heads), eager attention."""
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[kind]
    if kind == "qwen3":
        kw.setdefault("head_dim", 16)
    cfg = getattr(transformers, f"{cls}Config")(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
        rope_parameters=dict(rope or ROPES["default"]), **kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")._from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "_norm" in name:  # biases and Qwen3's q/k norms start trivial
                p.normal_(1.0 if "_norm" in name else 0.0, 0.5)
    model = model.to(dtype).eval()
    if dtype == torch.float64:
        float64_norms_(model)
    return model


def float64_norms_(model):
    """transformers' RMSNorms compute in float32 whatever the input; make them compute in the input's float64,
    so the comparison is float64-exact and a RoPE error of float32 size cannot hide in the teacher's rounding."""
    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = forward.__get__(m)


def converted(teacher, length=T, **kw):
    """The converted teacher with a cache of ``length`` (exact softmax) and γ ≈ 1 (smallest ε/γ)."""
    student = convert_to_lola(teacher, window_size=8, cache_size=length, feature_dim=16, **kw)
    with torch.no_grad():
        for m in lola_layers(student):
            m.window_factors.fill_(GAMMA_ONE)
    return student


def logits_gap(teacher, student, length=T, batch=2):
    ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (student(input_ids=ids, use_cache=False).logits - teacher(input_ids=ids).logits).abs().max().item()


# At λ ≥ T the op computes softmax attention up to its ε = 1e-6 (LOLA_SPEC: y = N / (A + ε/γ)). With the
# conversion's γ = 0.1 the float64 logit gaps are 2e-6 (Llama) to 2e-4 (Qwen3, whose normed q/k sharpen the
# attention), and they shrink tenfold with ε/γ: that is all the difference there is. The tests set γ ≈ 1 (logit
# 12) to leave ε/γ ≈ 1e-6; a RoPE table error of float32 size or a missing yarn scale shows up as > 1e-3.
EXACT = 5e-5
GAMMA_ONE = 12.0
# rotated queries and keys themselves: float64 rounding only
ROTARY_EXACT = 1e-12


@pytest.mark.parametrize("rope_type", list(ROPES))
def test_every_rope_type_converts_to_the_teachers_logits(rope_type, capsys):
    # dynamic and longrope are served with the table the teacher uses up to its original length
    length = {"dynamic": 4 * ORIGINAL, "longrope": ORIGINAL}.get(rope_type, T)
    teacher = tiny("llama", ROPES[rope_type])
    student = converted(teacher, length)
    gap = logits_gap(teacher, student, length)
    with capsys.disabled():
        print(f"\n[rope {rope_type}] T={length} max |logits - teacher| = {gap:.2e}")
    assert gap <= EXACT
    if rope_type != "default" and rope_type != "dynamic":  # the scaling bites: plain RoPE would be far off
        plain = tiny("llama", {"rope_type": "default", "rope_theta": ROPES[rope_type]["rope_theta"]})
        assert logits_gap(plain, student, length) > 1e-3


@pytest.mark.parametrize("rope_type", list(ROPES))
def test_rotated_queries_and_keys_are_the_teachers(rope_type):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    teacher = tiny("llama", ROPES[rope_type])
    student = convert_to_lola(teacher, window_size=8, cache_size=8, feature_dim=16)
    length = ORIGINAL if rope_type == "longrope" else 4 * ORIGINAL
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, length, 4, 16, dtype=torch.float64, generator=gen)
    k = torch.randn(2, length, 2, 16, dtype=torch.float64, generator=gen)
    cos, sin = teacher.model.rotary_emb(q, torch.arange(length)[None])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    got_q, got_k = lola_layers(student)[0].apply_rotary(q, k)
    gap = max((got_q - want_q.transpose(1, 2)).abs().max(), (got_k - want_k.transpose(1, 2)).abs().max()).item()
    assert gap <= ROTARY_EXACT, gap


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_length_dependent_ropes_differ_beyond_the_original_length(rope_type):
    # documented limit: beyond its original length the teacher re-tables the whole sequence; LoLA keeps its table
    teacher = tiny("llama", ROPES[rope_type])
    length = 8 * ORIGINAL if rope_type == "dynamic" else T
    student = converted(teacher, length)
    assert logits_gap(teacher, student, length, batch=1) > 1e-3


@pytest.mark.parametrize("kind,rope_type", [("mistral", "linear"), ("qwen2", "yarn"), ("qwen3", "default"),
                                            ("qwen3", "yarn")])
def test_other_families_convert_exactly(kind, rope_type, capsys):
    teacher = tiny(kind, ROPES[rope_type])
    student = converted(teacher)
    assert student.config.qk_norm == (kind == "qwen3")
    gap = logits_gap(teacher, student)
    with capsys.disabled():
        print(f"\n[{kind} rope {rope_type}] T={T} max |logits - teacher| = {gap:.2e}")
    assert gap <= EXACT
    if kind == "qwen3":  # the q/k norms matter: without them the logits are far off
        with torch.no_grad():
            for m in lola_layers(student):
                m.q_norm.weight.fill_(1.0)
        assert logits_gap(teacher, student) > 1e-3


def test_rope_and_qk_norm_round_trip_through_save_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    import fla_lola  # noqa: F401  (registers the Auto classes)

    teacher = tiny("qwen3", ROPES["yarn"], dtype=torch.float32)
    student = converted(teacher)
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_parameters == student.config.rope_parameters
    rotary = lola_layers(loaded)[0].rotary
    assert isinstance(rotary, ScaledRotaryEmbedding) and rotary.attention_scaling > 1  # yarn's mscale
    assert logits_gap(teacher, loaded) <= 1e-4


def test_rope_tables_are_transformers_own():
    # the teacher's rotary module and ours hold the same inverse frequencies and attention scaling
    for name, rope in ROPES.items():
        teacher = tiny("llama", rope, dtype=torch.float32)
        ref = teacher.model.rotary_emb
        inv_freq, scaling = rope_init(rope, 16, max_position_embeddings=teacher.config.max_position_embeddings)
        torch.testing.assert_close(inv_freq, ref.original_inv_freq, rtol=0, atol=0, msg=name)
        assert scaling == ref.attention_scaling, name


def test_unsupported_configs_are_refused_naming_the_field():
    cases = [
        (dict(kind="llama", hidden_act="gelu"), "hidden_act"),
        (dict(kind="llama", attention_bias=True), "attention_bias"),
        (dict(kind="llama", mlp_bias=True), "mlp_bias"),
        (dict(kind="qwen2", use_sliding_window=True), "use_sliding_window"),
    ]
    for kw, field in cases:
        kind = kw.pop("kind")
        with pytest.raises(ValueError, match=field):
            lola_config_from(tiny(kind, dtype=torch.float32, **kw).config, window_size=8, cache_size=8)
    gemma = transformers.GemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="model_type"):
        lola_config_from(gemma, window_size=8, cache_size=8)
    config = tiny("llama", dtype=torch.float32).config
    config.rope_parameters = {"rope_type": "proportional", "rope_theta": 10000.0}
    with pytest.raises(ValueError, match=r"rope_parameters\['rope_type'\]"):
        lola_config_from(config, window_size=8, cache_size=8)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        lola_config_from(config, window_size=8, cache_size=8)


def test_small_cache_is_a_different_model():
    # the equality above is not vacuous: λ = 0 (window + linear memory) is far from the teacher
    teacher = tiny("llama", ROPES["llama3"])
    student = convert_to_lola(teacher, window_size=8, cache_size=T, feature_dim=16)
    set_lola(student, cache_size=0)
    assert logits_gap(teacher, student) > 1e-3
