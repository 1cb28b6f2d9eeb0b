"""The Triton backend computes the reference (docs/SPEC.md): every property checked against the naive loop in float64.

Runs on CUDA tensors when a GPU is present, else on CPU under Triton's interpreter (``TRITON_INTERPRET=1``), and is
skipped otherwise. The interpreter runs each program of a launch as Python, so its cost grows with the number of
(row, head, chunk) triples; the strategy below bounds that number instead of the sequence length alone, which keeps
small windows (many boundaries) and long sequences (large windows) both in play.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from lola_problems import (Problem, assert_bounded_state, assert_states_equal, make_problem, padding_mask,
                           split_points)

from fla_lola import LoLAState, lola_attention, naive_lola_attention

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                       reason='Triton kernels need a CUDA device or TRITON_INTERPRET=1 (the CPU interpreter)'),
]


def examples(n: int) -> int:
    """Hypothesis examples for a kernel property: ``n`` on a GPU; under the interpreter, which runs every program of a
    launch as Python, half of them (at least 10), which keeps CI within 30 minutes on 2 cores."""
    return max(10, n // 2) if INTERPRET else n


# float64 kernels against the float64 reference: the same math, so rounding only
ATOL, RTOL = 1e-10, 1e-9


@st.composite
def kernel_problems(draw, max_B=2, max_T=48, min_heads=1, max_heads=2, min_group=1, max_group=2, max_dim=16,
                    max_window=8, max_cache=6, budget=16, mixes=('lola', 'lolcats'), selections=('sre', 'loo'),
                    dtype=torch.float64):
    """Valid inputs with B·H·ceil(T/η) ≤ ``budget`` (rows × heads × chunks: what the interpreter pays for)."""
    Hkv = draw(st.integers(min_heads, max_heads))
    H = Hkv * draw(st.integers(min_group, max_group))
    B = draw(st.integers(1, max_B))
    eta = draw(st.integers(1, max_window))
    T = draw(st.integers(1, min(max_T, eta * max(1, budget // (B * H)))))
    return make_problem(
        seed=draw(st.integers(0, 2**31 - 1)), B=B, T=T, H=H, Hkv=Hkv,
        D=draw(st.integers(1, max_dim)), Dv=draw(st.integers(1, max_dim)), F=draw(st.integers(1, max_dim)),
        window_size=eta, cache_size=draw(st.integers(0, max_cache)), mix=draw(st.sampled_from(mixes)),
        selection=draw(st.sampled_from(selections)), logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])), dtype=dtype,
    )


def on(device, p: Problem) -> Problem:
    return Problem(*(x.to(device) for x in p.tensors), p.window_size, p.cache_size, p.mix, p.selection, p.extra)


def state_on(device, state: LoLAState | None) -> LoLAState | None:
    return None if state is None else LoLAState(**{n: x.to(device) for n, x in vars(state).items()})


def run(p: Problem, backend, tensors=None, initial_state=None, **kw):
    """``backend`` on ``DEVICE`` ("naive" on CPU in float64); tensors and states come back on the CPU."""
    tensors = p.tensors if tensors is None else tensors
    if backend == 'naive':
        tensors = [x.cpu().double() for x in tensors]
        o, s = naive_lola_attention(*tensors, **p.options, initial_state=state_on('cpu', initial_state), **kw)
    else:
        tensors = [x.to(DEVICE) for x in tensors]
        o, s = lola_attention(*tensors, **p.options, initial_state=state_on(DEVICE, initial_state), backend=backend,
                              **kw)
    return o.cpu(), state_on('cpu', s)


# ---- 1. prefill -------------------------------------------------------------------------------------

@settings(max_examples=examples(40), deadline=None)
@given(p=kernel_problems())
@example(p=make_problem(0, B=1, T=13, H=1, Hkv=1, D=2, Dv=2, F=2, window_size=1, cache_size=0))
@example(p=make_problem(1, B=2, T=30, H=2, Hkv=1, D=3, Dv=1, F=1, window_size=3, cache_size=6, mix='lolcats'))
@example(p=make_problem(2, B=1, T=40, H=2, Hkv=2, D=16, Dv=16, F=16, window_size=8, cache_size=5, logit_scale=4.0))
def test_triton_prefill_matches_naive(p):
    """One prefill from an empty state: outputs and the whole final state (H, s, cache, window, positions)."""
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    o, s = run(p, 'triton', output_final_state=True)
    assert o.dtype == p.q.dtype
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(s, s_ref, atol=ATOL, rtol=RTOL)


@settings(max_examples=examples(25), deadline=None)
@given(p=kernel_problems(), cache=st.sampled_from(['zero', 'T', 'more than T']))
def test_triton_lambda_extremes_match_naive(p, cache):
    """λ = 0 (terraced window + linear attention) and λ ≥ T (nothing is ever folded: exact softmax)."""
    T = p.q.shape[1]
    p.cache_size = {'zero': 0, 'T': T, 'more than T': T + 3}[cache]
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    o, s = run(p, 'triton', output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(s, s_ref, atol=ATOL, rtol=RTOL)


@settings(max_examples=examples(15), deadline=None)
@given(p=kernel_problems(min_heads=2, max_heads=2, min_group=2, max_group=3, budget=24))
@example(p=make_problem(5, B=1, T=30, H=4, Hkv=2, D=4, Dv=4, F=8, window_size=3, cache_size=2))
def test_triton_gqa_matches_naive(p):
    """Hkv < H: key heads are read in place for their group of query heads (the selection stays per query head)."""
    assert p.k.shape[2] < p.q.shape[2]
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    o, s = run(p, 'triton', output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(s, s_ref, atol=ATOL, rtol=RTOL)


# ---- 2. decode steps and streaming ---------------------------------------------------------------------

@settings(max_examples=examples(25), deadline=None)
@given(p=kernel_problems(max_B=2, max_heads=2, max_group=2, max_window=5, budget=12), data=st.data(),
       backends=st.sampled_from([('triton', 'triton'), ('triton', 'torch'), ('torch', 'triton')]))
@example(p=make_problem(3, B=2, T=14, H=2, Hkv=1, D=4, Dv=3, F=5, window_size=3, cache_size=2), data=None,
         backends=('triton', 'triton'))
def test_decode_steps_after_a_prefill_match_naive(p, data, backends):
    """A prefill (backends[0]) then single-token calls (backends[1]) crossing chunk boundaries: every output and the
    final state equal one naive call on the whole sequence, and no call modifies the state it was given."""
    T = p.q.shape[1]
    n_steps = min(T, 10) if data is None else data.draw(st.integers(1, min(T, 10)), label='n_steps')
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    state, outs = None, []
    if n_steps < T:
        o, state = run(p, backends[0], tensors=p.slice(0, T - n_steps), output_final_state=True)
        outs.append(o)
    for t in range(T - n_steps, T):
        before = None if state is None else state.clone()
        o, new = run(p, backends[1], tensors=p.slice(t, t + 1), initial_state=state, output_final_state=True)
        if before is not None:
            assert_states_equal(state, before, atol=0, rtol=0)
        outs.append(o)
        state = new
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(state, s_ref, atol=ATOL, rtol=RTOL)


@settings(max_examples=examples(30), deadline=None)
@given(p=kernel_problems(max_B=2, budget=12), data=st.data(),
       backends=st.sampled_from([('triton', 'triton'), ('triton', 'torch'), ('torch', 'triton'),
                                 ('triton', 'naive')]))
def test_streaming_split_is_invariant(p, data, backends):
    """Any split into prefills and single tokens (T need not be a multiple of η; a prefill may start mid-chunk),
    the state carried across calls and across backends, gives the outputs and final state of one naive call."""
    T = p.q.shape[1]
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    points = data.draw(split_points(T), label='points')
    state, outs = None, []
    for i, (a, b) in enumerate(zip(points[:-1], points[1:])):
        o, state = run(p, backends[i % 2], tensors=p.slice(a, b), initial_state=state, output_final_state=True)
        assert_bounded_state(state, p)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(state, s_ref, atol=ATOL, rtol=RTOL)


# ---- 3. varlen, padding ----------------------------------------------------------------------------------

@settings(max_examples=examples(20), deadline=None)
@given(p=kernel_problems(max_B=1, budget=16), data=st.data())
def test_packed_sequences_equal_each_sequence_alone(p, data):
    """``cu_seqlens`` (empty sequences included): each packed sequence gets the outputs and state it gets alone."""
    T = p.q.shape[1]
    cuts = sorted(data.draw(st.lists(st.integers(0, T), max_size=4), label='cuts'))
    cu = torch.tensor([0] + cuts + [T])
    o, state = run(p, 'triton', cu_seqlens=cu.to(DEVICE), output_final_state=True)
    assert state.batch_size == len(cu) - 1
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_alone, s_alone = run(p, 'naive', tensors=p.slice(a, b), output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_alone, atol=ATOL, rtol=RTOL)
        assert_states_equal(state.index_select(torch.tensor([i])), s_alone, atol=ATOL, rtol=RTOL)


@settings(max_examples=examples(25), deadline=None)
@given(p=kernel_problems(max_B=3, max_heads=1, budget=12),
       kept=st.lists(st.floats(0, 1), min_size=3, max_size=3), left=st.booleans(), decode=st.booleans())
@example(p=make_problem(0, B=1, T=1, H=1, Hkv=1, D=1, Dv=1, F=1, window_size=1, cache_size=0, mix='lolcats'),
         kept=[0.0, 0.0, 0.0], left=False, decode=False).via('a fully padded row: 0/0 with mix="lolcats"')
def test_padded_rows_equal_each_row_alone(p, kept, left, decode):
    """Left or right padding (``attention_mask``), in a prefill or, with ``decode``, in the single-token step that
    follows it: padding gets zero outputs, enters no memory and moves no boundary."""
    B, T = p.q.shape[:2]
    mask = padding_mask(T, kept[:B], left)
    if decode and T > 1:   # the last column is one decode step; its entries are the same 0/1 pattern
        o1, s1 = run(p, 'triton', tensors=p.slice(0, T - 1), attention_mask=mask[:, :-1].to(DEVICE),
                     output_final_state=True)
        o2, state = run(p, 'triton', tensors=p.slice(T - 1, T), attention_mask=mask[:, -1:].to(DEVICE),
                        initial_state=s1, output_final_state=True)
        o = torch.cat([o1, o2], 1)
    else:
        o, state = run(p, 'triton', attention_mask=mask.to(DEVICE), output_final_state=True)
    assert (o[mask == 0] == 0).all()
    for b in range(B):
        keep = mask[b].bool()
        alone = [x[b:b + 1, keep] for x in p.tensors[:5]] + [p.gate]
        o_alone, s_alone = run(p, 'naive', tensors=alone, output_final_state=True)
        torch.testing.assert_close(o[b:b + 1, keep], o_alone, atol=ATOL, rtol=RTOL)
        assert_states_equal(state.index_select(torch.tensor([b])), s_alone, atol=ATOL, rtol=RTOL)


# ---- 3b. what a GPU runs that the first-config interpreter never did -----------------------------------------

def kernels():
    from fla_lola.kernels import interpret
    from fla_lola.kernels.chunk import lola_fwd_kernel_o, lola_fwd_kernel_select
    return interpret, (lola_fwd_kernel_select, lola_fwd_kernel_o)


@pytest.mark.skipif(not INTERPRET, reason='selects autotune configs through the interpreter shim')
def test_every_autotune_config_matches_naive():
    """Each kernel once per config it can autotune to (``BLK`` 64 and 32 over the cache, 4 and 8 warps), with λ = 70
    spanning three 32-blocks and η = 40 spanning two: prefill outputs and state equal the naive loop."""
    interpret, fns = kernels()
    p = make_problem(4, B=1, T=4 * 40 + 7, H=2, Hkv=1, D=8, Dv=8, F=8, window_size=40, cache_size=70,
                     logit_scale=4.0)
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    assert int((s_ref.cache_pos >= 0).sum(-1).min()) == 70             # the cache is full: every block is read
    from triton.runtime.autotuner import Autotuner

    tuners = [fn if isinstance(fn, Autotuner) else fn.fn for fn in fns]       # (under @triton.heuristics)
    configs = {tuner.base_fn.__name__: {str(c) for c in tuner.configs} for tuner in tuners}
    ran = len(interpret.launched_configs())
    for i in range(max(len(c) for c in configs.values())):
        with interpret.use_config(i):
            o, s = run(p, 'triton', output_final_state=True)
        torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
        assert_states_equal(s, s_ref, atol=ATOL, rtol=RTOL)
    launched = {}
    for name, config in interpret.launched_configs()[ran:]:
        launched.setdefault(name, set()).add(config)
    assert launched == configs


@pytest.mark.parametrize('D, F', [(64, 128), (128, 256)])
def test_realistic_shapes_match_the_torch_backend(D, F):
    """D = Dv = 64, F = 128 (and 128 / 256), η = λ = 64, GQA, 4 boundaries and a partial chunk: the prefill kernels
    then the decode kernel across a boundary, in float64 against the torch backend (itself pinned to the naive
    loop by tests/test_ops.py), outputs and state."""
    eta = 64
    T = 6 * eta + 2
    p = make_problem(6, B=1, T=T, H=2, Hkv=1, D=D, Dv=D, F=F, window_size=eta, cache_size=eta)
    o_ref, s_ref = run(p, 'torch', output_final_state=True)
    o, state = run(p, 'triton', tensors=p.slice(0, T - 3), output_final_state=True)
    outs = [o]
    for t in range(T - 3, T):                                          # the boundary at 6η is the second step
        o, state = run(p, 'triton', tensors=p.slice(t, t + 1), initial_state=state, output_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(state, s_ref, atol=ATOL, rtol=RTOL)
    assert int((state.cache_pos >= 0).sum(-1).min()) == eta


def near_tie_problem(dtype=torch.bfloat16, T=40, eta=4, lam=4, H=2, F=16, D=16, delta=1e-5):
    """Inputs whose self-recall scores tie to a relative ``delta`` (1e-5: far above float32 rounding, far below
    TF32's 2^-11). Candidates have zero values and one-hot key features ``e_i`` (exact in bf16), so a candidate's
    score is ``‖H[i]‖ / (s[i] + ε)``; the initial memory has rows of norm ``1 + delta · rank`` and ``s = 1``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, H, D, generator=g).to(dtype)
    k = torch.randn(1, T, 1, D, generator=g).to(dtype)
    v = torch.zeros(1, T, 1, D, dtype=dtype)
    fq = torch.softmax(torch.randn(1, T, H, F, generator=g), -1).to(dtype)
    fk = torch.zeros(1, T, H, F, dtype=dtype)
    for h in range(H):
        fk[0, torch.arange(T), h, torch.randperm(F, generator=g)[torch.arange(T) % F]] = 1
    gate = torch.full((H,), 0.5, dtype=torch.float64)
    state = LoLAState.empty(1, H, 1, D, D, F, eta, lam, dtype=dtype)
    rows = torch.randn(1, H, F, D, generator=g, dtype=torch.float64)
    norms = 1 + delta * torch.stack([torch.randperm(F, generator=g) for _ in range(H)]).double()
    state.h = (rows / rows.norm(dim=-1, keepdim=True) * norms[None, :, :, None]).float()
    state.s = torch.ones(1, H, F)
    state.seen = torch.tensor([eta])
    return Problem(q, k, v, fq, fk, gate, eta, lam), state


