"""The LoLA token mixer as a vLLM layer whose per-sequence state lives in vLLM's state slots.

Each slot holds one sequence's :class:`~fla_lola.LoLAState` in the op's canonical layout (one row of every field,
for this rank's heads): :meth:`LoLAMixer.bind_kv_cache` views vLLM's raw page ``[num_slots, bytes]`` as the ten
fields, so a step gathers its rows into a ``LoLAState`` with one ``index_select`` per field, runs
:func:`fla_lola.lola_attention` and scatters the final rows back with one ``index_copy_`` per field. No layout
conversion: the slots and the op speak the same state.

A step's batch comes decodes first (``num_decodes`` rows of one token each: one batched ``[N, 1]`` decode call),
then prefill pieces (one packed call through ``cu_seqlens``, one initial state per sequence). Whether a row starts a
sequence comes from its context length (``seq_lens - query_len == 0``), never from the decode/prefill split: vLLM
counts a 1-token piece of a chunked prefill, the first one included, as a decode. A fresh row's gathered state is
reset to the empty state on the device (a ``masked_fill``), so no slot is ever cleared with a host-side loop and a
reused slot never leaks its previous owner's tokens.

Under ``torch.compile`` the projections, q/k norms, rotary embedding and feature maps are compiled; the stateful
step runs behind the custom op ``torch.ops.vllm.fla_lola_attention`` (a splitting op: vLLM runs it eagerly).
"""

from __future__ import annotations

from dataclasses import fields
from math import prod

import torch
import torch.nn as nn
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import ForwardContext, get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from fla_lola.layers.feature_map import LoLCATsFeatureMap
from fla_lola.layers.rope import ScaledRotaryEmbedding, rope_init, rope_type_of
from fla_lola.ops import LoLAState, lola_attention
from fla_lola.ops.state import accumulation_dtype
from fla_lola.pipeline.vllm.backend import BACKEND_NAME

OP_NAME = 'fla_lola_attention'
STATE_FIELDS = tuple(f.name for f in fields(LoLAState))


