"""Bad input raises a ValueError that names the argument, and a failed call changes nothing."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch
from lola_problems import assert_states_equal, make_problem

from fla_lola import LoLAState, lola_attention, naive_lola_attention

P = make_problem(0, B=2, T=6, H=2, Hkv=1, D=4, Dv=3, F=3, window_size=2, cache_size=2, dtype=torch.float32)


def base():
    return dict(q=P.q.clone(), k=P.k.clone(), v=P.v.clone(), fq=P.fq.clone(), fk=P.fk.clone(), gate=P.gate.clone(),
                window_size=2, cache_size=2)


def with_value(name, index, value):
    def edit(a):
        a[name][index] = value
    return edit


def setter(name, value):
    def edit(a):
        a[name] = value(a) if callable(value) else value
    return edit


CASES = [
    ('q', setter('q', lambda a: a['q'][0])),                                  # wrong rank
    ('k', setter('k', lambda a: a['k'][:, :5])),                              # wrong T
    ('k', setter('k', lambda a: torch.cat([a['k']] * 3, 2))),                 # H % Hkv != 0
    ('v', setter('v', lambda a: a['v'][:, :, :, :, None].expand(-1, -1, 2, -1, -1).flatten(2, 3))),
    ('fk', setter('fk', lambda a: a['fk'][..., :2])),                         # features differ from fq
    ('fq', setter('fq', lambda a: a['fq'].double())),                         # dtype mismatch
    ('q', setter('q', lambda a: a['q'].long())),                              # not floating
    ('gate', setter('gate', lambda a: a['gate'][:1])),                        # wrong shape
    ('gate', with_value('gate', 0, 1.0)),                                     # γ not in (0, 1)
    ('gate', with_value('gate', 1, 0.0)),
    ('window_size', setter('window_size', 0)),                                # η < 1
    ('cache_size', setter('cache_size', -1)),                                 # λ < 0
    ('window_size', setter('window_size', 2.0)),
    ('q', with_value('q', (0, 1, 0, 0), float('nan'))),                       # NaN / Inf
    ('k', with_value('k', (1, 2, 0, 3), float('inf'))),
    ('v', with_value('v', (0, 0, 0, 0), float('-inf'))),
    ('fk', with_value('fk', (0, 0, 0, 0), float('nan'))),
    ('fq', with_value('fq', (0, 0, 0, 0), -0.1)),                             # negative features
    ('mix', setter('mix', 'softmax')),
    ('selection', setter('selection', 'attention')),
    ('scale', setter('scale', -1.0)),
    ('attention_mask', setter('attention_mask', torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 2, 1, 0, 0]]))),  # not 0/1
    ('attention_mask', setter('attention_mask', torch.tensor([[1, 0, 1, 1, 1, 1], [1] * 6]))),   # a hole
    ('attention_mask', setter('attention_mask', torch.ones(2, 5))),
    ('cu_seqlens', setter('cu_seqlens', torch.tensor([0, 3, 6]))),           # B != 1
    ('initial_state', setter('initial_state', LoLAState.empty(2, 2, 1, 4, 3, 3, 3, 2))),    # other η
    ('initial_state', setter('initial_state', LoLAState.empty(3, 2, 1, 4, 3, 3, 2, 2))),    # other batch
    ('initial_state', setter('initial_state', LoLAState.empty(2, 2, 1, 4, 3, 3, 2, 2, dtype=torch.float64))),
    ('backend', setter('backend', 'cuda')),
]


@pytest.mark.parametrize('fn', ['lola_attention', 'naive_lola_attention'])
@pytest.mark.parametrize('name,edit', CASES, ids=[f'{i}-{c[0]}' for i, c in enumerate(CASES)])
def test_bad_input_raises_value_error_naming_it_and_mutates_nothing(fn, name, edit):
    if fn == 'naive_lola_attention' and name == 'backend':
        pytest.skip('the naive reference has no backend argument')
    _, state = lola_attention(*P.tensors, window_size=2, cache_size=2, output_final_state=True)
    args = base()
    args['initial_state'] = state
    edit(args)
    snapshot = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    state_before = args['initial_state'].clone()
    f = lola_attention if fn == 'lola_attention' else naive_lola_attention
    positional = [args.pop(k) for k in ('q', 'k', 'v', 'fq', 'fk', 'gate')]
    with pytest.raises(ValueError, match=f'`{name}`'):
        f(*positional, output_final_state=True, **args)
    for k, v in zip(('q', 'k', 'v', 'fq', 'fk', 'gate'), positional):
        assert torch.equal(v.nan_to_num(), snapshot[k].nan_to_num()), k
    assert_states_equal(args['initial_state'], state_before, atol=0, rtol=0)


def test_the_cu_seqlens_state_needs_one_row_per_sequence():
    x = [t[:1] for t in P.tensors[:5]] + [P.gate]
    with pytest.raises(ValueError, match='`initial_state`'):
        lola_attention(*x, window_size=2, cache_size=2, cu_seqlens=torch.tensor([0, 2, 6]),
                       initial_state=LoLAState.empty(1, 2, 1, 4, 3, 3, 2, 2))


def broken(edit):
    """A state of P after 6 tokens (λ = 2 full, η = 2) with one edit that breaks its canonical layout."""
    _, state = lola_attention(*P.tensors, **P.options, output_final_state=True)
    state = state.clone()
    edit(state)
    return state


LAYOUT_CASES = [
    ('cache_pos', lambda s: s.cache_pos.copy_(s.cache_pos.flip(-1))),                  # descending positions
    ('cache_pos', lambda s: s.cache_pos[..., 0].fill_(-1)),                            # empty slot before a valid one
    ('cache_pos', lambda s: s.cache_pos[..., 1].copy_(s.cache_pos[..., 0])),           # a position twice
    ('cache_pos', lambda s: s.cache_pos[0, 0, 1].fill_(6)),                            # a position not yet seen
    ('cache_pos', lambda s: s.cache_pos[1, 1, 1].fill_(-2)),
    ('cache_k', lambda s: (s.cache_pos[0, 1, 1].fill_(-1), s.cache_v[0, 1, 1].zero_(), s.cache_fk[0, 1, 1].zero_())),
    ('cache_v', lambda s: (s.cache_pos[1, 0, 1].fill_(-1), s.cache_k[1, 0, 1].zero_(), s.cache_fk[1, 0, 1].zero_())),
    ('cache_fk', lambda s: (s.cache_pos[1, 0, 1].fill_(-1), s.cache_k[1, 0, 1].zero_(), s.cache_v[1, 0, 1].zero_())),
    ('seen', lambda s: s.seen[0].fill_(-1)),
    ('window_k', lambda s: s.window_k[0, 0, -1].fill_(1.)),                           # P is empty after 6 tokens
    ('window_v', lambda s: s.window_v[-1, 0, -2].fill_(1.)),
    ('window_fk', lambda s: s.window_fk[0, -1, -1].fill_(1.)),
]


@pytest.mark.parametrize('backend', ['naive', 'torch'])
@pytest.mark.parametrize('field, edit', LAYOUT_CASES)
def test_a_state_off_the_canonical_layout_is_refused_naming_the_field(backend, field, edit):
    """Every backend relies on the canonical cache layout (valid slots first, ascending positions, empty slots -1 and
    zero), whichever backend made the state: a state that breaks it is refused before any work, unchanged."""
    state = broken(edit)
    before = state.clone()
    with pytest.raises(ValueError, match=rf'initial_state.*field {field}\b'):
        lola_attention(*P.tensors, **P.options, initial_state=state, backend=backend)
    assert_states_equal(state, before, atol=0, rtol=0)


def test_validation_rereads_only_a_state_that_changed(monkeypatch):
    """A state a backend returned skips the layout check of the next validated call (that check reads the whole cache,
    several times a decode step's work). Any write to a field, in place or through a view, or a replaced field brings
    the full check back, and so do a state assembled by hand from copies, one made in inference mode, and the result
    of an unvalidated call on a state nobody vouched for."""
    import fla_lola.ops.utils as utils

    calls = []
    check = utils.check_canonical_cache
    monkeypatch.setattr(utils, 'check_canonical_cache', lambda state: (calls.append(state), check(state)))
    step = [t[:, :1] for t in P.tensors[:5]] + [P.gate]

    def layout_checks(state: LoLAState) -> int:
        calls.clear()
        lola_attention(*step, **P.options, initial_state=state)
        return len(calls)

    _, state = lola_attention(*P.tensors, **P.options, output_final_state=True)
    _, after = lola_attention(*step, **P.options, initial_state=state, output_final_state=True)
    _, after_inplace = lola_attention(*step, **P.options, initial_state=state.clone(), output_final_state=True,
                                      inplace_state=True)
    for known in (state, after, after_inplace, state.clone(), state.index_select(torch.tensor([1, 0])),
                  LoLAState.empty(2, 2, 1, 4, 3, 3, 2, 2)):
        assert layout_checks(known) == 0
    for f in fields(state):
        touched = state.clone()
        getattr(touched, f.name)[0].add_(0)  # a write through a view, even one that changes no value
        assert layout_checks(touched) == 1, f.name
    replaced = state.clone()
    replaced.h = replaced.h.clone()
    assert layout_checks(replaced) == 1
    # assembled by hand: from the very tensors, untouched, it is the state that was vouched for; from copies, not
    assert layout_checks(LoLAState(**{f.name: getattr(state, f.name) for f in fields(state)})) == 0
    assert layout_checks(LoLAState(**{f.name: getattr(state, f.name).clone() for f in fields(state)})) == 1
    with torch.inference_mode():
        _, inference = lola_attention(*P.tensors, **P.options, output_final_state=True)
    assert layout_checks(inference) == 1
    unknown = state.clone()
    unknown.seen.add_(0)
    _, unvouched = lola_attention(*step, **P.options, initial_state=unknown, output_final_state=True, validate=False)
    assert layout_checks(unvouched) == 1
