"""LoLA in the fla / transformers registries (installed as ``fla_lola.registry``; ``import fla_lola`` runs it).

:func:`register` is idempotent and does two things:

1. ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` learn ``model_type = "lola"``, so
   ``save_pretrained`` / ``from_pretrained`` round-trip :class:`~fla_lola.LoLAForCausalLM`.
2. **The one hook**: fla 0.6.0 builds the softmax layers of its hybrid models with
   ``fla.models.modeling_utils.get_attention(config, layer_idx)``, which every model module imports by name.
   :func:`register` replaces that function, in ``fla.models.modeling_utils`` and in every loaded module holding
   a reference to it, by :func:`get_attention`, which builds a :class:`~fla_lola.LoLAAttention` when the layer's
   ``attn`` spec says ``"type": "lola"`` and otherwise calls fla's original function, unchanged. So any fla model
   config selects LoLA for chosen layers::

       attn={"layers": [1], "num_heads": 4, "type": "lola", "window_size": 64, "cache_size": 64}

   LoLA spec keys (besides fla's ``layers``, ``num_heads``, ``num_kv_heads``, ``qkv_bias``, ``rope_theta``):
   ``window_size`` (η, default 64), ``cache_size`` (λ, default 64), ``feature_dim`` (64), ``head_dim``
   (``hidden_size // num_heads``), ``mix`` ("lola"), ``selection`` ("sre"), ``backend`` ("auto"),
   ``window_factor_init`` (-2.1972). fla's ``parse_attention_config`` keeps unknown keys, so the spec survives
   ``save_pretrained`` / ``from_pretrained`` as written; LoLA's keys are validated (``ValueError``) when the
   model is built.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import fla
import transformers
from fla.models import modeling_utils
from fla.models.configuration_utils import get_attention_spec
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from fla_lola.cache_names import GENERATE_CACHE_NAME
from fla_lola.layers.lola import DEFAULT_WINDOW_FACTOR_INIT, LoLAAttention, check_lola_settings
from fla_lola.models.lola import LoLAConfig, LoLAForCausalLM, LoLAModel

LOLA_TYPE = 'lola'
_HOOK_FLAG = '__fla_lola_hook__'


def _original_get_attention() -> Callable:
    current = modeling_utils.get_attention
    return getattr(current, '__wrapped__', current) if getattr(current, _HOOK_FLAG, False) else current


def build_lola_from_spec(config, spec: dict, layer_idx: int) -> LoLAAttention:
    """The :class:`LoLAAttention` an fla ``attn`` spec of ``"type": "lola"`` asks for at ``layer_idx``."""
    settings = dict(
        num_heads=spec['num_heads'],
        num_kv_heads=spec.get('num_kv_heads') or spec['num_heads'],
        head_dim=spec.get('head_dim'),
        window_size=spec['window_size'] if spec.get('window_size') is not None else 64,
        cache_size=spec.get('cache_size', 64),
        feature_dim=spec.get('feature_dim', 64),
        mix=spec.get('mix', 'lola'),
        selection=spec.get('selection', 'sre'),
        backend=spec.get('backend', 'auto'),
    )
    check_lola_settings(**settings, context=f"attn spec of type 'lola' at layer {layer_idx}")
    if GENERATE_CACHE_NAME != 'past_key_values':
        warnings.warn(
            f"transformers {transformers.__version__} passes the generation cache as `cache=`, which fla's own model "
            f"classes (fla {fla.__version__}) do not read: `generate` on {type(config).__name__} would restart every "
            "decode step from an empty state. Forward passes and decoding with `past_key_values=` passed by hand are "
            "exact; for `generate` use transformers < 5.24 or LoLAForCausalLM.", UserWarning, stacklevel=2,
        )
    return LoLAAttention(
        hidden_size=config.hidden_size,
        qkv_bias=spec.get('qkv_bias', False),
        rope_theta=spec.get('rope_theta', 10000.),
        max_position_embeddings=getattr(config, 'max_position_embeddings', None),
        window_factor_init=spec.get('window_factor_init', DEFAULT_WINDOW_FACTOR_INIT),
        layer_idx=layer_idx,
        **settings,
    )


def get_attention(config, layer_idx: int):
    """fla's ``get_attention`` plus one case: an ``attn`` spec with ``"type": "lola"`` builds ``LoLAAttention``."""
    spec = get_attention_spec(getattr(config, 'attn', None), layer_idx=layer_idx)
    if spec is not None and spec.get('type') == LOLA_TYPE:
        return build_lola_from_spec(config, spec, layer_idx)
    return get_attention.__wrapped__(config=config, layer_idx=layer_idx)


def install_attention_hook() -> None:
    """Point every reference to fla's ``get_attention`` at :func:`get_attention` (idempotent)."""
    original = _original_get_attention()
    get_attention.__wrapped__ = original
    setattr(get_attention, _HOOK_FLAG, True)
    for module in list(sys.modules.values()):
        namespace = getattr(module, '__dict__', None)
        if isinstance(namespace, dict) and namespace.get('get_attention') is original:
            namespace['get_attention'] = get_attention
    modeling_utils.get_attention = get_attention


def register() -> None:
    """Register ``"lola"`` with the transformers Auto classes and install the fla ``attn`` hook. Idempotent."""
    AutoConfig.register(LoLAConfig.model_type, LoLAConfig, exist_ok=True)
    AutoModel.register(LoLAConfig, LoLAModel, exist_ok=True)
    AutoModelForCausalLM.register(LoLAConfig, LoLAForCausalLM, exist_ok=True)
    install_attention_hook()


__all__ = ['get_attention', 'build_lola_from_spec', 'install_attention_hook', 'register']
