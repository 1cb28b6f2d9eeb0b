"""Which pairs the sparse cache keeps, on inputs whose scores are known by hand."""

from __future__ import annotations

import pytest
import torch

from fla_lola import lola_attention, naive_lola_attention
from fla_lola.ops.utils import random_score

BACKENDS = ['naive', 'torch']


def call(backend, v, fk, *, cache_size, selection='sre', window_size=2):
    """One head, D = 1, the given values and one-hot-ish key features; returns the final state."""
    T = v.shape[0]
    q = torch.zeros(1, T, 1, 1, dtype=torch.float64)
    k = torch.zeros(1, T, 1, 1, dtype=torch.float64)
    fq = torch.full((1, T, 1, fk.shape[-1]), 0.5, dtype=torch.float64)
    args = (q, k, v.view(1, T, 1, -1).double(), fq, fk.view(1, T, 1, -1).double(), torch.tensor([0.5]).double())
    kw = dict(window_size=window_size, cache_size=cache_size, selection=selection, output_final_state=True)
    if backend == 'naive':
        return naive_lola_attention(*args, **kw)[1]
    return lola_attention(*args, backend=backend, **kw)[1]


def cached(state):
    pos = state.cache_pos[0, 0]
    return pos[pos >= 0].tolist()


E1, E2 = [1.0, 0.0], [0.0, 1.0]
A = [1.0, 0.0]


def sre_case():
    """η = 2. Chunk 0 = tokens 0, 1; chunk 1 = tokens 2, 3; chunk 2 = tokens 4, 5.

    End of chunk 1: W = {0, 1}, the memory is empty, so e_j = ‖v_j‖: token 1 (‖2a‖ = 2) beats token 0 (1).
    With λ = 1, token 0 is folded: H = e1 aᵀ, s = e1.
    End of chunk 2: candidates G ∪ W = {1, 2, 3}, scored against that memory, which recalls a for e1:
      token 1: v = 2a, recall a → e = 1;  token 2: v = a, recall a → e = 0 (recalled perfectly);
      token 3: φk = e2, recall 0 → e = ‖0.5 a‖ = 0.5.
    """
    v = torch.tensor([A, [2.0, 0.0], A, [0.5, 0.0], [0.0, 0.0], [0.0, 0.0]])
    fk = torch.tensor([E1, E1, E1, E2, E1, E1])
    return v, fk


