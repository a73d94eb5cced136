"""Block and segment mean pooling: the Triton kernel and its launchers.

For every batch ``b``, head ``h`` and block ``c`` of ``block_size`` consecutive tokens (any size,
not only powers of two)::

    pooled[b, h, c] = mean_{j in block c, j < S} x[b, j, h]        (fp32, [B, H, nb, D])

The last block averages only its real tokens. With segment offsets instead of a block size, block
``c`` is the run ``offsets[c] <= j < offsets[c + 1]`` (runs of any, differing lengths: VMoBA's
ragged partitions in partition-major order). VMoBA's key-block summaries and agent pooling are
built on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import strides


@triton.jit
def _block_mean_pool_kernel(
    X, Pooled, Offsets,
    stride_xb, stride_xh, stride_xs,
    num_heads, seq_len, head_dim, num_blocks, block_size,
    CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_OFFSETS: tl.constexpr,
):
    block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_s = tl.arange(0, CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    if HAS_OFFSETS:
        block_start = tl.load(Offsets + block).to(tl.int32)
        block_end = tl.load(Offsets + block + 1).to(tl.int32)
    else:
        block_start = block * block_size
        block_end = tl.minimum(block_start + block_size, seq_len)
    x_ptrs = (
        X + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
        + block_start.to(tl.int64) * stride_xs
        + offs_s[:, None] * stride_xs + offs_d[None, :]
    )
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for chunk_start in range(0, block_end - block_start, CHUNK):
        rows_ok = (block_start + chunk_start + offs_s) < block_end
        x = tl.load(x_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        total += tl.sum(x.to(tl.float32), 0)
        x_ptrs += CHUNK * stride_xs  # pointer arithmetic is 64-bit
    mean = total / (block_end - block_start).to(tl.float32)
    out_ptrs = Pooled + (pid_bh.to(tl.int64) * num_blocks + block) * head_dim + offs_d
    tl.store(out_ptrs, mean, mask=d_ok)


def triton_block_mean_pool(x: torch.Tensor, block_size: int, *, layout: str) -> torch.Tensor:
    """Launch the pooling kernel on a validated 4-D tensor (see ``fastdit.kernels.block_mean_pool``)."""
    if layout == "bshd":
        batch, seq_len, heads, head_dim = x.shape
    else:
        batch, heads, seq_len, head_dim = x.shape
    num_blocks = triton.cdiv(seq_len, block_size)
    pooled = torch.empty(
        (batch, heads, num_blocks, head_dim), dtype=torch.float32, device=x.device
    )
    _block_mean_pool_kernel[(num_blocks, batch * heads)](
        x, pooled, pooled, *strides(x, layout), heads, seq_len, head_dim, num_blocks, block_size,
        CHUNK=min(64, triton.next_power_of_2(block_size)),
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_OFFSETS=False, num_warps=4,
    )
    return pooled


def triton_segment_mean_pool(x: torch.Tensor, offsets: torch.Tensor, *, layout: str) -> torch.Tensor:
    """Launch the pooling kernel over the runs ``[offsets[c], offsets[c + 1])`` (see
    ``fastdit.kernels.segment_mean_pool``); ``offsets`` is a validated int tensor on ``x``'s device."""
    if layout == "bshd":
        batch, seq_len, heads, head_dim = x.shape
    else:
        batch, heads, seq_len, head_dim = x.shape
    num_segments = offsets.numel() - 1
    pooled = torch.empty(
        (batch, heads, num_segments, head_dim), dtype=torch.float32, device=x.device
    )
    # Segment lengths live on the device; a fixed chunk avoids reading them on the host.
    _block_mean_pool_kernel[(num_segments, batch * heads)](
        x, pooled, offsets, *strides(x, layout), heads, seq_len, head_dim, num_segments, 1,
        CHUNK=64, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), HAS_OFFSETS=True,
        num_warps=4,
    )
    return pooled
