"""Chunked prefill: feed a long prompt through a model's cache in pieces, bounding the activations' memory.

A LoLA model's cache is a fixed-size state, so a prompt fed ``chunk_size`` tokens at a time holds activations
for ``chunk_size`` tokens only, never for the whole prompt, and by streaming invariance returns exactly what one
call returns. The helper works for any causal LM whose forward takes ``past_key_values``, ``use_cache`` and
``logits_to_keep`` (a transformers model with a ``DynamicCache`` too, whose cache still grows with the prompt).
"""

from __future__ import annotations

import torch

from fla_lola.cache_names import OUTPUT_CACHE_FIELD


@torch.no_grad()
def chunked_prefill(model, input_ids: torch.LongTensor, chunk_size: int, attention_mask: torch.Tensor | None = None,
                    past_key_values=None, progress: bool = False):
    """Run ``model`` over ``input_ids`` ``[B, T]`` in pieces of ``chunk_size`` tokens, carrying the cache.

    Args:
        model: a causal LM (e.g. :class:`fla_lola.LoLAForCausalLM`).
        input_ids: ``[B, T]`` prompt tokens.
        chunk_size: tokens per forward call, ``>= 1``; ``chunk_size >= T`` is one call.
        attention_mask: optional ``[B, T]`` 0/1 padding mask of the prompt; each call gets the columns up to the
            end of its piece, as ``generate`` passes them.
        past_key_values: a cache to continue from (``None``: start empty).
        progress: show a tqdm bar over the pieces.

    Returns:
        ``(logits, cache)``: the logits of the prompt's last position ``[B, 1, vocab]`` (what the next token is
        drawn from) and the cache after the whole prompt, ready for decoding.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size`: must be an int >= 1, got {chunk_size!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError("`input_ids`: expected a [batch_size, seq_len] tensor with seq_len >= 1, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                       or attention_mask.shape != input_ids.shape):
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else attention_mask
        raise ValueError(f"`attention_mask`: expected the shape of `input_ids` {tuple(input_ids.shape)}, got {got}")
    T = input_ids.shape[1]
    starts = range(0, T, chunk_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc='prefill', unit='chunk')
    cache, logits = past_key_values, None
    for start in starts:
        end = min(T, start + chunk_size)
        out = model(input_ids=input_ids[:, start:end],
                    attention_mask=None if attention_mask is None else attention_mask[:, :end],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = getattr(out, OUTPUT_CACHE_FIELD, None)
        if cache is None:
            cache = out.past_key_values
        logits = out.logits[:, -1:]
    return logits, cache


__all__ = ['chunked_prefill']
