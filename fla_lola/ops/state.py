"""The streaming state of LoLA: fixed capacity, one format for every backend."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, fields

import torch


@dataclass
class LoLAState:
    r"""Everything LoLA remembers about the tokens it has consumed, for ``N`` independent rows.

    ``N`` is the batch size, or the number of packed sequences when ``cu_seqlens`` is used.
    Every tensor has the row as its first dimension, so fla's ``Cache`` can reorder it for beam
    search (``index_select(0, beam_idx)``) and move it between devices field by field.

    The capacity is fixed: ``window_size`` (η) slots for the previous complete chunk ``W``, η slots for
    the current partial chunk ``P``, ``cache_size`` (λ) slots for the sparse cache ``G``, and the linear
    memory ``h``, ``s``. Its size never depends on how many tokens were consumed.

    Canonical layout (every backend produces exactly this, so states compare bit for bit in layout):

    - window slots ``[0, η)`` hold ``W`` in position order (valid once ``seen >= η``), slots ``[η, 2η)``
      hold ``P`` in position order (the first ``seen % η`` are valid). Invalid slots are zero.
    - cache slots hold the valid pairs of ``G`` first, in ascending position order, then empty slots
      with ``cache_pos == -1`` and zero contents.

    Attributes:
        h (torch.Tensor): ``[N, H, F, Dv]`` the linear memory :math:`H = \sum_j \phi(k_j) v_j^\top`.
        s (torch.Tensor): ``[N, H, F]`` the normalizer :math:`s = \sum_j \phi(k_j)`.
        cache_k (torch.Tensor): ``[N, H, λ, D]`` keys of the sparse cache (per query head).
        cache_v (torch.Tensor): ``[N, H, λ, Dv]`` values of the sparse cache.
        cache_fk (torch.Tensor): ``[N, H, λ, F]`` key features of the sparse cache.
        cache_pos (torch.Tensor): ``[N, H, λ]`` int64 absolute positions, ``-1`` for an empty slot.
        window_k (torch.Tensor): ``[N, Hkv, 2η, D]`` keys of ``W`` then ``P`` (shared by a GQA group).
        window_v (torch.Tensor): ``[N, Hkv, 2η, Dv]`` values of ``W`` then ``P``.
        window_fk (torch.Tensor): ``[N, H, 2η, F]`` key features of ``W`` then ``P`` (per query head).
        seen (torch.Tensor): ``[N]`` int64, the number of tokens each row has consumed.

    ``h`` and ``s`` are float32 (float64 when the inputs are float64); the slot contents keep the
    dtype of the inputs, like a KV cache.
    """

    h: torch.Tensor
    s: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    cache_fk: torch.Tensor
    cache_pos: torch.Tensor
    window_k: torch.Tensor
    window_v: torch.Tensor
    window_fk: torch.Tensor
    seen: torch.Tensor

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        value_dim: int,
        feature_dim: int,
        window_size: int,
        cache_size: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> LoLAState:
        """A state that has seen no token."""
        N, H, Hkv, W, L = batch_size, num_heads, num_kv_heads, 2 * window_size, cache_size
        acc = accumulation_dtype(dtype)

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        state = cls(
            h=zeros(N, H, feature_dim, value_dim, dt=acc),
            s=zeros(N, H, feature_dim, dt=acc),
            cache_k=zeros(N, H, L, head_dim),
            cache_v=zeros(N, H, L, value_dim),
            cache_fk=zeros(N, H, L, feature_dim),
            cache_pos=torch.full((N, H, L), -1, dtype=torch.long, device=device),
            window_k=zeros(N, Hkv, W, head_dim),
            window_v=zeros(N, Hkv, W, value_dim),
            window_fk=zeros(N, H, W, feature_dim),
            seen=torch.zeros(N, dtype=torch.long, device=device),
        )
        return state.mark_canonical()

    # -- dimensions ---------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.seen.shape[0]

    @property
    def num_heads(self) -> int:
        return self.h.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.window_k.shape[1]

    @property
    def head_dim(self) -> int:
        return self.window_k.shape[-1]

    @property
    def value_dim(self) -> int:
        return self.window_v.shape[-1]

    @property
    def feature_dim(self) -> int:
        return self.h.shape[2]

    @property
    def window_size(self) -> int:
        return self.window_k.shape[2] // 2

    @property
    def cache_size(self) -> int:
        return self.cache_pos.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.window_k.dtype

    @property
    def device(self) -> torch.device:
        return self.seen.device

    # -- validity masks -----------------------------------------------------------------------
    @property
    def cache_valid(self) -> torch.Tensor:
        """``[N, H, λ]`` bool: which cache slots hold a pair."""
        return self.cache_pos >= 0

    @property
    def window_valid(self) -> torch.Tensor:
        """``[N, 2η]`` bool: which window slots hold a pair (``W`` then ``P``)."""
        eta = self.window_size
        slot = torch.arange(eta, device=self.device)
        prev = (self.seen >= eta)[:, None].expand(-1, eta)
        cur = slot[None, :] < (self.seen % eta)[:, None]
        return torch.cat([prev, cur], dim=1)

    @property
    def window_pos(self) -> torch.Tensor:
        """``[N, 2η]`` int64: the absolute position each window slot stands for, ``-1`` where empty."""
        eta = self.window_size
        start = (self.seen // eta) * eta
        slot = torch.arange(2 * eta, device=self.device)
        pos = start[:, None] - eta + slot[None, :]
        return torch.where(self.window_valid, pos, torch.full_like(pos, -1))

    # -- provenance ---------------------------------------------------------------------------
    # Checking the canonical layout reads the whole cache (several times the cost of a decode step), so a state
    # that a backend wrote, and that nobody touched since, skips it: ``mark_canonical`` records each field tensor
    # and its version counter, which every in-place write (through a view too) increments. Replacing a field, or
    # writing to one, makes the state unknown again and the next validated call checks it in full. The record hangs
    # on the ``seen`` tensor, not on the dataclass, so ``vars(state)`` stays exactly the fields.
    def mark_canonical(self) -> LoLAState:
        """Record that the fields, as they are now, are in the canonical layout (backends call this on their
        results). Inference-mode tensors carry no version counter: such a state is never recorded."""
        try:
            record = tuple((weakref.ref(t), t._version) for t in self._tensors())
        except RuntimeError:  # "Inference tensors do not track version counter"
            record = None
        self.seen._fla_lola_canonical = record
        return self

    @property
    def known_canonical(self) -> bool:
        """Whether :meth:`mark_canonical` was called and no field was replaced or written in place since."""
        record = getattr(self.seen, '_fla_lola_canonical', None)
        return record is not None and all(
            ref() is t and version == t._version for (ref, version), t in zip(record, self._tensors()))

    def _tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    # -- helpers ------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """The state's size in bytes: depends on N, H, Hkv, D, Dv, F, η and λ only."""
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def clone(self) -> LoLAState:
        return self._derived({f.name: getattr(self, f.name).clone() for f in fields(self)})

    def index_select(self, index: torch.Tensor) -> LoLAState:
        """Rows ``index`` of the state (beam reordering, batch selection)."""
        return self._derived({f.name: getattr(self, f.name).index_select(0, index) for f in fields(self)})

    def _derived(self, tensors: dict[str, torch.Tensor]) -> LoLAState:
        """A state made of whole rows of this one: canonical where this one is known to be."""
        state = LoLAState(**tensors)
        return state.mark_canonical() if self.known_canonical else state


