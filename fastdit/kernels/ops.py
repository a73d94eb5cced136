"""fastdit's kernel operations as ``torch.library`` custom ops (namespace ``fastdit``).

``torch.compile`` sees each public kernel entry point as one opaque operator with a fake (meta)
implementation that gives the output shapes: no graph break, and Inductor never re-compiles
fastdit's Triton kernels or traces FA4. The backend is chosen inside the operator, at run time,
from the same :class:`~fastdit.kernels.backend.Request` the eager path uses. Arguments are tensors
and plain values only: plans and window masks travel as their tensors and sizes.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import backend as registry
from .plan import BlockSparsity
from .quantized import QuantizedQK
from .window import WindowMask

Tensor = torch.Tensor
_NO_TENSOR_SHAPE = (0,)


def _split(x: Tensor, layout: str) -> tuple[int, int, int, int]:
    if layout == "bshd":
        return x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    return x.shape[0], x.shape[2], x.shape[1], x.shape[3]


def _plan(counts: Tensor, indices: Tensor, sizes: list[int], dense: bool = False) -> BlockSparsity:
    # Validated where the caller built it (or built valid by construction): no host sync here.
    return BlockSparsity(counts, indices, sizes[0], sizes[1], sizes[2], is_dense=dense,
                         validate=False)


def _empty_f32(x: Tensor) -> Tensor:
    return x.new_empty(_NO_TENSOR_SHAPE, dtype=torch.float32)


def _like(reference: Tensor, out: Tensor) -> Tensor:
    """``out`` with the strides ``torch.empty_like(reference)`` has (what the fake promises): a
    backend's output already has them whenever ``reference`` is dense, so nothing is allocated."""
    if out.stride() == reference.stride() and out.dtype == reference.dtype:
        return out
    return torch.empty_like(reference).copy_(out)


