"""The one-token step of LoLA in PyTorch: attention over the fixed slots of a :class:`LoLAState`.

No grid, no concatenation that grows with T: the token is written into its P slot, one softmax runs over
λ cache slots + 2η window slots next to the linear read-out, and at a chunk boundary the state's
``G ∪ W`` goes through :func:`select_and_fold` before ``P`` moves into ``W``.

Two ways to the same numbers: on CPU, where reading the rows' token counts back costs nothing, rows that all sit
at one position and all take their token (the usual decode loop) read one contiguous slice of valid window slots,
with no masks and no scatter; otherwise (CUDA, padding, rows at different positions) every row is masked on its
own. On CUDA (:func:`sync_free`) a step also never reads a device value on the host: the boundary update runs for
every row and ``torch.where`` keeps it where a row completes its chunk, so a step never waits for the GPU and can
be captured in a CUDA graph. ``tests/test_ops.py`` checks the paths against the naive reference, and
``tests/test_models.py`` the sync-free one forced on CPU.

The stages: :func:`step_uniform` or :func:`step_masked` (write the token, read out), then at a boundary
:func:`boundary_update` (select and fold) and :func:`shift_window` (``P`` becomes ``W``).
"""


from __future__ import annotations

import torch

from fla_lola.ops.selection import select_and_fold
from fla_lola.ops.state import LoLAState, PairColumns, pack_memory, pack_pairs
from fla_lola.ops.utils import EPS

Window = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # window_k, window_v, window_fk of one call

# None: the sync-free path on CUDA (``q.is_cuda``), the fast branching one elsewhere; True / False force one path on
# any device (tests force the CUDA path on CPU to count its host syncs and fix its shapes).
SYNC_FREE: bool | None = None


def sync_free(q: torch.Tensor) -> bool:
    """Whether a step on ``q``'s device takes the path that never reads a device value on the host: every row masked
    on its own, the boundary update computed for every row and kept by ``torch.where`` (no ``bool(t.any())``), so
    the step never waits for the device, creates tensors of data-independent shapes only, and can be captured in a
    CUDA graph. It pays a selection per step instead of one per η steps."""
    return q.is_cuda if SYNC_FREE is None else SYNC_FREE


def decode_lola_attention(
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
    initial_state: LoLAState | None,
    output_final_state: bool,
    inplace: bool = False,
) -> tuple[torch.Tensor, LoLAState | None]:
    """``T == 1``; inputs already checked by :func:`fla_lola.lola_attention`.

    ``inplace=True`` (with ``output_final_state``) writes the new state into ``initial_state``'s own tensors and
    returns that object; otherwise ``initial_state`` is left untouched and a new state comes back.
    """
    B, _, H, D = q.shape
    inplace = inplace and initial_state is not None and output_final_state
    st = initial_state if initial_state is not None else LoLAState.empty(
        B, H, k.shape[2], D, v.shape[3], fq.shape[3], window_size, cache_size, dtype=q.dtype, device=q.device)
    # the token goes into slot η + phase of the window; in place, the state's own window is the buffer, else a copy
    window = (st.window_k, st.window_v, st.window_fk) if inplace else \
        (st.window_k.clone(), st.window_v.clone(), st.window_fk.clone())
    free = sync_free(q)
    position = None if free else uniform_position(st, q, attention_mask)
    if position is not None:
        o, boundary, active = step_uniform(q, k, v, fq, fk, gate, st, window, position, scale, mix)
    else:
        o, boundary, active = step_masked(q, k, v, fq, fk, gate, st, window, attention_mask, scale, mix, free)
    if not output_final_state:
        return o, None

    fields = dict(h=st.h, s=st.s, cache_k=st.cache_k, cache_v=st.cache_v, cache_fk=st.cache_fk,
                  cache_pos=st.cache_pos)
    if boundary is not None:
        fields.update(boundary_update(st, window, boundary, selection, inplace, free))
        window = shift_window(window, boundary, inplace, free)
    step = 1 if active is None else active.long()  # tokens each row takes
    if inplace:
        st.seen.add_(step)
        return o, st
    return o, LoLAState(**fields, window_k=window[0], window_v=window[1], window_fk=window[2], seen=st.seen + step)


def uniform_position(st: LoLAState, q: torch.Tensor, attention_mask: torch.Tensor | None) -> int | None:
    """The position every row's token takes, where all rows share one and all take a token; else ``None``. Only on
    CPU (module docstring), where reading the rows' token counts back does not stall a device."""
    if q.is_cuda or not (attention_mask is None or bool(attention_mask.all())):
        return None
    seen = st.seen.tolist()
    return seen[0] if all(x == seen[0] for x in seen) else None


