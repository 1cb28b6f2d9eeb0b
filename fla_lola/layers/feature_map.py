"""The LoLCATs feature map used by LoLCATs and LoLA checkpoints."""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import initialization as init


# rows of a block of the CPU inference path: temporaries of about this many elements (2 MiB in float32)
CPU_BLOCK_ELEMENTS = 2 ** 19


class LoLCATsFeatureMap(nn.Module):
    r"""Per-head learnable softmax feature map of LoLCATs (Zhang et al., 2024), also used by LoLA.

    For query head ``h`` and an input row ``x`` of size ``head_dim``:

    .. math::
        \phi(x) = \mathrm{clamp}\big([\mathrm{softmax}(x W_h),\ \mathrm{softmax}(-x W_h)],\ \min=\epsilon\big)

    with ``W_h`` of shape ``[head_dim, feature_dim]`` and no bias, so the output has ``2 * feature_dim``
    non-negative features. Queries and keys use two separate maps (``feature_map_q``, ``feature_map_k`` in
    :class:`~fla_lola.layers.LoLAAttention`); both are applied after rotary embeddings.

    Parameters:
        weight (torch.Tensor): ``[num_heads, head_dim, feature_dim]``, ``W_h`` stacked over query heads.
            This is exactly LoLCATs' ``feature_map_q.mlp.layer`` / ``feature_map_k.mlp.layer`` (same shape,
            same meaning: ``einsum('hdf,bhld->bhlf', layer, x)``), so a LoLCATs checkpoint maps onto it with
            ``weight.copy_(layer)``.

    Args:
        num_heads (int): number of query heads ``H``.
        head_dim (int): ``D``.
        feature_dim (int): ``f``; the map outputs ``F = 2 f`` features.
        eps (float): the clamp floor, ``1e-12`` as in LoLCATs.
    """

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int = 64, eps: float = 1e-12):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.feature_dim = feature_dim
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LoLCATs' identity initialization: ``W_h = I[:head_dim, :feature_dim]`` for every head."""
        # transformers' guarded init: a no-op on a weight `from_pretrained` already loaded (some transformers 5.x
        # call `_init_weights` after loading; a plain copy_ would silently reset loaded feature maps)
        eye = torch.eye(self.head_dim, self.feature_dim, dtype=torch.float32, device=self.weight.device)
        with torch.no_grad():
            init.copy_(self.weight, eye.expand_as(self.weight))

    @property
    def output_dim(self) -> int:
        return 2 * self.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., H, D]`` -> ``[..., H, 2f]`` in ``x``'s dtype (computed in float32 or better)."""
        if x.shape[-2:] != (self.num_heads, self.head_dim):
            raise ValueError(
                f"x must end in [num_heads={self.num_heads}, head_dim={self.head_dim}]; got shape {tuple(x.shape)}"
            )
        dtype = torch.promote_types(x.dtype, torch.float32)
        weight = self.weight.to(dtype)
        large = x.numel() // self.head_dim * self.output_dim > CPU_BLOCK_ELEMENTS
        if large and x.device.type == 'cpu' and not (torch.is_grad_enabled() and (x.requires_grad or
                                                                                  weight.requires_grad)):
            return self._forward_in_blocks(x, weight, dtype)
        return self._phi(x.to(dtype), weight).to(x.dtype)

    def _phi(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        z = torch.einsum('...hd,hdf->...hf', x, weight)
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).clamp(min=self.eps)

    def _forward_in_blocks(self, x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The same map over blocks of rows, written into one output. On CPU a long prefill's temporaries (the
        logits, two softmaxes, their concatenation) are each tens of MB, and every fresh allocation that large is
        paid again in page faults (~0.5 ms per MB here, more than the arithmetic); block-sized temporaries are
        reused from the allocator's heap. Rows are independent, so the result is the one-shot map's."""
        rows = x.reshape(-1, self.num_heads, self.head_dim)
        out = torch.empty(rows.shape[0], self.num_heads, self.output_dim, dtype=x.dtype, device=x.device)
        block = max(1, CPU_BLOCK_ELEMENTS // (self.num_heads * self.output_dim))
        for i in range(0, rows.shape[0], block):
            out[i:i + block] = self._phi(rows[i:i + block].to(dtype), weight)
        return out.view(*x.shape[:-1], self.output_dim)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, feature_dim={self.feature_dim}"