def test_near_ties_select_what_torch_selects():
    """bf16 inputs with selection scores tied to 1e-5: a Triton prefill keeps the pairs the torch backend keeps, and
    torch decode steps after it end where torch alone ends. The memory, ``s`` and the score are IEEE float32 products
    in the kernels; the interpreter rounds ``"tf32"`` dots as a GPU does, so a TF32 score fails here."""
    p, state0 = near_tie_problem()
    T, n = p.q.shape[1], 6
    _, torch_prefill = run(p, 'torch', tensors=p.slice(0, T - n), initial_state=state0, output_final_state=True)
    _, state = run(p, 'triton', tensors=p.slice(0, T - n), initial_state=state0, output_final_state=True)
    assert torch.equal(state.cache_pos, torch_prefill.cache_pos)
    for t in range(T - n, T):
        _, state = run(p, 'torch', tensors=p.slice(t, t + 1), initial_state=state, output_final_state=True)
    _, alone = run(p, 'torch', initial_state=state0, output_final_state=True)
    assert torch.equal(state.cache_pos, alone.cache_pos)


@pytest.mark.parametrize('split', ['prefill', 'decode steps'])
def test_exact_ties_keep_the_earliest_positions(split):
    """Every token the same pair (k, v, φk): every boundary's scores tie exactly, so the cache keeps positions
    0 .. λ-1 for good, by the spec's rule (ties to the earlier position), in the prefill and in the decode kernel."""
    eta, lam, T = 4, 6, 30
    p = make_problem(7, B=1, T=T, H=2, Hkv=1, D=4, Dv=4, F=4, window_size=eta, cache_size=lam)
    for x in (p.k, p.v, p.fk):
        x.copy_(x[:, :1].expand_as(x))
    if split == 'prefill':
        _, state = run(p, 'triton', output_final_state=True)
    else:
        _, state = run(p, 'triton', tensors=p.slice(0, 2 * eta - 1), output_final_state=True)
        for t in range(2 * eta - 1, T):
            _, state = run(p, 'triton', tensors=p.slice(t, t + 1), initial_state=state, output_final_state=True)
    assert state.cache_pos.tolist() == [[list(range(lam))] * 2]


