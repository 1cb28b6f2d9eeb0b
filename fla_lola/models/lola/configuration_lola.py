"""``LoLAConfig``: a LoLA transformer (every token mixer is LoLA unless ``attn`` makes it softmax)."""

from __future__ import annotations

from fla.models.configuration_utils import AttentionConfig, AttentionConfigBase, validate_loss_config
from transformers.configuration_utils import PreTrainedConfig

from fla_lola.layers.lola import DEFAULT_WINDOW_FACTOR_INIT, check_lola_settings
from fla_lola.layers.rope import check_rope_parameters


class LoLAConfig(AttentionConfigBase, PreTrainedConfig):
    r"""Configuration of :class:`LoLAModel` / :class:`LoLAForCausalLM` (``model_type = "lola"``).

    The defaults build a small model that runs on CPU without Triton (every ``fuse_*`` flag is off: fla's fused
    norms, SwiGLU and losses are Triton kernels; turn them on for GPU training).

    Args:
        hidden_size, num_hidden_layers, num_heads, num_kv_heads (GQA; default ``num_heads``), head_dim (default
            ``hidden_size // num_heads``), qkv_bias, hidden_ratio / intermediate_size, hidden_act ("swish"),
            vocab_size, max_position_embeddings, rope_theta, norm_eps, tie_word_embeddings, initializer_range:
            as in fla's and transformers' Llama-style models.
        rope_parameters (dict | None): a converted teacher's transformers ``rope_parameters`` (``rope_type``
            ``default``, ``linear``, ``llama3``, ``yarn``, and ``dynamic`` / ``longrope`` up to the original
            length); the layers build their tables with transformers' RoPE functions
            (:mod:`fla_lola.layers.rope`). transformers standardizes it (``rope_theta`` filled in).
        qk_norm (bool): Qwen3's per-head RMSNorm of queries and keys before RoPE (``q_norm``, ``k_norm``).
        window_size (int): η ≥ 1, LoLA's window and chunk size.
        cache_size (int): λ ≥ 0, the sparse cache capacity (0 gives LoLCATs' window + linear attention).
        feature_dim (int): ``f`` of the LoLCATs feature map (``F = 2f`` features).
        mix (str): ``"lola"`` (default) or ``"lolcats"``, the normalizer (see ``docs/SPEC.md``).
        selection (str): cache selection score: ``"sre"`` (default, self-recall error), ``"loo"``
            (leave-one-out self-recall error), or for ablations ``"recency"``, ``"value_norm"``, ``"random"``.
        attn_backend (str): the op backend: ``"auto"`` (default), ``"naive"``, ``"torch"``, ``"triton"``.
        window_factor_init (float): initial mixing logit, ``γ = sigmoid(logit)``; LoLCATs' ``-2.1972`` (γ ≈ 0.1).
        attn (dict | list[dict] | None): fla's attention spec: softmax ``Attention`` at the listed layers of a
            hybrid (``{"layers": [...], "num_heads": ...}``), or ``"type": "lola"`` entries with their own settings.
        fuse_norm, fuse_swiglu, fuse_cross_entropy, fuse_linear_cross_entropy, use_l2warp: fla's fused kernels,
            all off by default.

    Raises:
        ValueError: at construction, for ``window_size < 1``, ``cache_size < 0``, ``num_heads % num_kv_heads != 0``,
            an unknown ``mix`` / ``selection`` / ``attn_backend``, or an invalid ``attn`` spec.
    """

    model_type = 'lola'
    keys_to_ignore_at_inference = ['past_key_values']

    def __init__(
        self,
        hidden_size: int = 256,
        num_hidden_layers: int = 4,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        hidden_ratio: int | None = 4,
        intermediate_size: int | None = None,
        hidden_act: str = 'swish',
        window_size: int = 64,
        cache_size: int = 64,
        feature_dim: int = 64,
        mix: str = 'lola',
        selection: str = 'sre',
        attn_backend: str = 'auto',
        window_factor_init: float = DEFAULT_WINDOW_FACTOR_INIT,
        rope_theta: float = 10000.,
        rope_parameters: dict | None = None,
        qk_norm: bool = False,
        max_position_embeddings: int = 2048,
        norm_eps: float = 1e-6,
        attn: AttentionConfig = None,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        fuse_norm: bool = False,
        fuse_swiglu: bool = False,
        fuse_cross_entropy: bool = False,
        fuse_linear_cross_entropy: bool = False,
        use_l2warp: bool = False,
        vocab_size: int = 32000,
        **kwargs,
    ):
        if head_dim is None and num_heads and hidden_size % num_heads != 0:
            raise ValueError(f"LoLAConfig: `hidden_size` ({hidden_size}) must be divisible by `num_heads` "
                             f"({num_heads}) unless `head_dim` is given")
        check_lola_settings(
            num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, window_size=window_size,
            cache_size=cache_size, feature_dim=feature_dim, mix=mix, selection=selection, backend=attn_backend,
            context='LoLAConfig',
        )
        check_rope_parameters(rope_parameters, context='LoLAConfig')
        validate_loss_config(fuse_cross_entropy=fuse_cross_entropy, fuse_linear_cross_entropy=fuse_linear_cross_entropy)

        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.qkv_bias = qkv_bias
        self.hidden_ratio = hidden_ratio
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.window_size = window_size
        self.cache_size = cache_size
        self.feature_dim = feature_dim
        self.mix = mix
        self.selection = selection
        self.attn_backend = attn_backend
        self.window_factor_init = window_factor_init
        self.rope_theta = rope_theta
        self.rope_parameters = rope_parameters
        self.qk_norm = qk_norm
        self.max_position_embeddings = max_position_embeddings
        self.norm_eps = norm_eps
        self.attn = attn
        self.use_cache = use_cache
        self.initializer_range = initializer_range
        self.fuse_norm = fuse_norm
        self.fuse_swiglu = fuse_swiglu
        self.fuse_cross_entropy = fuse_cross_entropy
        self.fuse_linear_cross_entropy = fuse_linear_cross_entropy
        self.use_l2warp = use_l2warp
        self.vocab_size = vocab_size

        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_attention_heads(self) -> int:
        """transformers' name for ``num_heads`` (its RoPE validation reads it)."""
        return self.num_heads

    @property
    def stored_pairs(self) -> int:
        """Exact key/value pairs each LoLA layer keeps at most (per head): ``λ + 2η``."""
        return self.cache_size + 2 * self.window_size
