"""Hypothesis strategies that build valid LoLA inputs (shared by the op tests and the kernel tests)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from fla_lola import LoLAState


@dataclass
class Problem:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    fq: torch.Tensor
    fk: torch.Tensor
    gate: torch.Tensor
    window_size: int
    cache_size: int
    mix: str = 'lola'
    selection: str = 'sre'
    extra: dict = field(default_factory=dict)

    @property
    def tensors(self):
        return self.q, self.k, self.v, self.fq, self.fk, self.gate

    @property
    def options(self):
        return dict(window_size=self.window_size, cache_size=self.cache_size, mix=self.mix,
                    selection=self.selection)

    def to(self, dtype):
        cast = [x.to(dtype) for x in self.tensors]
        return Problem(*cast, self.window_size, self.cache_size, self.mix, self.selection, self.extra)

    def slice(self, a, b):
        """Tokens a..b of every sequence (the gate is per head and stays)."""
        return [x[:, a:b] for x in self.tensors[:5]] + [self.gate]


def make_problem(seed, B, T, H, Hkv, D, Dv, F, window_size, cache_size, mix='lola', selection='sre',
                 logit_scale=1.0, dtype=torch.float64) -> Problem:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q = randn(B, T, H, D) * logit_scale
    k = randn(B, T, Hkv, D)
    v = randn(B, T, Hkv, Dv)
    # features as the layer makes them: softmax outputs, non-negative and summing to one
    fq = torch.softmax(randn(B, T, H, F), -1)
    fk = torch.softmax(randn(B, T, H, F), -1)
    gate = torch.rand(H, generator=g, dtype=torch.float64) * 0.9 + 0.05
    return Problem(q, k, v, fq, fk, gate, window_size, cache_size, mix, selection).to(dtype)


@st.composite
def problems(draw, max_B=3, max_T=40, max_heads=2, max_group=2, max_dim=8, max_window=6, max_cache=6,
             mixes=('lola', 'lolcats'), selections=('sre', 'loo', 'recency', 'value_norm', 'random'), dtype=torch.float64):
    Hkv = draw(st.integers(1, max_heads))
    return make_problem(
        seed=draw(st.integers(0, 2**31 - 1)),
        B=draw(st.integers(1, max_B)),
        T=draw(st.integers(1, max_T)),
        H=Hkv * draw(st.integers(1, max_group)),
        Hkv=Hkv,
        D=draw(st.integers(1, max_dim)),
        Dv=draw(st.integers(1, max_dim)),
        F=draw(st.integers(1, max_dim)),
        window_size=draw(st.integers(1, max_window)),
        cache_size=draw(st.integers(0, max_cache)),
        mix=draw(st.sampled_from(mixes)),
        selection=draw(st.sampled_from(selections)),
        logit_scale=draw(st.sampled_from([0.5, 1.0, 4.0])),
        dtype=dtype,
    )


@st.composite
def split_points(draw, T):
    """Sorted cut points 0 < ... < T: any mix of prefills and single tokens."""
    cuts = draw(st.lists(st.integers(1, max(1, T - 1)), max_size=6, unique=True)) if T > 1 else []
    singles = draw(st.lists(st.integers(1, max(1, T - 1)), max_size=4, unique=True)) if T > 1 else []
    points = sorted(set(cuts) | set(singles) | {p + 1 for p in singles if p + 1 < T})
    return [0] + points + [T]


def padding_mask(T: int, kept: list[float], left: bool) -> torch.Tensor:
    """``[len(kept), T]`` 0/1 mask: row ``b`` keeps ``round(kept[b] * T)`` tokens, at the end (left padding) or the
    start (right padding)."""
    mask = torch.zeros(len(kept), T, dtype=torch.long)
    for b, f in enumerate(kept):
        n = round(f * T)
        if n:
            mask[b, T - n:] = 1 if left else 0
            mask[b, :n] = 0 if left else 1
    return mask


def assert_states_equal(a: LoLAState, b: LoLAState, atol=1e-10, rtol=1e-10):
    assert torch.equal(a.seen, b.seen), (a.seen, b.seen)
    assert torch.equal(a.cache_pos, b.cache_pos), (a.cache_pos, b.cache_pos)
    for name in ('h', 's', 'cache_k', 'cache_v', 'cache_fk', 'window_k', 'window_v', 'window_fk'):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape and x.dtype == y.dtype, name
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, msg=lambda m: f'{name}: {m}')


def assert_canonical(state: LoLAState):
    """The cache layout every backend must produce (independent of ``check_state``): valid slots first, in strictly
    ascending position below ``seen``; empty slots hold position -1 and zeros."""
    pos = state.cache_pos
    valid = pos >= 0
    n = valid.sum(-1, keepdim=True)
    slot = torch.arange(pos.shape[-1])
    assert torch.equal(valid, slot < n), pos                        # valid prefix
    assert ((pos[..., 1:] > pos[..., :-1]) | ~valid[..., 1:]).all(), pos
    assert (pos[valid] < state.seen[:, None, None].expand_as(pos)[valid]).all(), (pos, state.seen)
    assert (pos[~valid] == -1).all(), pos
    for name in ('cache_k', 'cache_v', 'cache_fk'):
        assert (getattr(state, name)[~valid] == 0).all(), name


def assert_bounded_state(state: LoLAState, p: Problem):
    """A state after any stream: its byte count is the closed form of its fixed capacity, its cache holds exactly
    min(λ, η × boundaries passed) pairs (each boundary after the first complete chunk brings the η pairs of ``W``
    as candidates, and nothing leaves the cache without a better candidate), in the canonical layout."""
    N, H, Hkv, D = state.seen.shape[0], p.q.shape[2], p.k.shape[2], p.q.shape[3]
    Dv, F, eta, lam = p.v.shape[3], p.fq.shape[3], p.window_size, p.cache_size
    es, acc = p.q.element_size(), (8 if p.q.dtype == torch.float64 else 4)
    per_row = (H * F * (Dv + 1) * acc                        # h, s
               + H * lam * ((D + Dv + F) * es + 8)           # cache_k, cache_v, cache_fk, cache_pos
               + 2 * eta * (Hkv * (D + Dv) + H * F) * es     # window_k, window_v, window_fk
               + 8)                                          # seen
    assert state.nbytes() == N * per_row, (state.nbytes(), N * per_row)
    boundaries = (state.seen // eta - 1).clamp(min=0)
    expected = torch.minimum(boundaries * eta, torch.tensor(lam))
    assert torch.equal((state.cache_pos >= 0).sum(-1), expected[:, None].expand(N, H)), (state.cache_pos, state.seen)
    assert_canonical(state)