# ---------------------------------------------------------------------- attention
@torch.library.custom_op("fastdit::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kv_counts: Tensor,
    kv_indices: Tensor,
    plan_sizes: list[int],
    dense: bool,
    scale: float,
    layout: str,
    return_lse: bool,
    key_lengths: Optional[Tensor],
    window_counts: Optional[Tensor],
    window_indices: Optional[Tensor],
    window_query_start: Optional[Tensor],
    window_key_coords: Optional[Tensor],
    window_rule: list[int],
    quantize: Optional[str],
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    """Block-sparse attention; ``plan_sizes`` = (q block, kv block, nK); ``window_rule`` = window
    (3) + dilation (3) when the window tensors are given. Returns (out, lse or an empty tensor)."""
    plan = _plan(kv_counts, kv_indices, plan_sizes, dense)
    window = None
    if window_counts is not None:
        window = WindowMask(
            _plan(window_counts, window_indices, plan_sizes), window_query_start,
            window_key_coords, tuple(window_rule[:3]), tuple(window_rule[3:]),
        )
    quantize = registry.runnable_quantize(quantize, q.device)
    request = registry.Request(
        "attention", q.device, q.dtype, q.shape[-1], plan.q_block_size, plan.kv_block_size,
        dense=dense and window is None, return_lse=return_lse, key_padding=key_lengths is not None,
        window_mask=window is not None, quantize=quantize,
    )
    chosen = registry.choose(request, backend)
    kwargs = dict(scale=scale, layout=layout, return_lse=return_lse, key_lengths=key_lengths,
                  window=window, quantize=quantize, dense=request.dense)
    if chosen.name == "flash4" and backend is None:
        out, lse = chosen.run_or_remember(request, q, k, v, plan, **kwargs)
    else:
        out, lse = chosen.attention(q, k, v, plan, **kwargs)
    return _like(q, out), (lse if lse is not None else _empty_f32(q))


@attention.register_fake
def _(q, k, v, kv_counts, kv_indices, plan_sizes, dense, scale, layout, return_lse, key_lengths,
      window_counts, window_indices, window_query_start, window_key_coords, window_rule, quantize,
      backend):
    batch, seq_q, heads, _ = _split(q, layout)
    lse = q.new_empty((batch, heads, seq_q), dtype=torch.float32) if return_lse else _empty_f32(q)
    return torch.empty_like(q), lse


# ---------------------------------------------------------------------- block mass
@torch.library.custom_op("fastdit::block_mass", mutates_args=())
def block_mass(
    q: Tensor,
    k: Tensor,
    lse: Tensor,
    kv_counts: Tensor,
    kv_indices: Tensor,
    plan_sizes: list[int],
    scale: float,
    layout: str,
    key_lengths: Optional[Tensor],
    backend: Optional[str],
) -> Tensor:
    plan = _plan(kv_counts, kv_indices, plan_sizes)
    request = registry.Request(
        "block_mass", q.device, q.dtype, q.shape[-1], plan.q_block_size, plan.kv_block_size,
        key_padding=key_lengths is not None,
    )
    return registry.choose(request, backend).block_mass(
        q, k, lse, plan, scale=scale, layout=layout, key_lengths=key_lengths
    )


@block_mass.register_fake
def _(q, k, lse, kv_counts, kv_indices, plan_sizes, scale, layout, key_lengths, backend):
    batch, _, heads, _ = _split(q, layout)
    return q.new_empty((batch, heads, kv_counts.shape[-1], plan_sizes[2]), dtype=torch.float32)


# ---------------------------------------------------------------------- pooling
@torch.library.custom_op("fastdit::block_mean_pool", mutates_args=())
def block_mean_pool(x: Tensor, block_size: int, layout: str, backend: Optional[str]) -> Tensor:
    request = registry.Request("block_mean_pool", x.device, x.dtype, x.shape[-1])
    return registry.choose(request, backend).block_mean_pool(x, block_size, layout=layout)


@block_mean_pool.register_fake
def _(x, block_size, layout, backend):
    batch, seq, heads, head_dim = _split(x, layout)
    return x.new_empty((batch, heads, -(-seq // block_size), head_dim), dtype=torch.float32)


@torch.library.custom_op("fastdit::segment_mean_pool", mutates_args=())
def segment_mean_pool(x: Tensor, offsets: Tensor, layout: str, backend: Optional[str]) -> Tensor:
    request = registry.Request("segment_mean_pool", x.device, x.dtype, x.shape[-1])
    return registry.choose(request, backend).segment_mean_pool(x, offsets, layout=layout)


@segment_mean_pool.register_fake
def _(x, offsets, layout, backend):
    batch, _, heads, head_dim = _split(x, layout)
    return x.new_empty((batch, heads, offsets.shape[0] - 1, head_dim), dtype=torch.float32)


# ---------------------------------------------------------------------- INT8 quantization
@torch.library.custom_op("fastdit::quantize_qk", mutates_args=())
def quantize_qk(
    q: Tensor,
    k: Tensor,
    q_block_size: int,
    kv_block_size: int,
    scale: float,
    layout: str,
    key_lengths: Optional[Tensor],
    lse_shift: bool,
    smooth_k: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    request = registry.Request(
        "quantize_qk", q.device, q.dtype, q.shape[-1], q_block_size, kv_block_size,
        key_padding=key_lengths is not None,
    )
    result = registry.choose(request, backend).quantize_qk(
        q, k, q_block_size=q_block_size, kv_block_size=kv_block_size, scale=scale, layout=layout,
        key_lengths=key_lengths, lse_shift=lse_shift, smooth_k=smooth_k,
    )
    shift = result.lse_shift if result.lse_shift is not None else _empty_f32(q)
    return result.q, result.q_scale, result.k, result.k_scale, result.k_mean, shift


@quantize_qk.register_fake
def _(q, k, q_block_size, kv_block_size, scale, layout, key_lengths, lse_shift, smooth_k, backend):
    batch, seq_q, heads, head_dim = _split(q, layout)
    seq_kv = _split(k, layout)[1]
    f32 = dict(dtype=torch.float32)
    return (
        q.new_empty((batch, heads, seq_q, head_dim), dtype=torch.int8),
        q.new_empty((batch, heads, -(-seq_q // q_block_size)), **f32),
        q.new_empty((batch, heads, seq_kv, head_dim), dtype=torch.int8),
        q.new_empty((batch, heads, -(-seq_kv // kv_block_size)), **f32),
        q.new_empty((batch, heads, head_dim), **f32),
        q.new_empty((batch, heads, seq_q), **f32) if lse_shift else _empty_f32(q),
    )


def as_quantized(parts: tuple[Tensor, ...], q_block_size: int, kv_block_size: int, scale: float,
                 lse_shift: bool) -> QuantizedQK:
    q_q, q_scale, k_q, k_scale, k_mean, shift = parts
    return QuantizedQK(q_q, q_scale, k_q, k_scale, k_mean, shift if lse_shift else None,
                       q_block_size, kv_block_size, scale)
