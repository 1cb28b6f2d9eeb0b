"""The generation cache under either of its names.

transformers < 5.24 hands a model its cache as ``past_key_values`` and reads it back from
``outputs.past_key_values``; transformers 5.24 renamed both to ``cache`` (the old names are deprecated aliases).
fla 0.6.0's ``FLAModel.forward`` reads only ``past_key_values``, so under 5.24 the cache fell into ``**kwargs`` and
every decode step restarted from an empty memory, silently. LoLA's model classes accept both names, answer under
the name the installed transformers uses, and refuse a cache they would otherwise drop.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

from transformers.cache_utils import Cache as HFCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast

#: The keyword the installed transformers' ``generate`` gives the cache under ("cache" from 5.24 on).
GENERATE_CACHE_NAME = ('cache' if 'cache' in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                       else 'past_key_values')
#: The field of ``ModelOutput`` classes that holds the cache in the installed transformers.
OUTPUT_CACHE_FIELD = ('cache' if 'cache' in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
                      else 'past_key_values')


def one_cache(past_key_values: Any = None, cache: Any = None, where: str = 'LoLA') -> Any:
    """The cache passed as ``past_key_values`` or ``cache``; ``ValueError`` if two different ones are given."""
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError(f"{where}: got two different caches, as `past_key_values` and as `cache`; pass one")
    return cache if cache is not None else past_key_values


def refuse_stray_cache(kwargs: dict, where: str, reads: str = '`past_key_values` or `cache`') -> None:
    """``ValueError`` if a cache object sits in ``kwargs``: it would be ignored and the sequence restart from empty."""
    for name, value in kwargs.items():
        if isinstance(value, HFCache):
            raise ValueError(
                f"{where} received a cache as `{name}=`, but reads its cache only from {reads}: its state would be "
                f"ignored and decoding would restart from an empty memory. Pass the cache as {reads}. (transformers "
                f">= 5.24 passes it as `cache=`; fla's own model classes read only `past_key_values`.)"
            )


def output_kwargs(cache: Any) -> dict[str, Any]:
    """``{field: cache}`` for building a ``ModelOutput`` without a deprecation warning on any transformers."""
    return {OUTPUT_CACHE_FIELD: cache}


__all__ = ['GENERATE_CACHE_NAME', 'OUTPUT_CACHE_FIELD', 'one_cache', 'refuse_stray_cache', 'output_kwargs']
