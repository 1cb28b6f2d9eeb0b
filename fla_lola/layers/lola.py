"""``LoLAAttention``: the LoLA token mixer as an fla layer."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from fla.layers.utils import get_layer_cache, update_layer_cache
from fla.modules import RotaryEmbedding
from fla.modules.rotary.ops import rotate_half
from transformers import initialization as init

from fla_lola.cache_names import refuse_stray_cache
from fla_lola.layers.feature_map import CPU_BLOCK_ELEMENTS, LoLCATsFeatureMap
from fla_lola.layers.rope import ScaledRotaryEmbedding, check_rope_parameters, rope_init, rope_type_of
from fla_lola.ops import LoLAState, lola_attention
from fla_lola.ops.utils import BACKENDS, MIXES, SELECTIONS

if TYPE_CHECKING:
    from fla.models.cache_utils import Cache

# LoLCATs initializes its window factors (our mixing logits) to -2.1972, i.e. γ = sigmoid(-2.1972) ≈ 0.1.
DEFAULT_WINDOW_FACTOR_INIT = -2.1972


def check_lola_settings(
    *,
    num_heads: int,
    num_kv_heads: int | None = None,
    window_size: int,
    cache_size: int,
    feature_dim: int,
    mix: str,
    selection: str,
    backend: str,
    head_dim: int | None = None,
    context: str = 'LoLA',
) -> None:
    """Raise ``ValueError`` naming the setting and its value if a LoLA layer cannot be built from them."""

    def is_int(x):
        return isinstance(x, int) and not isinstance(x, bool)

    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if not is_int(num_heads) or num_heads < 1:
        raise ValueError(f"{context}: `num_heads` must be a positive integer, got {num_heads!r}")
    if not is_int(num_kv_heads) or num_kv_heads < 1:
        raise ValueError(f"{context}: `num_kv_heads` must be a positive integer, got {num_kv_heads!r}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"{context}: `num_heads` ({num_heads}) must be divisible by `num_kv_heads` ({num_kv_heads})")
    if head_dim is not None and (not is_int(head_dim) or head_dim < 1):
        raise ValueError(f"{context}: `head_dim` must be a positive integer, got {head_dim!r}")
    if not is_int(window_size) or window_size < 1:
        raise ValueError(f"{context}: `window_size` (η) must be an integer >= 1, got {window_size!r}")
    if not is_int(cache_size) or cache_size < 0:
        raise ValueError(f"{context}: `cache_size` (λ) must be an integer >= 0, got {cache_size!r}")
    if not is_int(feature_dim) or feature_dim < 1:
        raise ValueError(f"{context}: `feature_dim` must be a positive integer, got {feature_dim!r}")
    if mix not in MIXES:
        raise ValueError(f"{context}: `mix` must be one of {MIXES}, got {mix!r}")
    if selection not in SELECTIONS:
        raise ValueError(f"{context}: `selection` must be one of {SELECTIONS}, got {selection!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{context}: `backend` must be one of {BACKENDS}, got {backend!r}")


def refuse_continuation_without_state(q_len: int, attention_mask: torch.Tensor | None, kwargs: dict) -> None:
    """``ValueError`` if the call says that tokens came before it while the layer holds no state for them.

    Signals: an ``attention_mask`` longer than the ``q_len`` new tokens with a real token in its earlier columns
    (what ``generate`` passes at every decode step), a positive ``cache_position`` or ``seqlen_offset``, or
    ``position_ids`` whose first real token of a row is past 0. Continuing would restart from an empty memory and
    return wrong tokens without any error, so it is refused. Runs only when there is no state (no decode-step cost).
    """

    def refuse(name, first):
        raise ValueError(
            f"LoLAAttention: `{name}` says this call continues a sequence ({first} token(s) came before), but the "
            "layer has no state for them: pass the cache that holds the earlier tokens as `past_key_values` (filled "
            "with `use_cache=True`). Without it decoding would restart from an empty memory."
        )

    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[-1] > q_len:
        earlier = int(attention_mask[:, :-q_len].sum(-1).max())
        if earlier > 0:
            refuse('attention_mask', earlier)
    for name in ('cache_position', 'seqlen_offset'):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.numel():
            value = int(value.min())
        if isinstance(value, int) and value > 0:
            refuse(name, value)
    position_ids = kwargs.get('position_ids')
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        position_ids = position_ids.reshape(-1, position_ids.shape[-1])
        real = torch.ones_like(position_ids, dtype=torch.bool)
        if attention_mask is not None and attention_mask.shape[-1] >= q_len:
            real = attention_mask[:, -q_len:].bool().reshape(position_ids.shape)  # padding carries any position
        first = position_ids.masked_fill(~real, torch.iinfo(position_ids.dtype).max).min(-1).values
        first = first[real.any(-1)]
        if first.numel() and int(first.max()) > 0:
            refuse('position_ids', int(first.max()))


class LoLAAttention(nn.Module):
    r"""LoLA attention (McDermott et al., 2025): sliding window + sparse cache + linear memory.

    Projects ``hidden_states`` to queries, keys and values (GQA: ``num_kv_heads`` key/value heads), rotates
    queries and keys with fla's :class:`~fla.modules.RotaryEmbedding`, maps them through the LoLCATs feature maps
    (``feature_map_q``, ``feature_map_k``; the key map runs per query head on the repeated keys), and calls
    :func:`fla_lola.lola_attention` with the mixing weights ``γ = sigmoid(window_factors)``.

    Parameters (state-dict names, for checkpoint conversion):
        q_proj, k_proj, v_proj, o_proj: the usual projections (``q/k/v`` biased iff ``qkv_bias``).
        feature_map_q.weight, feature_map_k.weight: ``[num_heads, head_dim, feature_dim]``, LoLCATs'
            ``feature_map_q.mlp.layer`` / ``feature_map_k.mlp.layer``.
        window_factors: ``[num_heads]`` mixing logits, LoLCATs' ``window_factors`` ``[1, H, 1, 1]`` flattened.

    Recurrent state: a :class:`fla_lola.LoLAState` stored as the layer's ``recurrent_state`` in fla's ``Cache``
    (every tensor batch-first, so beam search reorders it). Its ``seen`` counter (real tokens per row) gives the
    rotary position of the next token, so a left-padded row gets the same positions, outputs and state as the
    row alone: positions count from each row's first real token. Without autograd the layer updates that state
    in place (``lola_attention(..., inplace_state=True)``: checked first, so a call that raises changes nothing);
    to branch a generation, ``copy.deepcopy`` the cache.

    Padding: ``attention_mask`` ``[B, T_total]`` (1 = token, 0 = padding; left or right padding) is passed to the
    op, which keeps padding out of every memory and returns zeros there. Packed sequences: ``cu_seqlens``
    (``B == 1``), each sequence with its own state row.
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        window_size: int = 64,
        cache_size: int = 64,
        feature_dim: int = 64,
        mix: str = 'lola',
        selection: str = 'sre',
        rope_theta: float = 10000.,
        max_position_embeddings: int | None = None,
        rope_parameters: dict | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        window_factor_init: float = DEFAULT_WINDOW_FACTOR_INIT,
        backend: str = 'auto',
        layer_idx: int | None = None,
        **kwargs,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(f"LoLAAttention: `hidden_size` ({hidden_size}) must be divisible by `num_heads` "
                                 f"({num_heads}) unless `head_dim` is given")
            head_dim = hidden_size // num_heads
        check_lola_settings(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                            window_size=window_size, cache_size=cache_size, feature_dim=feature_dim, mix=mix,
                            selection=selection, backend=backend, context='LoLAAttention')
        if head_dim % 2 != 0:
            raise ValueError(f"LoLAAttention: `head_dim` must be even for rotary embeddings, got {head_dim}")
        check_rope_parameters(rope_parameters, context='LoLAAttention')

        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.num_kv_groups = num_heads // num_kv_heads
        self.head_dim = head_dim
        self.qkv_bias = qkv_bias
        self.window_size = window_size
        self.cache_size = cache_size
        self.feature_dim = feature_dim
        self.mix = mix
        self.selection = selection
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rope_parameters = rope_parameters
        self.qk_norm = qk_norm
        self.window_factor_init = window_factor_init
        self.backend = backend
        self.layer_idx = layer_idx

        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        if rope_type_of(rope_parameters) == 'default':  # plain RoPE: fla's own tables (transformers' equal them)
            self.rotary = RotaryEmbedding(dim=head_dim, base=(rope_parameters or {}).get('rope_theta', rope_theta))
        else:  # a converted teacher's scaled RoPE: transformers' tables, served through fla's rotary module
            self.rotary = ScaledRotaryEmbedding(*rope_init(rope_parameters, head_dim, rope_theta,
                                                           max_position_embeddings))
        if qk_norm:  # Qwen3: RMSNorm over each head of q and k, before RoPE
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps)
        self.feature_map_q = LoLCATsFeatureMap(num_heads, head_dim, feature_dim)
        self.feature_map_k = LoLCATsFeatureMap(num_heads, head_dim, feature_dim)
        self.window_factors = nn.Parameter(torch.full((num_heads,), float(window_factor_init)))

    def reset_parameters(self) -> None:
        """Reset the mixing logits (fla's ``_init_weights`` calls this; projections are initialized as Linear)."""
        with torch.no_grad():   # guarded: leaves logits that `from_pretrained` loaded untouched
            init.constant_(self.window_factors, float(self.window_factor_init))

    @property
    def gate(self) -> torch.Tensor:
        """``γ = sigmoid(window_factors)``, ``[num_heads]``, in float32 at least (bf16 logits never round to 1), in
        float64 for a float64 layer."""
        w = self.window_factors
        return torch.sigmoid(w.to(torch.promote_types(w.dtype, torch.float32)))

    def empty_state(self, batch_size: int, dtype: torch.dtype | None = None, device=None) -> LoLAState:
        """A state that has seen no token, for ``batch_size`` rows."""
        weight = self.q_proj.weight
        return LoLAState.empty(
            batch_size, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim, 2 * self.feature_dim,
            self.window_size, self.cache_size, dtype=dtype or weight.dtype, device=device or weight.device,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = False,
        output_attentions: bool | None = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None, Cache | None]:
        """Args as in fla's layers; ``attention_mask`` may cover past tokens too (its last ``T`` columns are used).

        Returns ``(o, None, past_key_values)`` with ``o`` ``[B, T, hidden_size]``.
        """
        batch_size, q_len, _ = hidden_states.shape
        refuse_stray_cache(kwargs, where='LoLAAttention', reads='`past_key_values`')
        last_state = get_layer_cache(self, past_key_values)
        state = last_state['recurrent_state'] if last_state is not None else None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("LoLAAttention: `attention_mask` must be a [batch_size, seq_len] 0/1 padding mask, "
                             f"got shape {tuple(attention_mask.shape)}")
        if state is None:
            refuse_continuation_without_state(q_len, attention_mask, kwargs)
        if attention_mask is not None:
            attention_mask = attention_mask[:, -q_len:]
            if q_len > 1 and bool(attention_mask.all()):   # (a decode step keeps its mask: no host sync)
                attention_mask = None
        cu_seqlens = kwargs.get('cu_seqlens')
        if cu_seqlens is not None and attention_mask is not None:
            raise ValueError("LoLAAttention: pass either `cu_seqlens` or a padding `attention_mask`, not both")

        q = self.q_proj(hidden_states).view(batch_size, q_len, self.num_heads, self.head_dim)
        k = self.k_proj(hidden_states).view(batch_size, q_len, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden_states).view(batch_size, q_len, self.num_kv_heads, self.head_dim)

        # A decode step continuing a sequence is the steady state: it must not wait on the device (no `.item()`,
        # no value-dependent branch). Its inputs were validated with the sequence's first call; the rotary table
        # is sized from the host-side token count of the cache instead of the positions' maximum.
        steady = state is not None and q_len == 1 and cu_seqlens is None
        max_seqlen = past_key_values.get_seq_length(self.layer_idx) + q_len if steady else None
        q, k = self.apply_rotary(q, k, state=state, attention_mask=attention_mask, cu_seqlens=cu_seqlens,
                                 max_seqlen=max_seqlen)

        k_rep = k if self.num_kv_groups == 1 else k.repeat_interleave(self.num_kv_groups, dim=2)
        fq = self.feature_map_q(q)
        fk = self.feature_map_k(k_rep)

        keep_state = bool(use_cache) and past_key_values is not None
        o, final_state = lola_attention(
            q, k, v, fq, fk, self.gate,
            window_size=self.window_size,
            cache_size=self.cache_size,
            mix=self.mix,
            selection=self.selection,
            attention_mask=attention_mask,
            cu_seqlens=cu_seqlens,
            initial_state=state,
            output_final_state=keep_state,
            backend=self.backend,
            validate=not steady,
            # the state is the cache's own: update it in place (checked first, so a failed call changes nothing)
            inplace_state=keep_state and state is not None and not torch.is_grad_enabled(),
        )
        if keep_state:
            update_layer_cache(self, past_key_values, recurrent_state=final_state, offset=q_len)

        o = self.o_proj(o.reshape(batch_size, q_len, self.num_heads * self.head_dim))
        return o, None, past_key_values

    # -- rotary embeddings ----------------------------------------------------------------------------
    def positions(
        self,
        batch_size: int,
        q_len: int,
        device: torch.device,
        state: LoLAState | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """``[B, T]`` int64 rotary positions: the count of real tokens before each one in its own sequence.

        A row's first real token gets position ``state.seen`` (0 without a state), whatever padding precedes it.
        Padding gets the position of the next real token minus one (clamped at 0); the op ignores it anyway.
        """
        if cu_seqlens is not None:
            cu = cu_seqlens.to(device=device, dtype=torch.long)
            t = torch.arange(q_len, device=device)
            seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 2)
            pos = t - cu[seq]
            if state is not None:
                pos = pos + state.seen.to(device)[seq]
            return pos[None]
        if attention_mask is None:
            pos = torch.arange(q_len, device=device)[None].expand(batch_size, -1)
        else:
            pos = attention_mask.to(device=device, dtype=torch.long).cumsum(-1) - 1
        if state is not None:
            pos = pos + state.seen.to(device)[:, None]
        return pos.clamp(min=0)

    def apply_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        state: LoLAState | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.LongTensor | None = None,
        max_seqlen: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` ``[B, T, H, D]`` and ``k`` ``[B, T, Hkv, D]`` at :meth:`positions`.

        With ``qk_norm`` (Qwen3) each head of ``q`` and ``k`` is first RMS-normalized (``q_norm``, ``k_norm``).
        On accelerators this calls fla's Triton rotary kernel with per-row offsets (``seen`` minus the row's
        leading padding); on CPU it applies the same cos/sin tables (``self.rotary``'s: a converted teacher's
        scaled RoPE included) with fla's reference formula, in float32 or ``q``'s dtype if wider.

        ``max_seqlen``: a host-side bound on every row's ``T + offset`` (all positions are below it); without it
        the bound is read from the positions on the device, which waits for them.
        """
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        batch_size, q_len = q.shape[:2]
        pos = self.positions(batch_size, q_len, q.device, state, attention_mask, cu_seqlens)
        hinted = max_seqlen is not None
        if not hinted:
            max_seqlen = int(pos.max()) + 1 if pos.numel() else 1
        if self.max_position_embeddings is not None:
            max_seqlen = max(max_seqlen, self.max_position_embeddings)
        if q.device.type != 'cpu':
            if cu_seqlens is not None:
                offsets = state.seen.to(q.device) if state is not None else 0
            elif attention_mask is not None:
                # first real token of each row sits at index `lead`; its position is `seen`
                lead = (attention_mask.cumsum(-1) == 0).sum(-1)
                offsets = pos.gather(1, lead.clamp(max=q_len - 1)[:, None]).squeeze(1) - lead
            else:
                offsets = state.seen.to(q.device) if state is not None else 0
            # fla checks `T + offset <= table length` for every row, padded tail included
            if not hinted:
                max_offset = int(offsets.max()) if isinstance(offsets, torch.Tensor) and offsets.numel() else 0
                max_seqlen = max(max_seqlen, q_len + max_offset)
            return self.rotary(q, k, seqlen_offset=offsets, max_seqlen=max_seqlen, cu_seqlens=cu_seqlens)

        self.rotary._update_cos_sin_cache(max_seqlen, device=q.device, dtype=q.dtype)
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos = self.rotary._cos_cached[pos].to(dtype)   # [B, T, D/2]
        sin = self.rotary._sin_cached[pos].to(dtype)
        cos = torch.cat([cos, cos], dim=-1)[:, :, None]
        sin = torch.cat([sin, sin], dim=-1)[:, :, None]

        def rotate(x, cos, sin):
            xf = x.to(dtype)
            return (xf * cos + rotate_half(xf) * sin).to(x.dtype)

        def rotate_in_blocks(x):
            # without autograd, blocks of tokens written into one output: the same values, with block-sized
            # temporaries instead of five full-size ones (see LoLCATsFeatureMap._forward_in_blocks: on CPU, large
            # fresh allocations cost more in page faults than the arithmetic)
            block = max(1, CPU_BLOCK_ELEMENTS // max(1, x[:, :1].numel()))
            if q_len <= block or (torch.is_grad_enabled() and x.requires_grad):
                return rotate(x, cos, sin)
            out = torch.empty_like(x)
            for t in range(0, q_len, block):
                out[:, t:t + block] = rotate(x[:, t:t + block], cos[:, t:t + block], sin[:, t:t + block])
            return out

        return rotate_in_blocks(q), rotate_in_blocks(k)

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window_size={self.window_size}, cache_size={self.cache_size}, feature_dim={self.feature_dim}, "
                f"mix={self.mix!r}, selection={self.selection!r}, backend={self.backend!r}")


__all__ = ['LoLAAttention', 'check_lola_settings', 'refuse_continuation_without_state', 'MIXES', 'SELECTIONS', 'BACKENDS']
