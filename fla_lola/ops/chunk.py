"""The chunked PyTorch backend of LoLA: batched over rows × heads, a loop over chunks of η.

Layout. Each row's real tokens are laid on a chunk-aligned grid so that every row's chunk boundaries
fall at the same grid slots, whatever its padding or how many tokens its state has already seen::

    grid chunk:   [ W from the state | chunk 0: state's P, then new tokens | chunk 1 | ... | (empty) ]

A row whose state has consumed ``seen`` tokens puts its ``i``-th new token at slot ``seen % η + i`` of
chunk 0 onwards; the slots before are the state's partial chunk. Padding never enters the grid. When every row
takes all its tokens at the same phase (no padding, no packing: every prefill of ``generate``), queries are read
chunk by chunk straight from ``q`` and ``φq`` and outputs written straight into ``o``; otherwise they go through a
query grid laid out like the pairs. In that uniform case without autograd the grid is only ever held a segment of
chunks at a time (``SEGMENT_ELEMENTS``), refilled from the inputs as the loop moves on: same values, no
whole-sequence buffer to allocate and fault in.

Work per chunk ``c`` (all rows and heads at once; the grid stores each pair as one row ``[k | v | 1 | φk]``):

1. softmax logits of the chunk's queries against its window ``W ∪ P`` (grid chunks ``c`` and ``c+1``, which
   are adjacent rows in memory, so a strided view with no copy) and against the λ cached pairs;
2. one max over both, numerators and denominators in one product each (the ``1`` column), and the
   linear read-out ``φq·[H | s]`` under the spec's normalizer. With mix="lola" no mask is needed but the causal
   one: empty slots are zero rows (logit 0 ≤ the max, which is clamped at 0, and a zero ``[v | 1]`` row), so they
   add exactly nothing; no ``-inf`` ever reaches ``exp``, whose vectorized CPU kernel is several times slower
   on underflowing inputs;
3. boundary, for rows whose chunk is complete: :func:`select_and_fold` on ``G ∪ W``.

The code follows that plan: :func:`chunk_lola_attention` lays out a grid (:class:`UniformGrid` or
:class:`ScatteredGrid`, one interface), packs the memory (:class:`PackedMemory`), then per chunk runs
:class:`ChunkAttention` (steps 1-2) and :func:`boundary_update` (step 3), and ends with :func:`final_state`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fla_lola.ops.selection import select_and_fold
from fla_lola.ops.state import LoLAState, PairColumns, accumulation_dtype, pack_memory, pack_pairs
from fla_lola.ops.utils import EPS, Rows, token_rows

# without autograd, the uniform layout's packed grid is held a segment of chunks at a time, of about this many
# elements (8 MiB in float32)
SEGMENT_ELEMENTS = 2 ** 21


def chunk_lola_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    gate: torch.Tensor,
    *,
    window_size: int,
    cache_size: int,
    scale: float,
    mix: str,
    selection: str,
    attention_mask: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    initial_state: LoLAState | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, LoLAState | None]:
    """Inputs already checked by :func:`fla_lola.lola_attention`; see there for shapes."""
    B, T, H, D = q.shape
    rows = token_rows(B, T, attention_mask, cu_seqlens, q.device)
    state = initial_state if initial_state is not None else LoLAState.empty(
        rows.num_rows, H, k.shape[2], D, v.shape[3], fq.shape[3], window_size, cache_size, dtype=q.dtype,
        device=q.device)
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, fq, fk, gate, *state._tensors()))
    phase = state.seen % window_size
    uniform = attention_mask is None and cu_seqlens is None and bool((phase == phase[0]).all())
    grid = (UniformGrid if uniform else ScatteredGrid)(q, k, v, fq, fk, state, rows, window_size, needs_grad)
    memory = PackedMemory.of(state, grid.cols, selection, grid.acc)
    attend = ChunkAttention(gate, grid, cache_size, scale, mix, in_place=not needs_grad)
    updates = grid.boundary_rows()                                                  # [M, C]
    update_any, update_all = updates.any(0).tolist(), updates.all(0).tolist()
    heads = torch.arange(H, device=q.device).repeat(rows.num_rows)                  # [M] query head index
    # without autograd, the boundary's candidates G ∪ W are assembled in one reused buffer
    candidates = None if needs_grad else grid.pairs.new_empty(grid.M, cache_size + window_size, grid.cols.width)
    for c in range(grid.num_chunks):
        grid.enter(c)
        grid.emit(c, attend(c, memory))
        if update_any[c]:
            memory = boundary_update(memory, grid, c, updates[:, c], update_all[c], selection, cache_size, heads,
                                     candidates)
    o = grid.output().to(q.dtype)
    return o, final_state(grid, memory, state, rows) if output_final_state else None


class Grid:
    """The chunk-aligned grid of one call (module docstring), shared by both layouts.

    ``grid`` ``[N, Hkv, grp, (S+2)·η, E]`` holds each slot's pair as a row ``[k | v | 1 | φk]`` per query head (the
    ``1`` is 0 at invalid slots); it covers the grid chunks ``g0 .. g0 + S + 1`` of the current segment (``S`` query
    chunks; all ``C`` of them but in the uniform layout without autograd). ``pairs`` views it ``[M, S+2, η, E]``.
    ``kvalid`` ``[N, (C+2)·η]`` says which slots of the whole grid hold a pair (``kval`` ``[M, C+2, η]``: per
    memory), ``kpos`` ``[M, C+2, η]`` their positions (``-1`` where empty) per memory.
    """

    def __init__(self, q, k, v, fq, fk, state: LoLAState, rows: Rows, eta: int):
        self.q, self.k, self.v, self.fq, self.fk = q, k, v, fq, fk
        self.windows = (state.window_k, state.window_v, state.window_fk)
        self.B, self.T, self.H, D = q.shape
        self.Hkv, self.eta, self.N = k.shape[2], eta, rows.num_rows
        self.grp, self.M = self.H // self.Hkv, self.N * self.H
        self.cols = PairColumns(D, v.shape[3], fq.shape[3])
        self.acc, self.device = accumulation_dtype(q.dtype), q.device
        self.end = state.seen % eta + rows.lengths                                  # [N] slot after each row's last
        self.num_chunks = C = max(1, -(-int(self.end.max()) // eta)) if self.N > 0 else 1
        g_idx = torch.arange((C + 2) * eta, device=self.device)                    # + W in front, an empty chunk
        self.kvalid = ((g_idx[None] >= eta) & (g_idx[None] < eta + self.end[:, None])) | \
            ((g_idx[None] < eta) & (state.seen[:, None] >= eta))                    # [N, (C+2)·η]
        pos = (state.seen // eta - 1)[:, None] * eta + g_idx[None]                # absolute position of each slot
        pos = torch.where(self.kvalid, pos, torch.full_like(pos, -1))
        self.kpos = pos.repeat_interleave(self.H, dim=0).view(self.M, C + 2, eta)     # [M, C+2, η] per memory
        self.kval = self.kvalid.repeat_interleave(self.H, dim=0).view(self.M, C + 2, eta)
        self.g0 = 0

    def per_group(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., H, ...]`` split into ``[..., Hkv, grp, ...]`` at dim 1 (k, v broadcast over the group)."""
        return x.unflatten(1, (self.Hkv, self.grp)) if x.shape[1] == self.H else x.unsqueeze(2)

    def _view(self, grid: torch.Tensor, segment_chunks: int) -> None:
        self.grid, self.S = grid, segment_chunks
        self.pairs = grid.view(self.M, segment_chunks + 2, self.eta, self.cols.width)
        # the keys and [v | 1] of every slot, viewed once (autograd then sums each slot's gradient in one place)
        self.keys, self.values = self.pairs[..., self.cols.k], self.pairs[..., self.cols.v1]

    def enter(self, c: int) -> None:
        """Make query chunk ``c`` and the grid chunks around it addressable (past the segment: refill it)."""
        if c == self.g0 + self.S:
            self.g0 = c
            self.fill_segment(c)

    def window(self, c: int, x: torch.Tensor) -> torch.Tensor:
        """``[M, 2η, ·]``: the window ``W ∪ P`` of query chunk ``c`` (grid chunks ``c``, ``c+1``) of ``keys`` or
        ``values``."""
        return x[:, c - self.g0:c - self.g0 + 2].reshape(self.M, 2 * self.eta, x.shape[-1])

    def chunk_pairs(self, c: int) -> torch.Tensor:
        """``[M, η, E]``: the pairs of grid chunk ``c``, ``W`` at the boundary after query chunk ``c``."""
        return self.pairs[:, c - self.g0]

    def boundary_rows(self) -> torch.Tensor:
        """``[M, C]``: which memories update at the boundary after each chunk (complete chunk, W exists)."""
        eta, C = self.eta, self.num_chunks
        row_end = self.end.repeat_interleave(self.H)
        return (row_end[:, None] >= torch.arange(1, C + 1, device=self.device)[None] * eta) & self.kval[:, :C, 0]

    def final_windows(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The final state's ``window_k``, ``window_v``, ``window_fk``: the grid chunks ``W``, ``P`` around each row's
        end (in the last segment)."""
        last = self.end // self.eta                                                 # P = grid chunk `last`
        chunks = torch.stack([last, last + 1], 1) - self.g0                         # segment indices of W, P
        rows = torch.arange(self.N, device=self.device)[:, None]

        def window(x):  # [N, heads, (S+2)·η, d] -> [N, heads, 2η, d]
            x = x.unflatten(2, (self.S + 2, self.eta))[rows, :, chunks]             # [N, 2, heads, η, d]
            return x.transpose(1, 2).reshape(self.N, x.shape[2], 2 * self.eta, x.shape[-1]).to(dtype)
        cols = self.cols
        return (window(self.grid[:, :, 0, :, cols.k]), window(self.grid[:, :, 0, :, cols.v]),
                window(self.grid[..., cols.fk].flatten(1, 2)))


class UniformGrid(Grid):
    """Every row takes all ``T`` tokens at the same phase (every prefill of ``generate``): the grid is filled from
    plain slices, queries are read straight from ``q`` and ``φq`` chunk by chunk (a view when ``B == 1``) and
    outputs written straight into ``o``. Without autograd the grid is laid out a segment of query chunks at a time,
    refilled in place: a long prefill never allocates the whole packed grid, whose fresh pages would cost more to
    fault in than the copy itself, and the segment stays in cache. With autograd one segment holds the whole grid
    (the backward pass reads every chunk)."""

    def __init__(self, q, k, v, fq, fk, state, rows, eta, needs_grad):
        super().__init__(q, k, v, fq, fk, state, rows, eta)
        self.p0 = int(state.seen[0] % eta) if self.N > 0 else 0
        C, E = self.num_chunks, self.cols.width
        S = C if needs_grad else max(1, min(C, SEGMENT_ELEMENTS // max(1, self.M * eta * E)))
        self._view(torch.empty(self.N, self.Hkv, self.grp, (S + 2) * eta, E, dtype=self.acc, device=self.device), S)
        self.fill_segment(0)
        self.o = q.new_empty(self.B, self.T, self.H, self.cols.Dv, dtype=self.acc)

    def fill_segment(self, g0: int) -> None:
        """Grid chunks ``g0 ..`` into the segment buffer."""
        self._fill(self.grid[:, :, :, :min(self.S + 2, self.num_chunks + 2 - g0) * self.eta], g0 * self.eta)

    def _fill(self, dst: torch.Tensor, s0: int) -> None:
        """Grid slots ``s0 ..`` into ``dst`` ``[N, Hkv, grp, n, E]``: token ``i`` at slot ``η + p0 + i``, the state's
        W and P at the slots below 2η that no token takes, zeros elsewhere."""
        eta, p0, T, n, cols = self.eta, self.p0, self.T, dst.shape[3], self.cols
        fields = (cols.k, cols.v, cols.fk)
        t0, t1 = min(T, max(0, s0 - eta - p0)), min(T, max(0, s0 + n - eta - p0))
        a = min(max(t0 + eta + p0 - s0, 0), n)
        b = min(max(t1 + eta + p0 - s0, a), n)                                     # dst[..., a:b] holds t0:t1
        for lo_, hi_ in ((0, a), (b, n)):
            mid = min(hi_, max(lo_, 2 * eta - s0))                                  # dst[..., lo_:mid]: the state's
            if mid > lo_:
                for field, w in zip(fields, self.windows):
                    dst[..., lo_:mid, field] = self.per_group(w)[..., s0 + lo_:s0 + mid, :]
            if hi_ > mid:
                dst[..., mid:hi_, :].zero_()
        if b > a:
            for field, x in zip(fields, (self.k, self.v, self.fk)):
                dst[..., a:b, field] = self.per_group(x[:, t0:t1].transpose(1, 2))
        dst[..., cols.one] = self.kvalid[:, None, None, s0:s0 + n].to(self.acc)

    def _tokens(self, c: int) -> tuple[int, int]:
        """The tokens ``t0:t1`` whose queries sit in chunk ``c``."""
        eta, p0 = self.eta, self.p0
        return max(0, c * eta - p0), max(0, min(self.T, (c + 1) * eta - p0))

    def queries(self, c: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """(first query slot in chunk ``c``, queries ``[M, n, D]``, features ``[M, n, F]``)."""
        t0, t1 = self._tokens(c)
        M, D, F = self.M, self.cols.D, self.cols.F
        return (t0 + self.p0 - c * self.eta, self.q[:, t0:t1].transpose(1, 2).reshape(M, t1 - t0, D).to(self.acc),
                self.fq[:, t0:t1].transpose(1, 2).reshape(M, t1 - t0, F).to(self.acc))

    def emit(self, c: int, y: torch.Tensor) -> None:
        t0, t1 = self._tokens(c)
        self.o[:, t0:t1] = y.view(self.B, self.H, t1 - t0, self.cols.Dv).transpose(1, 2)

    def output(self) -> torch.Tensor:
        return self.o


class ScatteredGrid(Grid):
    """Rows at different phases, padding or packed sequences: one segment, the whole grid, written once (the
    state's W and P first, then every real token scattered to its slot), and a query grid laid out like it."""

    def __init__(self, q, k, v, fq, fk, state, rows, eta, needs_grad):
        super().__init__(q, k, v, fq, fk, state, rows, eta)
        N, H, C, cols, acc = self.N, self.H, self.num_chunks, self.cols, self.acc
        D, Dv, F = cols.D, cols.Dv, cols.F
        grid = torch.zeros(N, self.Hkv, self.grp, (C + 2) * eta, cols.width, dtype=acc, device=self.device)
        fields = (cols.k, cols.v, cols.fk)
        for field, w in zip(fields, self.windows):
            grid[:, :, :, :2 * eta, field] = self.per_group(w)
        qgrid = torch.zeros(N, H, C * eta, D + F, dtype=acc, device=self.device)
        self.tb, self.tt = rows.valid.nonzero(as_tuple=True)                        # real tokens, in (b, t) order
        self.tr = rows.row[self.tb, self.tt]
        self.slot = eta + (state.seen % eta)[self.tr] + rows.index[self.tb, self.tt]  # grid slot of each
        for field, x in zip(fields, (k, v, fk)):
            grid[self.tr, :, :, self.slot, field] = x[self.tb, self.tt].unflatten(1, (self.Hkv, -1)).to(acc)
        grid[..., cols.one] = self.kvalid[:, None, None, :].to(acc)
        qgrid[self.tr, :, self.slot - eta] = torch.cat([q, fq], -1)[self.tb, self.tt].to(acc)
        self._view(grid, C)
        self.qgrid = qgrid.view(self.M, C, eta, D + F)
        self.y = q.new_empty(self.M, C, eta, Dv, dtype=acc)

    def queries(self, c: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return 0, self.qgrid[:, c, :, :self.cols.D], self.qgrid[:, c, :, self.cols.D:]

    def emit(self, c: int, y: torch.Tensor) -> None:
        self.y[:, c] = y

    def output(self) -> torch.Tensor:
        y = self.y.view(self.N, self.H, self.num_chunks * self.eta, self.cols.Dv).transpose(1, 2)
        o = self.q.new_zeros(self.B, self.T, self.H, self.cols.Dv, dtype=self.acc)
        return o.index_put((self.tb, self.tt), y[self.tr, self.slot - self.eta])


@dataclass
class PackedMemory:
    """The memory ``hs`` = ``[H | s]`` ``[M, F, Dv+1]``, the cache packed like the grid ``[M, λ, E]`` with its
    positions ``[M, λ]``, and, for "loo", the running total ``[Hₐ | sₐ]`` (below)."""

    hs: torch.Tensor
    cache: torch.Tensor
    cpos: torch.Tensor
    loo_total: torch.Tensor | None

    @classmethod
    def of(cls, state: LoLAState, cols: PairColumns, selection: str, acc: torch.dtype) -> PackedMemory:
        N, H, lam = state.cache_pos.shape
        M, D, Dv, F = N * H, cols.D, cols.Dv, cols.F
        hs = pack_memory(state).reshape(M, F, Dv + 1)
        cpos = state.cache_pos.reshape(M, lam)
        cache = pack_pairs(state.cache_k.reshape(M, lam, D), state.cache_v.reshape(M, lam, Dv), cpos >= 0,
                           state.cache_fk.reshape(M, lam, F), acc)
        # "loo" reads each candidate against the memory plus every candidate, [Hₐ | sₐ] = [H | s] + Σ_{G ∪ W}.
        # After a boundary the kept pairs are G and the folded ones are in H, so that total is the next boundary's
        # [H | s] + Σ_G: carried along, it costs the η new candidates per boundary (scores only: no autograd)
        total = None
        if selection == 'loo' and lam > 0:
            with torch.no_grad():
                total = torch.baddbmm(hs, cache[..., cols.fk].transpose(1, 2), cache[..., cols.v1])
        return cls(hs, cache, cpos, total)

    def where(self, update: torch.Tensor, new: PackedMemory) -> PackedMemory:
        """Memories ``update`` ``[M]`` from ``new``, the others from ``self``."""
        u = update[:, None, None]
        return PackedMemory(torch.where(u, new.hs, self.hs), torch.where(u, new.cache, self.cache),
                            torch.where(update[:, None], new.cpos, self.cpos),
                            None if new.loo_total is None else torch.where(u, new.loo_total, self.loo_total))


class ChunkAttention:
    """Steps 1-2 of the module docstring for one query chunk: softmax logits over its window ``W ∪ P`` (causal) and
    the cache, one max, numerators and denominators in one product each, and the linear read-out under the spec's
    normalizer. Holds what every chunk of a call shares; without autograd, temporaries are overwritten in place
    (exp's backward would need its output)."""

    def __init__(self, gate: torch.Tensor, grid: Grid, cache_size: int, scale: float, mix: str, in_place: bool):
        eta, dev = grid.eta, grid.device
        self.grid, self.lam, self.scale, self.mix, self.in_place = grid, cache_size, scale, mix, in_place
        self.gamma = gate.to(grid.acc).repeat(grid.N)[:, None, None]                # [M, 1, 1]
        # a query at slot i of its chunk sees all of W and slots 0..i of its own chunk
        self.hidden = ~torch.cat([torch.ones(eta, eta, dtype=torch.bool, device=dev),
                                  torch.ones(eta, eta, dtype=torch.bool, device=dev).tril()], 1)  # [η, 2η]
        # baddbmm's ignored input (beta=0): scaled logits in one op
        self.logits = torch.empty(grid.M, eta, 2 * eta + cache_size, dtype=grid.acc, device=dev)

    def __call__(self, c: int, memory: PackedMemory) -> torch.Tensor:
        """``[M, n, Dv]``: the outputs of query chunk ``c``'s ``n`` queries."""
        grid, lam, cols = self.grid, self.lam, self.grid.cols
        lo, Qc, FQc = grid.queries(c)
        n, w = Qc.shape[1], 2 * grid.eta
        s_w = torch.baddbmm(self.logits[:, :n, :w], Qc, grid.window(c, grid.keys).transpose(1, 2), beta=0,
                            alpha=self.scale)                                       # [M, n, 2η]
        s_g = None
        if lam > 0:                                                                 # [M, n, λ]
            s_g = torch.baddbmm(self.logits[:, :n, w:], Qc, memory.cache[..., cols.k].transpose(1, 2), beta=0,
                                alpha=self.scale)
        softmax = self._softmax_lola if self.mix == 'lola' else self._softmax_lolcats
        nd, m = softmax(c, lo, n, s_w, s_g, memory)                                 # [M, n, Dv+1], [M, n, 1]
        lin = torch.bmm(FQc, memory.hs)                                             # [M, n, Dv+1]
        if self.mix == 'lola':
            e = torch.exp(-m)
            out = self.gamma * nd + (1 - self.gamma) * e * lin
            return out[..., :-1] / (out[..., -1:] + EPS * e)
        out = self.gamma * nd + lin
        # only padding slots (no key at all) can have a zero denominator: keep them finite, and their gradients too
        den = out[..., -1:]
        return out[..., :-1] / torch.where(den > 0, den, torch.ones_like(den))

    def _softmax_lola(self, c, lo, n, s_w, s_g, memory):
        """mix="lola": c = max(0, max_j a_j). Empty slots (of the grid and of the cache) hold zero rows, so their logit
        is 0 ≤ c and their [v | 1] row is zero: they add exactly nothing and need no mask. Future keys of the current
        chunk are set to 0 before the max and zeroed after the exp: they are the upper triangle of the current-chunk
        half, hence `tril_` on that view (~10× faster on CPU than a broadcast boolean mask). No -inf ever reaches
        exp, whose vectorized CPU kernel takes a slow path on underflowing inputs."""
        eta, v1 = self.grid.eta, self.grid.cols.v1
        s_w[..., eta:].tril_(lo)
        m = s_w.amax(-1)
        if s_g is not None:
            m = torch.maximum(m, s_g.amax(-1))
        m = m.clamp(min=0).unsqueeze(-1)
        if self.in_place:
            p_w = s_w.sub_(m).exp_()
            p_w[..., eta:].tril_(lo)
        else:
            p_w = torch.exp(s_w - m).masked_fill(self.hidden[lo:lo + n], 0.)
        nd = torch.bmm(p_w, self.grid.window(c, self.grid.values))                  # [M, n, Dv+1]
        if s_g is not None:
            nd = torch.baddbmm(nd, s_g.sub_(m).exp_() if self.in_place else torch.exp(s_g - m),
                               memory.cache[..., v1])
        return nd, m

    def _softmax_lolcats(self, c, lo, n, s_w, s_g, memory):
        """mix="lolcats": empty slots and future keys masked with -inf; a query that sees no key gets m = 0."""
        grid, v1 = self.grid, self.grid.cols.v1
        hidden = self.hidden[lo:lo + n] | ~grid.kval[:, c:c + 2].reshape(grid.M, 1, 2 * grid.eta)
        s_w = s_w.masked_fill_(hidden, float('-inf'))
        m = s_w.amax(-1)
        if s_g is not None:
            s_g = s_g.masked_fill_((memory.cpos < 0)[:, None, :], float('-inf'))
            m = torch.maximum(m, s_g.amax(-1))
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).unsqueeze(-1)
        nd = torch.bmm(torch.exp(s_w - m), grid.window(c, grid.values))            # [M, n, Dv+1]
        if s_g is not None:
            nd = torch.baddbmm(nd, torch.exp(s_g - m), memory.cache[..., v1])
        return nd, m


def boundary_update(memory: PackedMemory, grid: Grid, c: int, update: torch.Tensor, everywhere: bool,
                    selection: str, cache_size: int, heads: torch.Tensor,
                    candidates: torch.Tensor | None) -> PackedMemory:
    """Step 3, after query chunk ``c``: memories ``update`` ``[M]`` (``everywhere``: all of them) select λ pairs of
    ``G ∪ W`` and fold the rest (:func:`select_and_fold`); ``candidates`` is an optional buffer for ``G ∪ W``."""
    cols, w = grid.cols, grid.chunk_pairs(c)                                        # W: grid chunk c
    total = None
    if memory.loo_total is not None:
        with torch.no_grad():
            total = torch.baddbmm(memory.loo_total, w[..., cols.fk].transpose(1, 2), w[..., cols.v1])
    hs, cache, cpos = select_and_fold(selection, cache_size, memory.hs, torch.cat([memory.cache, w], 1, out=candidates),
                                      torch.cat([memory.cpos, grid.kpos[:, c]], 1), heads, cols.D, total=total)
    new = PackedMemory(hs, cache, cpos, total)
    return new if everywhere else memory.where(update, new)


def final_state(grid: Grid, memory: PackedMemory, state: LoLAState, rows: Rows) -> LoLAState:
    """The state after the call: the memory and cache unpacked, ``W`` and ``P`` read from the grid."""
    N, H, lam = grid.N, grid.H, state.cache_size
    cols, dtype = grid.cols, state.dtype
    hs = memory.hs.view(N, H, cols.F, cols.Dv + 1)
    cache = memory.cache.view(N, H, lam, cols.width).to(dtype)
    window_k, window_v, window_fk = grid.final_windows(dtype)
    return LoLAState(
        h=hs[..., :-1].contiguous(), s=hs[..., -1].contiguous(),
        cache_k=cache[..., cols.k].contiguous(), cache_v=cache[..., cols.v].contiguous(),
        cache_fk=cache[..., cols.fk].contiguous(), cache_pos=memory.cpos.view(N, H, lam),
        window_k=window_k, window_v=window_v, window_fk=window_fk, seen=state.seen + rows.lengths,
    )