@pytest.mark.parametrize('layout', ['left', 'right', 'packed'])
def test_prefill_in_segments_equals_one_launch(layout):
    """A prefill whose snapshots exceed ``SNAPSHOT_BUDGET`` runs as segments of whole chunks, each continuing the last
    one's state: here one chunk per segment (budget 1 byte), with padding or packed sequences crossing segments."""
    from unittest import mock

    import fla_lola.kernels.chunk as chunk

    p = make_problem(1, B=2, T=23, H=2, Hkv=1, D=3, Dv=2, F=4, window_size=3, cache_size=2)
    kw = {}
    if layout == 'packed':
        p = Problem(*[x[:1] for x in p.tensors[:5]], p.gate, p.window_size, p.cache_size)
        kw['cu_seqlens'] = torch.tensor([0, 4, 4, 15, 23])
    else:
        kw['attention_mask'] = padding_mask(23, [0.8, 0.3], left=layout == 'left')
    o_ref, s_ref = run(p, 'torch', output_final_state=True, **kw)
    kw = {name: x.to(DEVICE) for name, x in kw.items()}
    with mock.patch.object(chunk, 'SNAPSHOT_BUDGET', 1), \
            mock.patch.object(chunk, 'chunk_lola_fwd_segment', wraps=chunk.chunk_lola_fwd_segment) as segment:
        o, s = run(p, 'triton', output_final_state=True, **kw)
    assert segment.call_count == 8                                     # ceil(23 / η)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=RTOL)
    assert_states_equal(s, s_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(not INTERPRET, reason='counts host calls on CPU')
def test_decode_step_through_the_model_never_waits_for_the_device():
    """The CUDA decode path (layer, op without re-validation, Triton step kernel): no GPU -> CPU sync in one decode
    step after a padded prefill. The interpreter's kernel launch (which runs the kernel on the host) is excluded."""
    from test_models import decode_step_syncs
    from triton.runtime import interpreter

    prefill, decode = decode_step_syncs('triton', exclude=[(interpreter.GridExecutor, '__call__')])
    assert sum(prefill.values()) > 0
    assert not decode, dict(decode)


# ---- 4. low precision ------------------------------------------------------------------------------------

@settings(max_examples=examples(20), deadline=None)
@given(p=kernel_problems(max_B=2, budget=12), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_low_precision_error_is_pytorchs_own(p, dtype):
    """FlashAttention-style bound, prefill then one decode step in ``dtype``: the kernels are at most twice as far
    from the float64 reference (on the same rounded inputs) as the naive loop run in ``dtype``, plus the rounding
    of the output (ε·|y|) and of the softmax weights, which the prefill kernel rounds to ``dtype`` before its
    ``P·V`` product as FlashAttention does (relative ε/2 each, so at most ε/2·max|v|; counted twice)."""
    low = p.to(dtype)
    T = low.q.shape[1]
    ref, _ = run(low, 'naive')
    naive_low, _ = naive_lola_attention(*low.tensors, **low.options)
    state, outs = None, []
    for a, b in ((0, T - 1), (T - 1, T)) if T > 1 else ((0, 1),):
        o, state = run(low, 'triton', tensors=low.slice(a, b), initial_state=state, output_final_state=True)
        assert o.dtype == dtype and state.h.dtype == torch.float32
        outs.append(o)
    fast_low = torch.cat(outs, 1)
    eps = torch.finfo(dtype).eps
    own_error = (naive_low.double() - ref).abs().max().item()
    rounding = eps * (2 * ref.abs().max().item() + low.v.double().abs().max().item())
    error = (fast_low.double() - ref).abs().max().item()
    assert error <= 2 * own_error + rounding + 1e-12, (error, own_error, rounding)


# ---- 5. what the backend refuses ------------------------------------------------------------------------

def small_problem():
    return on(DEVICE, make_problem(0, B=1, T=5, H=2, Hkv=1, D=4, Dv=4, F=4, window_size=2, cache_size=1,
                                   dtype=torch.float32))


@pytest.mark.parametrize('which', range(6))
def test_inputs_that_require_grad_are_refused(which):
    p = small_problem()
    xs = [x.clone().requires_grad_(i == which) for i, x in enumerate(p.tensors)]
    with pytest.raises(ValueError, match='inference-only'):
        lola_attention(*xs, **p.options, backend='triton')
    from fla_lola.kernels import triton_lola_attention
    with pytest.raises(ValueError, match='inference-only'):
        triton_lola_attention(*xs, **p.options, scale=0.5)
    with torch.no_grad():   # the same inputs are fine without autograd
        o, _ = lola_attention(*xs, **p.options, backend='triton')
    torch.testing.assert_close(o.cpu(), run(p, 'naive')[0].float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('decode', [False, True])
def test_loo_keeps_what_the_other_candidates_do_not_explain(decode):
    """The hand-checked case of tests/test_selection.py (three copies and one odd pair, λ = 1): SRE keeps the first
    copy, LOO the odd pair; the boundary runs in the prefill kernel, or in the step kernel after a 7-token prefill."""
    from test_selection import duplicates_case

    v, fk = duplicates_case()
    T = v.shape[0]
    xs = [torch.zeros(1, T, 1, 1), torch.zeros(1, T, 1, 1), v.view(1, T, 1, -1), torch.full((1, T, 1, 2), 0.5),
          fk.view(1, T, 1, -1)]
    xs = [x.double().to(DEVICE) for x in xs]
    gate = torch.tensor([0.5], dtype=torch.float64, device=DEVICE)
    for selection, keep in (('sre', [0]), ('loo', [3])):
        kw = dict(window_size=4, cache_size=1, selection=selection, output_final_state=True, backend='triton')
        if decode:
            _, state = lola_attention(*(x[:, :-1] for x in xs), gate, **kw)
            _, state = lola_attention(*(x[:, -1:] for x in xs), gate, initial_state=state, **kw)
        else:
            _, state = lola_attention(*xs, gate, **kw)
        assert state.cache_pos[0, 0].tolist() == keep, selection
        if selection == 'loo':
            assert state.s[0, 0].tolist() == [3.0, 0.0]


@pytest.mark.parametrize('selection', ['recency', 'value_norm', 'random'])
def test_ablation_selections_are_refused(selection):
    p = small_problem()
    p.selection = selection
    with pytest.raises(ValueError, match='sre'):
        lola_attention(*p.tensors, **p.options, backend='triton')
    from fla_lola.kernels import triton_lola_attention
    with pytest.raises(ValueError, match='sre'):
        triton_lola_attention(*p.tensors, **p.options, scale=0.5)


# ---- 6. the fla primitives the prefill builds on ---------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6), chunk=st.integers(1, 8))
def test_fla_chunk_index_helpers_match_their_formula(lengths, chunk):
    """``chunk.py`` lays out its output grid with fla's ``prepare_chunk_indices`` / ``prepare_chunk_offsets``:
    pinned here against the plain formula, zero-length rows (empty or fully padded) included."""
    from fla.ops.utils import prepare_chunk_indices, prepare_chunk_offsets

    cu = torch.tensor([0] + lengths, device=DEVICE).cumsum(0)
    counts = [-(-n // chunk) for n in lengths]
    offsets = [sum(counts[:i]) for i in range(len(counts) + 1)]
    indices = [[i, c] for i, n in enumerate(counts) for c in range(n)]
    assert prepare_chunk_offsets(cu, chunk).cpu().tolist() == offsets
    assert prepare_chunk_indices(cu, chunk).cpu().reshape(-1, 2).tolist() == indices


# ---- 7. the GPU benchmark's smoke mode ------------------------------------------------------------------

def test_gpu_benchmark_smoke_mode_writes_valid_json(tmp_path):
    """``benchmarks/gpu.py --smoke`` (what CI runs under the interpreter) finishes and writes its JSON and PNG."""
    out, png = tmp_path / 'gpu.json', tmp_path / 'gpu.png'
    proc = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--smoke', '--json', str(out),
                           '--png', str(png)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, 'TQDM_DISABLE': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result['config']['smoke'] is True
    assert {'prefill', 'decode'} <= {r['kind'] for r in result['rows']}
    methods = {r['method'] for r in result['rows']}
    assert {'lola_triton', 'lola_loo', 'sdpa', 'chunk_linear_attn', 'sliding_window'} <= methods, methods
    for r in result['rows']:
        assert r['ms'] > 0 and r['T'] > 0, r
    assert all({'name', 'value', 'met'} <= set(t) for t in result['targets'])
    assert [m['cache_size'] for m in result['memory']] == result['config']['cache_sizes']
    assert all(m['state_bytes'] > 0 and m['snapshot_bytes_per_token'] > 0 for m in result['memory'])
    assert png.stat().st_size > 0