def step_uniform(q, k, v, fq, fk, gate, st: LoLAState, window: Window, position: int, scale: float, mix: str):
    """Every row writes its token at ``position`` and reads one contiguous slice of valid window slots: no masks,
    no scatter. Returns ``(o, boundary, active)``: ``boundary`` all rows or ``None``; ``active`` ``None``."""
    eta = st.window_size
    phase = position % eta
    slot = eta + phase
    for buf, x in zip(window, (k, v, fk)):
        buf[:, :, slot] = x[:, 0]
    lo = 0 if position >= eta else eta  # W is valid once a chunk is complete; P up to this token
    o = _read_out(q, fq, gate, window[0][:, :, lo:slot + 1], window[1][:, :, lo:slot + 1], None, st, scale, mix,
                  st.cache_size)
    boundary = torch.ones(q.shape[0], dtype=torch.bool, device=q.device) if phase + 1 == eta else None
    return o, boundary, None


def step_masked(q, k, v, fq, fk, gate, st: LoLAState, window: Window, attention_mask, scale: float, mix: str,
                free: bool = False):
    """Rows at any positions, some taking no token (``attention_mask``): each row writes and masks on its own.
    Returns ``(o, boundary, active)``: ``boundary`` ``[B]`` or ``None`` when no row completes its chunk (``free``:
    always ``[B]``, never read on the host), ``active`` ``[B]`` (rows that take their token) or ``None`` for all."""
    eta = st.window_size
    active = None if attention_mask is None else attention_mask[:, 0] != 0
    phase = st.seen % eta
    step = 1 if active is None else active.long()
    rows, slot = torch.arange(q.shape[0], device=q.device), eta + phase
    for buf, x in zip(window, (k, v, fk)):  # rows that take no token keep what their slot holds
        buf[rows, :, slot] = x[:, 0] if active is None else \
            torch.where(active[:, None, None], x[:, 0], buf[rows, :, slot])
    wpos = window_positions(st)                               # valid slots hold positions in [0, seen + step)
    wvalid = (wpos >= 0) & (wpos < (st.seen + step)[:, None])
    o = _read_out(q, fq, gate, window[0], window[1], wvalid, st, scale, mix, st.cache_size)
    if active is not None:
        o = torch.where(active[:, None, None, None], o, torch.zeros_like(o))
    boundary = phase + 1 == eta if active is None else active & (phase + 1 == eta)
    return o, (boundary if free or bool(boundary.any()) else None), active