def state_layout(num_heads: int, num_kv_heads: int, head_dim: int, value_dim: int, feature_dim: int,
                 window_size: int, cache_size: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{field: (shape of one row, dtype)}`` of a :class:`LoLAState` (``seen``'s row is ``()``)."""
    H, Hkv, D, Dv, F, W, L = num_heads, num_kv_heads, head_dim, value_dim, feature_dim, 2 * window_size, cache_size
    acc = accumulation_dtype(dtype)
    return {
        'h': ((H, F, Dv), acc), 's': ((H, F), acc),
        'cache_k': ((H, L, D), dtype), 'cache_v': ((H, L, Dv), dtype), 'cache_fk': ((H, L, F), dtype),
        'cache_pos': ((H, L), torch.long),
        'window_k': ((Hkv, W, D), dtype), 'window_v': ((Hkv, W, Dv), dtype), 'window_fk': ((H, W, F), dtype),
        'seen': ((), torch.long),
    }


def page_order(layout: dict) -> list[str]:
    """Fields in page order: widest elements first, so every field starts at a byte offset its element size
    divides (vLLM views one int8 page per slot)."""
    return sorted(layout, key=lambda name: -layout[name][1].itemsize)


def _nbytes(shape, dtype) -> int:
    return prod(shape) * dtype.itemsize


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LoLAMixer(MambaBase, nn.Module):
    """LoLA attention for vLLM: q/k/v/o projections split by head across tensor-parallel ranks (vLLM's
    ``QKVParallelLinear`` / ``RowParallelLinear``), Qwen3's q/k norm, the teacher's rotary table
    (:mod:`fla_lola.layers.rope`), LoLCATs feature maps and mixing weights for this rank's query heads, and the
    op on this rank's slice of every sequence's state. Parameter names match :class:`fla_lola.LoLAAttention`
    (``qkv_proj`` stacks ``q_proj``, ``k_proj``, ``v_proj``)."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str = ''):
        super().__init__()
        self.prefix = prefix
        self.model_config = vllm_config.model_config
        self.cache_config = vllm_config.cache_config
        quant_config = vllm_config.quant_config
        tp_size = get_tensor_model_parallel_world_size()
        tp_rank = get_tensor_model_parallel_rank()

        self.hidden_size = config.hidden_size
        self.total_num_heads = config.num_heads
        self.total_num_kv_heads = config.num_kv_heads or config.num_heads
        if self.total_num_heads % tp_size:
            raise ValueError(f"LoLA in vLLM: num_heads ({self.total_num_heads}) must be divisible by "
                             f"tensor_parallel_size ({tp_size})")
        if self.total_num_kv_heads % tp_size and tp_size % self.total_num_kv_heads:
            raise ValueError(f"LoLA in vLLM: num_kv_heads ({self.total_num_kv_heads}) and tensor_parallel_size "
                             f"({tp_size}) must divide one another")
        self.num_heads = self.total_num_heads // tp_size
        self.num_kv_heads = max(1, self.total_num_kv_heads // tp_size)
        self.head_dim = config.head_dim or config.hidden_size // config.num_heads
        self.window_size = config.window_size
        self.cache_size = config.cache_size
        self.feature_dim = config.feature_dim
        self.mix = config.mix
        self.selection = config.selection
        self.backend = config.attn_backend
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim

        self.qkv_proj = QKVParallelLinear(
            hidden_size=config.hidden_size, head_size=self.head_dim, total_num_heads=self.total_num_heads,
            total_num_kv_heads=self.total_num_kv_heads, bias=config.qkv_bias, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(
            input_size=self.total_num_heads * self.head_dim, output_size=config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.qk_norm = bool(getattr(config, 'qk_norm', False))
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.norm_eps)

        # this rank's query heads: [tp_rank * H_local, (tp_rank + 1) * H_local)
        head_slice = slice(tp_rank * self.num_heads, (tp_rank + 1) * self.num_heads)
        self.feature_map_q = LoLCATsFeatureMap(self.num_heads, self.head_dim, self.feature_dim)
        self.feature_map_k = LoLCATsFeatureMap(self.num_heads, self.head_dim, self.feature_dim)
        self.window_factors = nn.Parameter(torch.zeros(self.num_heads))

        def load_heads(param: torch.Tensor, loaded: torch.Tensor) -> None:
            param.data.copy_(loaded.reshape(self.total_num_heads, *param.shape[1:])[head_slice])

        for p in (self.feature_map_q.weight, self.feature_map_k.weight, self.window_factors):
            p.weight_loader = load_heads

        # rotary table of fla_lola.LoLAAttention: fla's plain RoPE, or a converted teacher's scaled RoPE built by
        # transformers' own functions; rounded through the model dtype as the HF layer's table is
        rope_parameters = getattr(config, 'rope_parameters', None)
        max_pos = max(self.model_config.max_model_len, config.max_position_embeddings or 0)
        if rope_type_of(rope_parameters) == 'default':
            from fla.modules import RotaryEmbedding
            rotary = RotaryEmbedding(dim=self.head_dim,
                                     base=(rope_parameters or {}).get('rope_theta', config.rope_theta))
        else:
            rotary = ScaledRotaryEmbedding(*rope_init(rope_parameters, self.head_dim, config.rope_theta,
                                                      config.max_position_embeddings))
        dtype = self.model_config.dtype
        with torch.device('cpu'):
            rotary._update_cos_sin_cache(max_pos, device=torch.device('cpu'), dtype=dtype)
        device = torch.get_default_device()
        compute = torch.promote_types(dtype, torch.float32)
        self.register_buffer('rope_cos', rotary._cos_cached.to(device=device, dtype=compute), persistent=False)
        self.register_buffer('rope_sin', rotary._sin_cached.to(device=device, dtype=compute), persistent=False)

        self.layout = state_layout(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim,
                                   2 * self.feature_dim, self.window_size, self.cache_size, dtype)
        self.order = page_order(self.layout)
        used = sum(_nbytes(*self.layout[name]) for name in self.order)
        self.pad_bytes = -used % 8  # keep every page a multiple of 8 bytes, so the next page's int64s align
        self.kv_cache: tuple[torch.Tensor, ...] = ()
        self.state_views: dict[str, torch.Tensor] = {}

        compilation_config = get_current_vllm_config().compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self

    # -- vLLM's state-layer interface ----------------------------------------------------------------------------
    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum[BACKEND_NAME]

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        shapes = [self.layout[name][0] or (1,) for name in self.order]
        return tuple(shapes + ([(self.pad_bytes,)] if self.pad_bytes else []))

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        dtypes = [self.layout[name][1] for name in self.order]
        return tuple(dtypes + ([torch.uint8] if self.pad_bytes else []))

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        """View vLLM's ``[num_slots, 1, 1, bytes]`` int8 pages as the canonical state fields, ``[num_slots, ...]``
        each (``seen`` as ``[num_slots]``)."""
        pages = kv_cache.squeeze(dim=(1, 2))
        views, offset = {}, 0
        for name in self.order:
            shape, dtype = self.layout[name]
            nbytes = _nbytes(shape, dtype)
            if nbytes == 0:  # λ = 0: empty cache fields
                views[name] = torch.empty(pages.shape[0], *shape, dtype=dtype, device=pages.device)
            else:
                views[name] = pages[:, offset:offset + nbytes].view(dtype).view(pages.shape[0], *shape)
            offset += nbytes
        self.state_views = views
        self.kv_cache = tuple(views[name] for name in self.order)

    # -- forward -------------------------------------------------------------------------------------------------
    @property
    def gate(self) -> torch.Tensor:
        w = self.window_factors
        return torch.sigmoid(w.to(torch.promote_types(w.dtype, torch.float32)))

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x`` ``[T, heads, D]`` rotated at ``positions`` ``[T]``, as :meth:`LoLAAttention.apply_rotary`."""
        cos = self.rope_cos[positions]
        sin = self.rope_sin[positions]
        cos = torch.cat([cos, cos], dim=-1)[:, None]
        sin = torch.cat([sin, sin], dim=-1)[:, None]
        xf = x.to(cos.dtype)
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(T, self.num_heads, self.head_dim)
        k = k.reshape(T, self.num_kv_heads, self.head_dim)
        v = v.reshape(T, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q = self.q_norm(q.contiguous())
            k = self.k_norm(k.contiguous())
        q, k = self.rotate(q, positions), self.rotate(k, positions)
        groups = self.num_heads // self.num_kv_heads
        fq = self.feature_map_q(q)
        fk = self.feature_map_k(k if groups == 1 else k.repeat_interleave(groups, dim=1))
        output = torch.zeros(T, self.num_heads * self.head_dim, dtype=hidden_states.dtype,
                             device=hidden_states.device)
        torch.ops.vllm.fla_lola_attention(q, k, v.contiguous(), fq, fk, self.gate, output, self.prefix)
        out, _ = self.o_proj(output)
        return out

    def _step(self, q, k, v, fq, fk, gate, output) -> None:
        """The stateful part: gather this step's rows, run the op, scatter the rows back."""
        metadata = get_forward_context().attn_metadata
        if metadata is None:  # profiling / dummy run: no state to read
            return
        if isinstance(metadata, dict):
            metadata = metadata.get(self.prefix)
        if metadata is None:
            return
        nd, npf = metadata.num_decodes, metadata.num_prefills
        nd_tok, np_tok = metadata.num_decode_tokens, metadata.num_prefill_tokens
        slots = metadata.state_indices_tensor[:nd + npf].long()
        slots = slots.clamp(min=0)  # padding rows (< 0) read and write the null slot 0, which no sequence owns
        qsl = metadata.query_start_loc[:nd + npf + 1].long()
        fresh = (metadata.seq_lens[:nd + npf] - (qsl[1:] - qsl[:-1])) == 0
        kw = dict(window_size=self.window_size, cache_size=self.cache_size, mix=self.mix,
                  selection=self.selection, backend=self.backend, output_final_state=True, validate=False)
        if nd:
            rows = slice(0, nd)
            state = self.gather(slots[rows], fresh[rows])
            o, state = lola_attention(q[:nd_tok, None], k[:nd_tok, None], v[:nd_tok, None], fq[:nd_tok, None],
                                      fk[:nd_tok, None], gate, initial_state=state, inplace_state=True, **kw)
            output[:nd_tok] = o.reshape(nd_tok, -1)
            self.scatter(slots[rows], state)
        if npf:
            rows = slice(nd, nd + npf)
            tok = slice(nd_tok, nd_tok + np_tok)
            state = self.gather(slots[rows], fresh[rows])
            cu = qsl[nd:] - qsl[nd]
            o, state = lola_attention(q[None, tok], k[None, tok], v[None, tok], fq[None, tok], fk[None, tok], gate,
                                      cu_seqlens=cu, initial_state=state, **kw)
            output[tok] = o.reshape(np_tok, -1)
            self.scatter(slots[rows], state)

    def gather(self, slots: torch.Tensor, fresh: torch.Tensor) -> LoLAState:
        """The rows of ``slots`` as a ``LoLAState`` (a copy); rows that start a sequence come back empty."""
        rows = {name: self.state_views[name].index_select(0, slots) for name in STATE_FIELDS}
        # on CPU, reading the mask back is free and most steps start no sequence; on an accelerator the reset runs
        # unconditionally (in place on the gathered copy) rather than wait for the device
        if fresh.device.type != 'cpu' or bool(fresh.any()):
            for name, x in rows.items():
                x.masked_fill_(fresh.view(-1, *([1] * (x.dim() - 1))), -1 if name == 'cache_pos' else 0)
        return LoLAState(**rows)

    def scatter(self, slots: torch.Tensor, state: LoLAState) -> None:
        for name in STATE_FIELDS:
            self.state_views[name].index_copy_(0, slots, getattr(state, name))


def fla_lola_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fq: torch.Tensor, fk: torch.Tensor,
                       gate: torch.Tensor, output: torch.Tensor, layer_name: str) -> None:
    forward_context: ForwardContext = get_forward_context()
    layer = forward_context.no_compile_layers[layer_name]
    layer._step(q, k, v, fq, fk, gate, output)


def fla_lola_attention_fake(q, k, v, fq, fk, gate, output, layer_name) -> None:
    return None


direct_register_custom_op(op_name=OP_NAME, op_func=fla_lola_attention, mutates_args=['output'],
                          fake_impl=fla_lola_attention_fake)

__all__ = ['LoLAMixer', 'OP_NAME', 'state_layout', 'page_order']
