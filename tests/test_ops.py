"""Properties of the LoLA op (docs/SPEC.md), each checked against the naive reference or a closed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as Fn
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from lola_problems import (Problem, assert_bounded_state, assert_states_equal, make_problem, padding_mask, problems,
                           split_points)

from fla_lola import lola_attention, naive_lola_attention

EPS = 1e-6


def run(p: Problem, backend, tensors=None, **kw):
    tensors = p.tensors if tensors is None else tensors
    if backend == 'naive':
        return naive_lola_attention(*tensors, **p.options, **kw)
    return lola_attention(*tensors, **p.options, backend=backend, **kw)


# ---- 1. the torch backend computes the reference ---------------------------------------------

@given(p=problems())
@example(p=make_problem(0, B=1, T=13, H=1, Hkv=1, D=2, Dv=2, F=2, window_size=1, cache_size=0))
@example(p=make_problem(1, B=2, T=30, H=2, Hkv=1, D=3, Dv=1, F=1, window_size=3, cache_size=6, mix='lolcats'))
def test_torch_matches_naive_float64(p):
    """Same math in float64: outputs and the whole final state agree to rounding."""
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    o, s = run(p, 'torch', output_final_state=True)
    torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(s, s_ref, atol=1e-10, rtol=1e-9)


@settings(max_examples=60)
@given(p=problems(selections=('sre',)), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_torch_low_precision_error_is_pytorchs_own(p, dtype):
    """FlashAttention-style bound: on the same rounded inputs, the torch backend in ``dtype`` is at most twice as far
    from the float64 reference as the naive loop in ``dtype`` is, plus the rounding of the output itself."""
    low = p.to(dtype)
    ref, _ = run(low.to(torch.float64), 'naive')
    naive_low, _ = run(low, 'naive')
    fast_low, _ = run(low, 'torch')
    assert fast_low.dtype == dtype
    own_error = (naive_low.double() - ref).abs().max().item()
    output_rounding = torch.finfo(dtype).eps * ref.abs().max().item()
    error = (fast_low.double() - ref).abs().max().item()
    assert error <= 2 * own_error + 2 * output_rounding + 1e-12, (error, own_error, output_rounding)


@given(p=problems(max_T=64, max_window=4), data=st.data())
def test_torch_grid_in_segments_matches_naive(p, data):
    """Without autograd the torch backend lays its packed grid out a segment of chunks at a time; with segments of
    one chunk (the most refills) outputs and final state still equal the reference, continuing a state at any
    phase, and as closely as what one segment gives (segments change the shapes of the batched products, so the two
    layouts need not round alike)."""
    from unittest import mock

    import fla_lola.ops.chunk as chunk

    cut = data.draw(st.integers(0, p.q.shape[1] - 1), label='cut')
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    results = []
    for elements in (1, chunk.SEGMENT_ELEMENTS):
        with mock.patch.object(chunk, 'SEGMENT_ELEMENTS', elements), torch.no_grad():
            o0, state = run(p, 'torch', tensors=p.slice(0, cut), output_final_state=True) if cut else (None, None)
            o1, state = run(p, 'torch', tensors=p.slice(cut, p.q.shape[1]), initial_state=state,
                            output_final_state=True)
        results.append((o1 if o0 is None else torch.cat([o0, o1], 1), state))
    for o, state in results:
        torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
        assert_states_equal(state, s_ref, atol=1e-10, rtol=1e-9)


# ---- 2. streaming -------------------------------------------------------------------------------

@given(p=problems(max_T=48), data=st.data(), backends=st.sampled_from([('torch', 'torch'), ('naive', 'torch'),
                                                                       ('torch', 'naive')]))
def test_streaming_split_is_invariant(p, data, backends):
    """Any split into prefills and single tokens, the state carried across (and across backends), gives the
    outputs and final state of one call."""
    T = p.q.shape[1]
    o_ref, s_ref = run(p, 'naive', output_final_state=True)
    points = data.draw(split_points(T))
    state, outs = None, []
    for i, (a, b) in enumerate(zip(points[:-1], points[1:])):
        o, state = run(p, backends[i % 2], tensors=p.slice(a, b), initial_state=state, output_final_state=True)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_ref, atol=1e-10, rtol=1e-9)
    assert_states_equal(state, s_ref, atol=1e-10, rtol=1e-9)


def test_calls_never_mutate_the_initial_state():
    p = make_problem(3, B=2, T=20, H=2, Hkv=1, D=4, Dv=3, F=3, window_size=3, cache_size=2)
    _, state = run(p, 'torch', tensors=p.slice(0, 11), output_final_state=True)
    before = state.clone()
    for backend, (a, b) in (('torch', (11, 12)), ('torch', (11, 20)), ('naive', (11, 20))):
        run(p, backend, tensors=p.slice(a, b), initial_state=state, output_final_state=True)
        assert_states_equal(state, before, atol=0, rtol=0)


# ---- 3. λ = 0 is terraced window + linear attention --------------------------------------------

def terraced_window_linear(p: Problem):
    """LoLCATs' attention written independently as dense masked matrices: query t in chunk c = t // η sees
    keys of chunks c-1 and c (causally) by softmax, and every earlier key by linear attention."""
    q, k, v, fq, fk, gate = (x.double() for x in p.tensors)
    B, T, H, D = q.shape
    grp = H // k.shape[2]
    k, v = k.repeat_interleave(grp, 2), v.repeat_interleave(grp, 2)
    eta = p.window_size
    t = torch.arange(T)
    chunk = t // eta
    window = (t[None, :] <= t[:, None]) & (chunk[None, :] >= chunk[:, None] - 1)       # [Tq, Tk]
    linear = chunk[None, :] < chunk[:, None] - 1
    a = torch.einsum('bqhd,bkhd->bhqk', q, k) * D ** -0.5
    a = a.masked_fill(~window, float('-inf'))
    lin = torch.einsum('bqhf,bkhf->bhqk', fq, fk) * linear
    gam = gate[None, :, None, None]
    if p.mix == 'lola':
        c = a.amax(-1, keepdim=True).clamp(min=0)
        w, e = torch.exp(a - c), torch.exp(-c)
        num = gam * w + (1 - gam) * e * lin
        y = num @ v.transpose(1, 2) / (num.sum(-1, keepdim=True) + EPS * e)
    else:
        w = torch.exp(a - a.amax(-1, keepdim=True))
        num = gam * w + lin
        y = num @ v.transpose(1, 2) / num.sum(-1, keepdim=True)
    return y.transpose(1, 2)


@given(p=problems(max_cache=0), backend=st.sampled_from(['naive', 'torch']))
def test_lambda0_is_terraced_window_plus_linear(p, backend):
    o, _ = run(p, backend)
    torch.testing.assert_close(o, terraced_window_linear(p), atol=1e-10, rtol=1e-9)


# ---- 4. λ ≥ T is exact causal softmax attention --------------------------------------------------

@given(p=problems(mixes=('lola',)), backend=st.sampled_from(['naive', 'torch']))
def test_cache_as_large_as_the_sequence_is_causal_softmax(p, backend):
    """Nothing is ever folded, so y = N / (A + ε/γ): SDPA up to a relative ε/(γ·A) that the test computes."""
    T = p.q.shape[1]
    p.cache_size = T
    o, _ = run(p, backend)
    q, k, v = p.q, p.k, p.v
    grp = q.shape[2] // k.shape[2]
    qt, kt, vt = q.transpose(1, 2), k.repeat_interleave(grp, 2).transpose(1, 2), v.repeat_interleave(grp, 2).transpose(1, 2)
    sdpa = Fn.scaled_dot_product_attention(qt, kt, vt, is_causal=True).transpose(1, 2)
    a = (qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf'))
    A = torch.exp(a - a.amax(-1, keepdim=True).clamp(min=0)).sum(-1).transpose(1, 2)     # [B, T, H]
    bound = sdpa.abs() * (EPS / (p.gate[None, None, :] * A)).unsqueeze(-1) + 1e-12
    assert ((o - sdpa).abs() <= bound).all(), ((o - sdpa).abs() - bound).max()


# ---- 5. bounded state ----------------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(p=problems(max_B=2, max_T=4, max_window=4, selections=('sre',)), T=st.integers(40, 160), data=st.data(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_state_stays_bounded_and_canonical_over_long_streams(p, T, data, dtype):
    """Long random streams (prefills and single tokens, alternating backends): after every call the state has the
    byte count of its fixed capacity and a cache of exactly min(λ, η × boundaries) pairs in canonical order."""
    B, H, Hkv = p.q.shape[0], p.q.shape[2], p.k.shape[2]
    p = make_problem(data.draw(st.integers(0, 2**16), label='seed'), B=B, T=T, H=H, Hkv=Hkv, D=p.q.shape[3],
                     Dv=p.v.shape[3], F=p.fq.shape[3], window_size=p.window_size, cache_size=p.cache_size,
                     mix=p.mix, dtype=dtype)
    points = data.draw(split_points(T), label='points')
    state = None
    for a, b in zip(points[:-1], points[1:]):
        backend = data.draw(st.sampled_from(['torch', 'naive'] if b - a <= 16 else ['torch']), label='backend')
        _, state = run(p, backend, tensors=p.slice(a, b), initial_state=state, output_final_state=True)
        assert torch.equal(state.seen, torch.full((B,), b))
        assert_bounded_state(state, p)


# ---- 6. padding, packing, GQA, independence ------------------------------------------------------

@given(p=problems(max_B=3, max_T=30), kept=st.lists(st.floats(0, 1), min_size=3, max_size=3), left=st.booleans(),
       backend=st.sampled_from(['naive', 'torch']))
@example(p=make_problem(0, B=1, T=1, H=1, Hkv=1, D=1, Dv=1, F=1, window_size=1, cache_size=0, mix='lolcats'),
         kept=[0.0, 0.0, 0.0], left=False, backend='torch').via('a fully padded row gave 0/0 = NaN with mix="lolcats"')
def test_padded_rows_equal_each_row_alone(p, kept, left, backend):
    B, T = p.q.shape[:2]
    mask = padding_mask(T, kept[:B], left)
    o, state = run(p, backend, attention_mask=mask, output_final_state=True)
    assert (o[mask == 0] == 0).all()
    for b in range(B):
        keep = mask[b].bool()
        alone = [x[b:b + 1, keep] for x in p.tensors[:5]] + [p.gate]
        o_alone, s_alone = run(p, 'naive', tensors=alone, output_final_state=True)
        torch.testing.assert_close(o[b:b + 1, keep], o_alone, atol=1e-10, rtol=1e-9)
        assert_states_equal(state.index_select(torch.tensor([b])), s_alone)


@given(p=problems(max_B=1, max_T=40), data=st.data(), backend=st.sampled_from(['naive', 'torch']))
def test_packed_sequences_equal_each_sequence_alone(p, data, backend):
    T = p.q.shape[1]
    cuts = sorted(data.draw(st.lists(st.integers(0, T), max_size=4)))
    cu = torch.tensor([0] + cuts + [T])
    o, state = run(p, backend, cu_seqlens=cu, output_final_state=True)
    assert state.batch_size == len(cu) - 1
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_alone, s_alone = run(p, 'naive', tensors=p.slice(a, b), output_final_state=True)
        torch.testing.assert_close(o[:, a:b], o_alone, atol=1e-10, rtol=1e-9)
        assert_states_equal(state.index_select(torch.tensor([i])), s_alone)


@given(p=problems(max_heads=2, max_group=3), backend=st.sampled_from(['naive', 'torch']))
def test_gqa_equals_repeated_keys_and_values(p, backend):
    grp = p.q.shape[2] // p.k.shape[2]
    o, _ = run(p, backend)
    full = [p.q, p.k.repeat_interleave(grp, 2), p.v.repeat_interleave(grp, 2), p.fq, p.fk, p.gate]
    o_full, _ = run(p, backend, tensors=full)
    torch.testing.assert_close(o, o_full, atol=1e-12, rtol=1e-12)


@given(p=problems(max_B=3, max_group=2), data=st.data())
def test_batch_rows_and_heads_never_interact(p, data):
    B, T, H, _ = p.q.shape
    o, _ = run(p, 'torch')
    b, h = data.draw(st.integers(0, B - 1)), data.draw(st.integers(0, H - 1))
    q, fq, fk = p.q.clone(), p.fq.clone(), p.fk.clone()
    q[b] += 3.0                                   # a different row b
    q[:, :, h] -= 2.0                             # and a different query head h in every row
    fq[:, :, h] = fq[:, :, h].flip(-1)
    fk[:, :, h] = fk[:, :, h].roll(1, dims=-1)
    o2, _ = run(p, 'torch', tensors=[q, p.k, p.v, fq, fk, p.gate])
    other_rows = [r for r in range(B) if r != b]
    other_heads = [x for x in range(H) if x != h]
    torch.testing.assert_close(o2[other_rows][:, :, other_heads], o[other_rows][:, :, other_heads],
                               atol=0, rtol=0)


# ---- decode path details ---------------------------------------------------------------------------

def test_masked_decode_rows_keep_their_state_and_output_zero():
    p = make_problem(5, B=3, T=9, H=2, Hkv=2, D=4, Dv=3, F=3, window_size=2, cache_size=2)
    _, state = run(p, 'torch', tensors=p.slice(0, 8), output_final_state=True)
    mask = torch.tensor([[1], [0], [1]])
    o, new = run(p, 'torch', tensors=p.slice(8, 9), initial_state=state, attention_mask=mask, output_final_state=True)
    assert (o[1] == 0).all()
    assert_states_equal(new.index_select(torch.tensor([1])), state.index_select(torch.tensor([1])), atol=0, rtol=0)
    o_ref, s_ref = run(p, 'naive', tensors=p.slice(8, 9), initial_state=state, attention_mask=mask,
                       output_final_state=True)
    torch.testing.assert_close(o, o_ref)
    assert_states_equal(new, s_ref)


@settings(max_examples=60)
@given(p=problems(max_B=3, max_T=30), data=st.data())
def test_decode_rows_at_different_positions_match_naive(p, data):
    """On CPU the one-token step reads the rows' positions back: rows all at one position take a contiguous slice
    of the window, rows at different positions (here after a padded prefill) the per-row masked path. Both, with
    and without a mask of ones, in place and not, equal the naive reference step after step."""
    B, T = p.q.shape[:2]
    assume(T >= 2)
    cut = data.draw(st.integers(1, T - 1))
    kept = data.draw(st.lists(st.floats(0, 1), min_size=B, max_size=B))
    prefill_mask = padding_mask(cut, kept, left=data.draw(st.booleans()))
    ones = data.draw(st.booleans())
    _, ref = run(p, 'naive', tensors=p.slice(0, cut), attention_mask=prefill_mask, output_final_state=True)
    state = ref.clone()
    for t in range(cut, T):
        mask = torch.ones(B, 1, dtype=torch.long) if ones else None
        o_ref, ref = run(p, 'naive', tensors=p.slice(t, t + 1), initial_state=ref, attention_mask=mask,
                         output_final_state=True)
        inplace = data.draw(st.booleans())
        o, new = run(p, 'torch', tensors=p.slice(t, t + 1), initial_state=state, attention_mask=mask,
                     output_final_state=True, inplace_state=inplace)
        assert (new is state) == inplace
        torch.testing.assert_close(o, o_ref, atol=1e-10, rtol=1e-9)
        assert_states_equal(new, ref, atol=1e-10, rtol=1e-9)
        state = new


# ---- in-place state updates (the layer owns its state in fla's Cache) --------------------------------

@settings(max_examples=60)
@given(p=problems(max_T=30), data=st.data())
def test_inplace_decode_equals_out_of_place_and_naive(p, data):
    """A prefill, then one token at a time with ``inplace_state=True`` (rows dropping out under a decode mask):
    same outputs and final state as the out-of-place calls and as the naive reference, and the state object
    passed in is the one that comes back, updated."""
    B, T = p.q.shape[:2]
    cut = data.draw(st.integers(0, T - 1))
    masks = [torch.tensor(data.draw(st.lists(st.integers(0, 1), min_size=B, max_size=B)))[:, None]
             for _ in range(cut, T)]
    runs = {}
    for mode in ('naive', 'out_of_place', 'inplace'):
        backend = 'naive' if mode == 'naive' else 'torch'
        state, outs = None, []
        if cut:
            o, state = run(p, backend, tensors=p.slice(0, cut), output_final_state=True)
            outs.append(o)
        for t, mask in zip(range(cut, T), masks):
            kw = dict(inplace_state=True) if mode == 'inplace' and state is not None else {}
            o, new = run(p, backend, tensors=p.slice(t, t + 1), initial_state=state, attention_mask=mask,
                         output_final_state=True, **kw)
            if kw:
                assert new is state
            state = new
            outs.append(o)
        runs[mode] = torch.cat(outs, 1), state
    for mode in ('out_of_place', 'inplace'):
        torch.testing.assert_close(runs[mode][0], runs['naive'][0], atol=1e-10, rtol=1e-9)
        assert_states_equal(runs[mode][1], runs['naive'][1], atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(runs['inplace'][0], runs['out_of_place'][0], atol=0, rtol=0)
    assert_states_equal(runs['inplace'][1], runs['out_of_place'][1], atol=0, rtol=0)


@given(p=problems(max_T=30), backend=st.sampled_from(['naive', 'torch']))
def test_inplace_prefill_writes_the_out_of_place_result(p, backend):
    """Calls of several tokens with ``inplace_state=True`` copy their result into the state passed in."""
    T = p.q.shape[1]
    cut = max(1, T // 2)
    _, state = run(p, 'torch', tensors=p.slice(0, cut), output_final_state=True)
    later = dict(tensors=p.slice(cut, T), initial_state=state, output_final_state=True)
    o_ref, s_ref = run(p, backend, **later)
    o, new = lola_attention(*later.pop('tensors'), **p.options, backend=backend, inplace_state=True, **later)
    assert new is state
    torch.testing.assert_close(o, o_ref, atol=0, rtol=0)
    assert_states_equal(state, s_ref, atol=0, rtol=0)


def test_failed_inplace_call_changes_nothing():
    """Every check runs before the state is written: a call that raises leaves it bit for bit as it was."""
    p = make_problem(7, B=2, T=12, H=2, Hkv=1, D=4, Dv=3, F=3, window_size=3, cache_size=2)
    _, state = run(p, 'torch', tensors=p.slice(0, 11), output_final_state=True)  # the next token closes a chunk
    before = state.clone()
    one = p.slice(11, 12)
    nan_q = [one[0].clone().fill_(float('nan'))] + one[1:]
    neg_fk = one[:4] + [-one[4]] + one[5:]
    bad_calls = [
        (dict(tensors=nan_q), 'q'),
        (dict(tensors=neg_fk), 'fk'),
        (dict(tensors=one, attention_mask=torch.tensor([[2], [1]])), 'attention_mask'),
        (dict(tensors=one[:5] + [one[5] * 0 + 1]), 'gate'),
        (dict(tensors=[x[:1] for x in one[:5]] + [one[5]]), 'initial_state'),
    ]
    for kw, name in bad_calls:
        with pytest.raises(ValueError, match=f'`{name}`'):
            run(p, 'torch', initial_state=state, output_final_state=True, inplace_state=True, **kw)
        assert_states_equal(state, before, atol=0, rtol=0)
    with pytest.raises(ValueError, match='`inplace_state`'):
        run(p, 'torch', tensors=one, initial_state=state, inplace_state=True)
    assert_states_equal(state, before, atol=0, rtol=0)


# ---- autograd ---------------------------------------------------------------------------------------

@settings(max_examples=25)
@given(p=problems(max_B=2, max_T=20, max_dim=4), only=st.one_of(st.none(), st.integers(0, 5)))
@example(p=make_problem(2, B=1, T=40, H=2, Hkv=1, D=4, Dv=3, F=3, window_size=4, cache_size=4), only=0)
@example(p=make_problem(3, B=1, T=40, H=2, Hkv=1, D=4, Dv=3, F=3, window_size=4, cache_size=4), only=5)
def test_torch_gradients_equal_naive_gradients(p, only):
    """Every input's gradient, with all of them requiring it or only one (``only``: its index among q, k, v, φq,
    φk, gate; the torch backend must not then overwrite its temporaries in place)."""
    def grads(backend):
        xs = [x.clone().requires_grad_(only is None or i == only) for i, x in enumerate(p.tensors)]
        o, _ = run(p, backend, tensors=xs)
        if o.requires_grad:  # (not when the one input asked for never reaches the output, e.g. φk with λ = 0)
            (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum().backward()
        return [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]  # None: unused or not asked for

    for g, g_ref in zip(grads('torch'), grads('naive')):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-8)


@settings(max_examples=25)
@given(p=problems(max_B=2, max_T=20, max_dim=4), data=st.data())
@example(p=make_problem(4, B=1, T=4, H=2, Hkv=1, D=4, Dv=4, F=4, window_size=2, cache_size=2), data=None)
def test_gradients_through_one_token_steps_equal_naive_gradients(p, data):
    """One-token calls after a prefill (the decode path), with autograd on: every input's and the carried state's
    gradient equals the reference's, chunk boundaries included (the decode step once shifted its window in place
    after the read-out had saved it, and backward raised). The example is that bug's case: its last step completes
    a chunk."""
    T = p.q.shape[1]
    cut = T - 1 if data is None else data.draw(st.integers(1, T - 1), label='cut') if T > 1 else 0

    def grads(backend):
        xs = [x.clone().requires_grad_() for x in p.tensors]
        o, state = run(p, backend, tensors=[x[:, :cut] for x in xs[:5]] + [xs[5]], output_final_state=True) \
            if cut else (None, None)
        outs = [] if o is None else [o]
        for t in range(cut, T):
            o, state = run(p, backend, tensors=[x[:, t:t + 1] for x in xs[:5]] + [xs[5]], initial_state=state,
                           output_final_state=True)
            outs.append(o)
        o = torch.cat(outs, 1)
        ((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() + state.h.sum()).backward()
        return [torch.zeros_like(x) if x.grad is None else x.grad for x in xs]

    for g, g_ref in zip(grads('torch'), grads('naive')):
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize('mix', ['lola', 'lolcats'])
def test_padding_keeps_gradients_finite(mix):
    p = make_problem(2, B=3, T=9, H=2, Hkv=1, D=3, Dv=2, F=3, window_size=2, cache_size=2, mix=mix)
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [0] * 9])
    xs = [x.clone().requires_grad_() for x in p.tensors]
    o, _ = run(p, 'torch', tensors=xs, attention_mask=mask)
    o.square().sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)
    assert (xs[0].grad[mask == 0] == 0).all()


def test_auto_uses_torch_on_cpu_and_triton_needs_a_gpu_or_the_interpreter(monkeypatch):
    p = make_problem(0, B=1, T=5, H=1, Hkv=1, D=2, Dv=2, F=2, window_size=2, cache_size=1)
    torch.testing.assert_close(run(p, 'auto')[0], run(p, 'torch')[0], atol=0, rtol=0)
    monkeypatch.delenv('TRITON_INTERPRET', raising=False)
    with pytest.raises(ValueError, match='backend'):
        run(p, 'triton')
