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
