"""Chunked prefill through a model (fla_lola.pipeline.prefill) and the layer's in-place state updates."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lola_problems import assert_states_equal, padding_mask
from test_models import tiny_model

from fla_lola.cache_names import OUTPUT_CACHE_FIELD
from fla_lola.pipeline.prefill import chunked_prefill


def layer_states(cache):
    return [cache[i]['recurrent_state'] for i in range(len(cache))]


@settings(max_examples=25)
@given(T=st.integers(1, 40), chunk=st.integers(1, 17), B=st.integers(1, 2), seed=st.integers(0, 2**16),
       kept=st.lists(st.floats(0.2, 1), min_size=2, max_size=2), left=st.booleans())
def test_chunked_prefill_equals_one_shot_prefill(T, chunk, B, seed, kept, left):
    """Any chunk size gives the one-shot call's last logits and every layer's state (float64), padded rows
    included, and the next decode step from either cache agrees."""
    model = tiny_model(seed=1)
    ids = torch.randint(3, 60, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = padding_mask(T, kept[:B], left)
    mask[:, -1 if left else 0] = 1  # every row keeps a real token
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=True)
    ref_cache = getattr(ref, OUTPUT_CACHE_FIELD)
    ref_states = [s.clone() for s in layer_states(ref_cache)]
    logits, cache = chunked_prefill(model, ids, chunk, attention_mask=mask)
    torch.testing.assert_close(logits, ref.logits[:, -1:], atol=1e-9, rtol=1e-9)
    for a, b in zip(layer_states(cache), ref_states):
        assert_states_equal(a, b, atol=1e-10, rtol=1e-9)
    nxt = logits.argmax(-1)
    full_mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
    with torch.no_grad():
        a = model(input_ids=nxt, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits
        b = model(input_ids=nxt, attention_mask=full_mask, past_key_values=ref_cache, use_cache=True).logits
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_chunked_prefill_rejects_bad_arguments():
    model = tiny_model()
    ids = torch.randint(3, 60, (1, 8))
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match='`chunk_size`'):
            chunked_prefill(model, ids, bad)
    with pytest.raises(ValueError, match='`input_ids`'):
        chunked_prefill(model, ids[0], 4)
    with pytest.raises(ValueError, match='`attention_mask`'):
        chunked_prefill(model, ids, 4, attention_mask=torch.ones(1, 7))


def test_layer_updates_the_cached_state_in_place_and_matches_a_fresh_cache():
    """Under no_grad the layer writes decode steps into the state object held by the cache (no copy per step);
    the outputs equal those of a cache rebuilt from scratch by one call over the whole sequence."""
    model = tiny_model(seed=2)
    ids = torch.randint(3, 60, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(input_ids=ids[:, :9], use_cache=True)
        cache = getattr(out, OUTPUT_CACHE_FIELD)
        held = layer_states(cache)
        for t in range(9, 13):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            assert all(a is b for a, b in zip(layer_states(cache), held))
        ref = model(input_ids=ids, use_cache=True)
    torch.testing.assert_close(out.logits[:, -1], ref.logits[:, -1], atol=1e-9, rtol=1e-9)
    for a, b in zip(held, layer_states(getattr(ref, OUTPUT_CACHE_FIELD))):
        assert_states_equal(a, b, atol=1e-10, rtol=1e-9)
