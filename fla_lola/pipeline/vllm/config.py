"""Engine settings of a model whose every layer keeps a fixed-size state (vLLM's ``MODELS_CONFIG_MAP`` hook)."""

from __future__ import annotations

from vllm.logger import init_logger
from vllm.model_executor.models.config import MambaModelConfig

logger = init_logger(__name__)


class LoLAModelConfig(MambaModelConfig):
    """As vLLM's Mamba models: one state block per sequence (``mamba_block_size = max_model_len``). Prefix caching
    is turned off: it would need the state at every block boundary (vLLM's ``align`` mode), not supported yet."""

    @classmethod
    def verify_and_update_config(cls, vllm_config) -> None:
        cache_config = vllm_config.cache_config
        if cache_config.enable_prefix_caching:
            logger.info("LoLA: prefix caching is not supported yet; turned off")
            cache_config.enable_prefix_caching = False
        super().verify_and_update_config(vllm_config)