def window_positions(st: LoLAState) -> torch.Tensor:
    """``[B, 2η]``: slot ``j`` of the window holds absolute position ``(seen // η - 1)·η + j``."""
    eta = st.window_size
    return ((st.seen // eta - 1) * eta)[:, None] + torch.arange(2 * eta, device=st.device)[None]


def boundary_update(st: LoLAState, window: Window, boundary: torch.Tensor, selection: str,
                    inplace: bool, free: bool = False) -> dict[str, torch.Tensor]:
    """Rows at a boundary that have a previous chunk ``W`` select λ pairs of ``G ∪ W`` and fold the rest
    (:func:`select_and_fold`). Returns the new ``h``, ``s`` and cache fields (written into the state's own tensors
    when ``inplace``); empty when no row selects. ``free`` (:func:`sync_free`): every row selects and folds, and
    ``torch.where`` keeps the result for the rows ``sel`` only; nothing is read on the host."""
    sel = boundary & (st.seen >= st.window_size)
    if not free and not bool(sel.any()):
        return {}
    B, H, lam, eta = st.batch_size, st.num_heads, st.cache_size, st.window_size
    grp, cols = H // st.num_kv_heads, PairColumns(st.head_dim, st.value_dim, st.feature_dim)
    wk, wv, wfk = (x[:, :, :eta] for x in window)                                  # W, all valid here

    def heads(x):  # [B, Hkv, η, d] -> [B*H, η, d]
        return x.repeat_interleave(grp, dim=1).reshape(B * H, eta, x.shape[-1])
    w_pos = window_positions(st)[:, :eta]                                            # [B, η]
    w_pairs = pack_pairs(heads(wk), heads(wv), (w_pos >= 0).repeat_interleave(H, 0),
                         wfk.reshape(B * H, eta, cols.F), wv.dtype)
    c_pairs = pack_pairs(st.cache_k, st.cache_v, st.cache_pos >= 0, st.cache_fk, wv.dtype).reshape(B * H, lam,
                                                                                                   cols.width)
    cand_pos = torch.cat([st.cache_pos.reshape(B * H, lam), w_pos.repeat_interleave(H, 0)], 1)
    hs, cache, pos = select_and_fold(selection, lam, pack_memory(st).reshape(B * H, cols.F, cols.Dv + 1),
                                     torch.cat([c_pairs, w_pairs], 1), cand_pos,
                                     torch.arange(H, device=st.device).repeat(B), cols.D, sync_free=free)
    hs, cache = hs.view(B, H, cols.F, cols.Dv + 1), cache.view(B, H, lam, cols.width)
    everywhere, u, u3 = (False if free else bool(sel.all())), sel[:, None, None, None], sel[:, None, None]
    return dict(h=put(st.h, hs[..., :-1], u, everywhere, inplace), s=put(st.s, hs[..., -1], u3, everywhere, inplace),
                cache_k=put(st.cache_k, cache[..., cols.k], u, everywhere, inplace),
                cache_v=put(st.cache_v, cache[..., cols.v], u, everywhere, inplace),
                cache_fk=put(st.cache_fk, cache[..., cols.fk], u, everywhere, inplace),
                cache_pos=put(st.cache_pos, pos.view(B, H, lam), u3, everywhere, inplace))


def put(old: torch.Tensor, new: torch.Tensor, where: torch.Tensor, everywhere: bool, inplace: bool) -> torch.Tensor:
    """Rows ``where`` (all rows when ``everywhere``) take ``new``: written into ``old`` when ``inplace``, else a new
    tensor."""
    if inplace:
        return old.copy_(new) if everywhere else old.copy_(torch.where(where, new, old))
    return new if everywhere else torch.where(where, new, old)


def shift_window(window: Window, boundary: torch.Tensor, inplace: bool, free: bool = False) -> Window:
    """At a boundary ``W ← P`` and ``P ← ∅`` for rows ``boundary``. In place the buffers are the state's own; else
    they are this call's copies, which the read-out may still need for its gradient: new tensors then."""
    eta = window[0].shape[2] // 2
    b4 = boundary[:, None, None, None]
    everywhere = False if free else bool(boundary.all())
    if inplace:
        for x in window:
            if everywhere:
                x[:, :, :eta] = x[:, :, eta:]
                x[:, :, eta:] = 0
            else:
                x[:, :, :eta] = torch.where(b4, x[:, :, eta:], x[:, :, :eta])
                x[:, :, eta:].masked_fill_(b4, 0)
        return window
    if everywhere:
        return tuple(torch.cat([x[:, :, eta:], torch.zeros_like(x[:, :, eta:])], 2) for x in window)
    return tuple(torch.cat([torch.where(b4, x[:, :, eta:], x[:, :, :eta]), x[:, :, eta:].masked_fill(b4, 0)], 2)
                 for x in window)


def _read_out(q, fq, gate, wk, wv, wvalid, st, scale, mix, lam):
    """The output ``[B, 1, H, Dv]`` of one token: one softmax over the cache and the window slots ``wk``/``wv``
    (masked by ``wvalid`` [B, n] unless every slot given is valid), next to the linear read-out of ``st``.

    Every product is a plain ``bmm`` over ``B·Hkv`` (window: a group's queries share its keys) or ``B·H`` (cache,
    memory) batches of 3-d views: a step is a few dozen small ops, so each op saved counts."""
    B, _, H, D = q.shape
    Hkv, n, Dv = wk.shape[1], wk.shape[2], wv.shape[-1]
    grp, acc = H // Hkv, st.h.dtype
    F = fq.shape[-1]
    qh = q[:, 0].to(acc) * scale                                                   # [B, H, D]
    s_w = torch.bmm(qh.reshape(B * Hkv, grp, D), wk.to(acc).reshape(B * Hkv, n, D).transpose(1, 2)).view(B, H, n)
    if wvalid is not None:
        s_w = s_w.masked_fill_(~wvalid[:, None], float('-inf'))
    m = s_w.amax(-1)                                                               # [B, H]
    if lam > 0:
        s_c = torch.bmm(qh.reshape(B * H, 1, D), st.cache_k.to(acc).reshape(B * H, lam, D).transpose(1, 2))
        s_c = s_c.view(B, H, lam).masked_fill_(st.cache_pos < 0, float('-inf'))
        m = torch.maximum(m, s_c.amax(-1))
    m = m.clamp(min=0) if mix == 'lola' else torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p_w = torch.exp(s_w - m[..., None])
    num = torch.bmm(p_w.reshape(B * Hkv, grp, n), wv.to(acc).reshape(B * Hkv, n, Dv)).view(B, H, Dv)
    den = p_w.sum(-1)
    if lam > 0:
        p_c = torch.exp(s_c - m[..., None])
        num = num.view(B * H, 1, Dv).baddbmm_(p_c.reshape(B * H, 1, lam), st.cache_v.to(acc).reshape(B * H, lam, Dv))
        num = num.view(B, H, Dv)
        den = den.add_(p_c.sum(-1))
    fqh = fq[:, 0].to(acc)                                                         # [B, H, F]
    lin_num = torch.bmm(fqh.reshape(B * H, 1, F), st.h.reshape(B * H, F, Dv)).view(B, H, Dv)
    lin_den = torch.bmm(fqh.reshape(B * H, 1, F), st.s.reshape(B * H, F, 1)).view(B, H)
    g = gate.to(acc)[None, :]
    if mix == 'lola':
        e = torch.exp(-m)
        ge = (1 - g) * e                                                           # (1-γ)·e^{-c}
        y = torch.addcmul(lin_num * ge[..., None], g[..., None], num) / \
            torch.addcmul(torch.addcmul(e * EPS, ge, lin_den), g, den)[..., None]
    else:
        den = g * den + lin_den  # zero only for a padding row with an empty state
        y = (g[..., None] * num + lin_num) / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return y.unsqueeze(1).to(q.dtype)