@pytest.mark.parametrize('backend', BACKENDS)
def test_sre_keeps_what_the_memory_recalls_worst(backend):
    v, fk = sre_case()
    assert cached(call(backend, v[:4], fk[:4], cache_size=1)) == [1]
    state = call(backend, v, fk, cache_size=1)
    assert cached(state) == [1]                       # e = 1 beats 0.5 and 0
    # folded: token 0 at the first boundary, tokens 2 and 3 at the second
    torch.testing.assert_close(state.h[0, 0], torch.tensor([[2.0, 0.0], [0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(state.s[0, 0], torch.tensor([2.0, 1.0], dtype=torch.float64))
    # λ = 2: nothing is folded at the first boundary, so at the second the memory is still empty and
    # e_j = ‖v_j‖ = 1, 2, 1, 0.5 for tokens 0..3: token 1, then the tie 0 vs 2 goes to the earlier 0
    assert cached(call(backend, v, fk, cache_size=2)) == [0, 1]


@pytest.mark.parametrize('backend', BACKENDS)
def test_ties_keep_the_earlier_position(backend):
    # empty memory: e_j = ‖v_j‖, and tokens 0, 1 have equal norms
    v = torch.tensor([[1.0, 0.0], [0.0, -1.0], [0.0, 0.0], [0.0, 0.0]])
    fk = torch.tensor([E1, E2, E1, E1])
    assert cached(call(backend, v, fk, cache_size=1)) == [0]
    # the same with equal scores among cache and window at a later boundary: all four pairs tie at 0 norm
    v0 = torch.zeros(8, 2)
    assert cached(call(backend, v0, torch.tensor([E1] * 8), cache_size=3)) == [0, 1, 2]


@pytest.mark.parametrize('backend', BACKENDS)
def test_other_scores_keep_what_they_say(backend):
    T = 10
    g = torch.Generator().manual_seed(0)
    v = torch.randn(T, 2, generator=g)
    fk = torch.softmax(torch.randn(T, 2, generator=g), -1)
    # after 10 tokens with η = 2, chunk 4 (tokens 8, 9) is the window: pairs 0..7 have been candidates
    candidates = torch.arange(8)
    assert cached(call(backend, v, fk, cache_size=2, selection='recency')) == [6, 7]
    norms = v[:8].norm(dim=-1)
    assert cached(call(backend, v, fk, cache_size=2, selection='value_norm')) == sorted(norms.argsort()[-2:].tolist())
    rnd = random_score(candidates, torch.zeros_like(candidates))
    assert cached(call(backend, v, fk, cache_size=2, selection='random')) == sorted(rnd.argsort()[-2:].tolist())


def duplicates_case():
    """η = 4, λ = 1. Chunk 0 = three copies of (φk = e1, v = a), then one pair (e2, 0.5 a); chunk 1 is filler.

    At the boundary after chunk 1 the memory is empty and G is empty, so the candidates are chunk 0:
      SRE:  e_j = ‖v_j‖ → the copies score 1, the odd one 0.5: the earliest copy (0) is kept.
      LOO:  a copy read against the other two copies recalls a exactly → e = 0; the odd pair's φ is orthogonal
            to every other candidate, so it recalls 0/(0 + ε) = 0 → e = 0.5: pair 3 is kept and the three
            copies are folded, H = 3 e1 aᵀ, s = 3 e1.
    """
    v = torch.tensor([A, A, A, [0.5, 0.0]] + [[0.0, 0.0]] * 4)
    fk = torch.tensor([E1, E1, E1, E2] + [E1] * 4)
    return v, fk


@pytest.mark.parametrize('backend', BACKENDS)
def test_loo_keeps_what_the_other_candidates_do_not_explain(backend):
    v, fk = duplicates_case()
    assert cached(call(backend, v, fk, cache_size=1, window_size=4, selection='sre')) == [0]
    state = call(backend, v, fk, cache_size=1, window_size=4, selection='loo')
    assert cached(state) == [3]
    torch.testing.assert_close(state.h[0, 0], torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(state.s[0, 0], torch.tensor([3.0, 0.0], dtype=torch.float64))


def test_loo_scores_keep_float32_accuracy_where_subtraction_would_cancel():
    """Candidate 0's features are large and almost one-hot on a direction no other candidate or the memory uses, so its
    leave-one-out denominator is tiny next to ``φ₀ᵀsₐ`` and ``‖φ₀‖²``: the form ``φ₀ᵀsₐ − ‖φ₀‖²`` cancels in
    float32, the Gram form with the diagonal zeroed does not."""
    from fla_lola.ops.selection import selection_scores

    g = torch.Generator().manual_seed(0)
    F, Dv, C = 8, 4, 6
    fk = torch.softmax(torch.randn(1, C, F, generator=g, dtype=torch.float64), -1)
    fk[0, 0] = 10 * torch.softmax(torch.tensor([30.0] + [0.0] * (F - 1), dtype=torch.float64), -1)
    fk[0, 1:, 0] = 1e-9
    v = torch.randn(1, C, Dv, generator=g, dtype=torch.float64)
    hs = torch.cat([torch.rand(F, Dv, generator=g, dtype=torch.float64),
                    torch.rand(F, 1, generator=g, dtype=torch.float64)], -1)[None]
    hs[0, 0] = 0                       # the memory never saw direction 0 either
    args = dict(pos=torch.arange(C)[None], head=torch.zeros(1, dtype=torch.long))
    exact = selection_scores('loo', hs, v, fk, **args)
    fast = selection_scores('loo', hs.float(), v.float(), fk.float(), **args).double()
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-6)
    # the case does discriminate: subtracting φ_j from the totals in float32 loses candidate 0's score
    f32 = fk.float()
    tot = torch.bmm(f32.transpose(1, 2), torch.cat([v.float(), torch.ones(1, C, 1)], -1)) + hs.float()
    r = torch.bmm(f32, tot) - (f32 * f32).sum(-1, keepdim=True) * torch.cat([v.float(), torch.ones(1, C, 1)], -1)
    subtracted = torch.linalg.vector_norm(v.float() - r[..., :-1] / (r[..., -1:] + 1e-6), dim=-1).double()
    assert (subtracted - exact).abs()[0, 0] > 1e-2 * exact[0, 0].abs()
    # given the running total (as the chunked backend passes it), the cancelling memory is recomputed directly
    carried = selection_scores('loo', hs.float(), v.float(), fk.float(), total=tot, **args).double()
    torch.testing.assert_close(carried, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_loo_scores_from_the_running_total_equal_the_direct_form(dtype, monkeypatch):
    """The chunked backend scores "loo" from ``[Hₐ | sₐ]`` minus each candidate's own term; memories where that
    term dominates (here: memory 1, whose candidate 2 has a feature direction to itself) are recomputed directly.
    Every memory's scores equal the Gram form's, whichever path it took."""
    from fla_lola.ops.selection import selection_scores

    g = torch.Generator().manual_seed(1)
    M, C, F, Dv = 4, 12, 6, 5
    fk = torch.softmax(3 * torch.randn(M, C, F, generator=g, dtype=torch.float64), -1)
    fk[1, :, 0] = 0
    fk[1, 2] = torch.tensor([4.0] + [0.0] * (F - 1), dtype=torch.float64)
    fk[3, 9:] = 0                                           # invalid candidates hold zeros
    v = torch.randn(M, C, Dv, generator=g, dtype=torch.float64)
    v[3, 9:] = 0
    hs = torch.rand(M, F, Dv + 1, generator=g, dtype=torch.float64)
    hs[1, 0] = 0
    ones = (fk.sum(-1, keepdim=True) > 0).to(fk.dtype)
    total = hs + torch.bmm(fk.transpose(1, 2), torch.cat([v, ones], -1))
    args = dict(pos=torch.arange(C).repeat(M, 1), head=torch.zeros(M, dtype=torch.long))
    exact = selection_scores('loo', hs, v, fk, **args)
    import fla_lola.ops.selection as selection
    direct, recomputed = selection.leave_one_out_recall, []

    def spy(hs, fk, v, total=None):
        if total is None:
            recomputed.append(fk.shape[0])
        return direct(hs, fk, v, total)
    monkeypatch.setattr(selection, 'leave_one_out_recall', spy)
    carried = selection_scores('loo', hs.to(dtype), v.to(dtype), fk.to(dtype), total=total.to(dtype), **args)
    assert recomputed == [1]                                # memory 1 only
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(carried.double(), exact, **tol)
    # and the Gram form equals the literal definition: each candidate against H plus every *other* candidate
    for m, j in [(0, 0), (1, 2), (3, 4)]:
        others = [c for c in range(C) if c != j]
        rest = hs[m] + fk[m, others].T @ torch.cat([v[m, others], ones[m, others]], -1)
        r = fk[m, j] @ rest
        torch.testing.assert_close(exact[m, j], torch.linalg.vector_norm(v[m, j] - r[:-1] / (r[-1] + 1e-6)))
