"""NATTEN-compatible neighborhood attention on fastdit's kernels: switch with one import.

``na1d``, ``na2d`` and ``na3d`` take NATTEN's heads-last layout ``[B, *spatial, heads, D]`` and its
window semantics (``kernel_size``, ``stride``, ``dilation``: an int or one entry per dimension;
the exact rule is in :mod:`fastdit.methods.gna`), and return the same layout::

    from fastdit.natten import na2d            # instead of: from natten.functional import na2d
    out = na2d(q, k, v, kernel_size=(7, 7), stride=(2, 2), dilation=1)

How it runs. The spatial dims are flattened to a grid (``na1d``: ``(1, 1, X)``, ``na2d``:
``(1, X, Y)``, ``na3d``: ``(X, Y, Z)``). The result is always exactly NATTEN's, never the block
superset of it:

1. If some tile (entries dividing the extents, so no padding enters the sequence; volume dividing
   the kernel block, 128 tried before 64) makes the configuration perfectly block-sparse, the
   tokens are permuted tile-major, :class:`~fastdit.methods.gna.GNA`'s block plan runs on
   :func:`fastdit.kernels.block_sparse_attention`, and the output is permuted back.
2. Otherwise a block plan would include keys outside the windows, so the call runs on an exact
   masked attention in PyTorch (chunked over queries, fp32 accumulation), and this is logged once
   per configuration on the ``fastdit`` logger.

Plans and the path choice are cached per (shape, parameters, device).
"""

from __future__ import annotations

import logging
import math

import torch

from .kernels import block_sparse_attention
from .kernels.dispatch import SUPPORTED_DTYPES
from .layout import LatentGrid, SequenceLayout
from .methods.gna import GNA, _int_tuple, allowed_1d, check_dimension, choose_tile

__all__ = ["na1d", "na2d", "na3d"]

logger = logging.getLogger("fastdit")

_BLOCK_SIZES = (128, 64)
# Elements of one chunk of masked scores (B * heads * queries * keys) on the exact path.
_CHUNK_ELEMENTS = 1 << 24
_methods: dict[tuple, GNA | None] = {}
_logged: set[tuple] = set()


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


def _method_for(grid: LatentGrid, window, stride, dilation) -> GNA | None:
    """A GNA whose tile makes the configuration perfectly block-sparse, or None if none exists."""
    key = (grid, window, stride, dilation)
    if key not in _methods:
        method = None
        for block_size in _BLOCK_SIZES:
            tile = choose_tile(grid, window, stride, dilation, block_size, perfect_only=True)
            if tile is not None:
                method = GNA(window, stride, dilation, tile=tile, block_size=block_size)
                break
        _methods[key] = method
    return _methods[key]


def _masked_attention(q, k, v, masks, grid: LatentGrid, scale: float) -> torch.Tensor:
    """Exact attention on ``[B, N, heads, D]`` under the factorised mask, chunked over queries."""
    batch, n, heads, _ = q.shape
    coords = grid.coords(q.device)
    k32, v32 = k.float(), v.float()
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    chunk = max(1, _CHUNK_ELEMENTS // (batch * heads * n))
    for start in range(0, n, chunk):
        rows = coords[start : start + chunk]
        mask = masks[0][rows[:, 0]][:, coords[:, 0]]
        mask &= masks[1][rows[:, 1]][:, coords[:, 1]]
        mask &= masks[2][rows[:, 2]][:, coords[:, 2]]
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, start : start + chunk].float(), k32) * scale
        scores.masked_fill_(~mask, float("-inf"))
        out[:, start : start + chunk] = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v32)
    return out.to(q.dtype)


def _neighborhood_attention(ndim, query, key, value, kernel_size, stride, dilation, is_causal, scale):
    if is_causal:
        raise ValueError(f"fastdit's na{ndim}d is non-causal only, got {is_causal=}")
    _check_inputs(ndim, query, key, value)
    spatial = tuple(query.shape[1 : 1 + ndim])
    batch, heads, head_dim = query.shape[0], query.shape[-2], query.shape[-1]
    kernel_size = _int_tuple("kernel_size", kernel_size, ndim)
    stride = _int_tuple("stride", stride, ndim)
    dilation = _int_tuple("dilation", dilation, ndim)
    for i, (extent, w, s, d) in enumerate(zip(spatial, kernel_size, stride, dilation)):
        check_dimension(extent, w, s, d, window_name="kernel_size", dim=str(i))
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    lead = 3 - ndim
    grid = LatentGrid(*((1,) * lead + spatial))
    window3, stride3, dilation3 = ((1,) * lead + p for p in (kernel_size, stride, dilation))
    q, k, v = (x.reshape(batch, grid.num_tokens, heads, head_dim) for x in (query, key, value))

    method = _method_for(grid, window3, stride3, dilation3)
    if method is not None:
        plan = method.plan(SequenceLayout(grid), device=q.device)
        permutation = plan.permutation
        q, k, v = (permutation.permute(x, dim=1) for x in (q, k, v))
        out = block_sparse_attention(q, k, v, plan.sparsity, scale=scale, layout="bshd")
        out = permutation.unpermute(out, dim=1)
    else:
        config = (spatial, kernel_size, stride, dilation)
        if config not in _logged:
            _logged.add(config)
            logger.info(
                "fastdit: na%dd with kernel_size=%s, stride=%s, dilation=%s on %s is not block-sparse "
                "for any tile; running on the exact masked path",
                ndim, kernel_size, stride, dilation, spatial,
            )
        masks = [
            allowed_1d(x, w, s, d, q.device)
            for x, w, s, d in zip(grid.shape, window3, stride3, dilation3)
        ]
        out = _masked_attention(q, k, v, masks, grid, float(scale))
    return out.reshape(query.shape)
