"""NATTEN-compatible neighborhood attention on fastdit's kernels: switch with one import.

``na1d``, ``na2d`` and ``na3d`` take NATTEN's heads-last layout ``[B, *spatial, heads, D]`` and its
window semantics (``kernel_size``, ``stride``, ``dilation``: an int or one entry per dimension;
the exact rule is in :mod:`fastdit.methods.gna`), and return the same layout::

    from fastdit.natten import na2d            # instead of: from natten.functional import na2d
    out = na2d(q, k, v, kernel_size=(7, 7), stride=(2, 2), dilation=1)

How it runs. The spatial dims are flattened to a grid (``na1d``: ``(1, 1, X)``, ``na2d``:
``(1, X, Y)``, ``na3d``: ``(X, Y, Z)``), the tokens are permuted tile-major, and
:class:`~fastdit.methods.gna.GNA`'s plan runs on :func:`fastdit.kernels.block_sparse_attention`;
the output is permuted back. The result is always exactly NATTEN's, for any extents:

1. The tile (entries dividing the extents, so no padding enters the sequence; volume dividing the
   kernel block) is one that makes the configuration perfectly block-sparse when one exists (128
   tried before 64): every visited block is fully inside the windows and the kernel runs without
   element masks.
2. Otherwise :func:`~fastdit.methods.gna.choose_tile` picks the sparsest tile, and blocks that are
   only partly inside the windows run with a :class:`~fastdit.kernels.WindowMask` that applies the
   window rule per (query, key) pair in the kernel.

Plans are cached per (shape, parameters, device) in bounded least-recently-used caches
(:class:`~fastdit.methods.base.PlanCache`): a process that sees many shapes keeps a bounded number.
"""

from __future__ import annotations

import math

import torch

from .kernels import block_sparse_attention
from .kernels.dispatch import SUPPORTED_DTYPES
from .layout import LatentGrid, SequenceLayout
from .methods.base import PlanCache
from .methods.gna import GNA, check_dimension, choose_tile, int_tuple

__all__ = ["na1d", "na2d", "na3d"]

_BLOCK_SIZES = (128, 64)
# One GNA (tile choice, plans per device) per (grid, window, stride, dilation), least recently
# used first out: a process that sees many shapes keeps a bounded number.
_methods = PlanCache()


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
    """1-D neighborhood attention; ``query``, ``key``, ``value``: ``[B, X, heads, D]``."""
    return _neighborhood_attention(1, query, key, value, kernel_size, stride, dilation, is_causal, scale)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
    """2-D neighborhood attention; ``query``, ``key``, ``value``: ``[B, X, Y, heads, D]``."""
    return _neighborhood_attention(2, query, key, value, kernel_size, stride, dilation, is_causal, scale)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale=None):
    """3-D neighborhood attention; ``query``, ``key``, ``value``: ``[B, X, Y, Z, heads, D]``."""
    return _neighborhood_attention(3, query, key, value, kernel_size, stride, dilation, is_causal, scale)


def _check_inputs(ndim: int, query, key, value) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndim + 3:
            raise ValueError(
                f"na{ndim}d expects {name} of rank {ndim + 3} [B, *spatial({ndim}), heads, D], "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} dtype must be one of fp16, bf16, fp32, got {x.dtype}")
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(
            f"query, key and value must have the same shape, got {tuple(query.shape)}, "
            f"{tuple(key.shape)}, {tuple(value.shape)}"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            "query, key and value must be on one device, got "
            f"{query.device}, {key.device}, {value.device}"
        )


def _method_for(grid: LatentGrid, window, stride, dilation) -> GNA:
    """GNA with a perfectly block-sparse tile when one exists, else the sparsest dividing tile."""
    return _methods.get_or_build(
        (grid, window, stride, dilation), lambda: _build_method(grid, window, stride, dilation)
    )


def _build_method(grid: LatentGrid, window, stride, dilation) -> GNA:
    for block_size in _BLOCK_SIZES:
        tile = choose_tile(grid, window, stride, dilation, block_size, perfect_only=True)
        if tile is not None:
            return GNA(window, stride, dilation, tile=tile, block_size=block_size)
    tile = choose_tile(grid, window, stride, dilation, _BLOCK_SIZES[0])
    return GNA(window, stride, dilation, tile=tile, block_size=_BLOCK_SIZES[0])


def _neighborhood_attention(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale):
    if is_causal:
        raise ValueError(f"fastdit's na{ndim}d is non-causal only, got {is_causal=}")
    _check_inputs(ndim, query, key, value)
    spatial = tuple(query.shape[1 : 1 + ndim])
    batch, heads, head_dim = query.shape[0], query.shape[-2], query.shape[-1]
    kernel_size = int_tuple("kernel_size", kernel_size, ndim)
    stride = int_tuple("stride", stride, ndim)
    dilation = int_tuple("dilation", dilation, ndim)
    for i, (extent, w, s, d) in enumerate(zip(spatial, kernel_size, stride, dilation)):
        check_dimension(extent, w, s, d, window_name="kernel_size", dim=str(i))
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    lead = 3 - ndim
    grid = LatentGrid(*((1,) * lead + spatial))
    window3, stride3, dilation3 = ((1,) * lead + p for p in (kernel_size, stride, dilation))
    q, k, v = (x.reshape(batch, grid.num_tokens, heads, head_dim) for x in (query, key, value))

    method = _method_for(grid, window3, stride3, dilation3)
    plan = method.plan(SequenceLayout(grid), device=q.device)
    permutation = plan.permutation
    q, k, v = (permutation.permute(x, dim=1) for x in (q, k, v))
    out = block_sparse_attention(
        q, k, v, plan.sparsity, scale=scale, layout="bshd", window_mask=plan.window_mask
    )
    out = permutation.unpermute(out, dim=1)
    return out.reshape(query.shape)