@dataclass(frozen=True)
class PairColumns:
    """The packed pair row ``[k | v | 1 | φk]`` the torch backends share (chunk grid, cache, boundary candidates):
    one tensor to concatenate and gather, and ``[v | 1]`` gives a numerator and its denominator in one product.
    The ``1`` is 0 where a slot holds no pair. Each attribute slices the last dimension: ``x[..., cols.v1]``."""

    D: int
    Dv: int
    F: int

    @property
    def width(self) -> int:
        return self.D + self.Dv + 1 + self.F

    @property
    def k(self) -> slice:
        return slice(0, self.D)

    @property
    def v(self) -> slice:
        return slice(self.D, self.D + self.Dv)

    @property
    def v1(self) -> slice:
        return slice(self.D, self.D + self.Dv + 1)

    @property
    def one(self) -> int:
        return self.D + self.Dv

    @property
    def fk(self) -> slice:
        return slice(self.D + self.Dv + 1, self.width)


def pack_pairs(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, fk: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
    """Pairs ``[..., n, ·]`` packed as rows ``[k | v | 1 | φk]`` (:class:`PairColumns`) in ``dtype``."""
    return torch.cat([k.to(dtype), v.to(dtype), valid.unsqueeze(-1).to(dtype), fk.to(dtype)], -1)


def pack_memory(state: LoLAState) -> torch.Tensor:
    """The linear memory as ``[N, H, F, Dv+1]`` = ``[H | s]``: one product reads a numerator and its normalizer."""
    return torch.cat([state.h, state.s.unsqueeze(-1)], -1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32

