"""Block attention mass: the Triton kernel and its launcher.

For every batch ``b``, head ``h``, query block ``p`` and key block ``c`` visited by the plan::

    W[b, h, p, c] = sum_{i in query block p} sum_{j in key block c, j < kv_len_b} exp(scale * q_i . k_j - lse_i)

in fp32, with one ``QK^T`` pass and no softmax of its own: ``lse`` is given (from a dense pass
with ``return_lse=True``, or cached from an earlier denoising step as AdaSpa does). Blocks the
plan does not visit are 0. Rows whose ``lse`` is ``-inf`` (no keys) contribute 0. With the exact
``lse`` of the same keys, each query row's masses sum to 1 over a dense plan, so
``W[b, h, p, :].sum() / rows_in_block`` is a recall denominator.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import BlockSparsity
from .triton_common import LOG2E, dot, plan_row, plan_strides, strides


@triton.jit
def _block_mass_kernel(
    Q, K, Lse, Mass,
    kv_counts_ptr, kv_indices_ptr, key_lengths_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    num_heads, seq_q, seq_kv, head_dim, num_q_blocks, num_kv_blocks, qk_scale,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
):
    q_block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads

    offs_m = tl.arange(0, Q_BLOCK)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_rows = q_block * Q_BLOCK + offs_m
    rows_ok = q_rows < seq_q
    d_ok = offs_d < head_dim

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        + (q_block * Q_BLOCK).to(tl.int64) * stride_qs
        + offs_m[:, None] * stride_qs + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_q + q_rows, mask=rows_ok, other=float("inf"))
    # exp2(x - inf) = 0: rows with no keys (lse = -inf) or past seq_q add nothing.
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)

    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    k_tile_offsets = offs_n[:, None] * stride_ks + offs_d[None, :]
    count, index_ptr, kv_len = plan_row(
        kv_counts_ptr, kv_indices_ptr, key_lengths_ptr, batch, head, q_block,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, seq_kv, HAS_KEY_LENGTHS,
    )
    mass_row = Mass + (pid_bh.to(tl.int64) * num_q_blocks + q_block) * num_kv_blocks

    for i in range(0, count):
        kv_block = tl.load(index_ptr + i)
        total = tl.zeros([Q_BLOCK], dtype=tl.float32)
        for sub in tl.static_range(0, KV_BLOCK, BLOCK_N):
            kv_rows = kv_block * KV_BLOCK + sub + offs_n
            cols_ok = kv_rows < kv_len
            k_ptrs = k_base + (kv_block * KV_BLOCK + sub).to(tl.int64) * stride_ks + k_tile_offsets
            k = tl.load(k_ptrs, mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
            qk = dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_OPERANDS)
            p = tl.math.exp2(qk * qk_scale - lse2[:, None])
            total += tl.sum(tl.where(cols_ok[None, :], p, 0.0), 1)
        tl.store(mass_row + kv_block, tl.sum(total, 0))


def triton_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    plan: BlockSparsity,
    *,
    scale: float,
    layout: str,
    key_lengths: torch.Tensor | None,
    interpret: bool,
) -> torch.Tensor:
    """Launch the block-mass kernel on validated inputs (see ``fastdit.kernels.block_mass``)."""
    if layout == "bshd":
        batch, seq_q, heads, head_dim = q.shape
        seq_kv = k.shape[1]
    else:
        batch, heads, seq_q, head_dim = q.shape
        seq_kv = k.shape[2]
    mass = torch.zeros(
        (batch, heads, plan.num_q_blocks, plan.num_kv_blocks), dtype=torch.float32, device=q.device
    )
    lse = lse.to(torch.float32).contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if (block_d > 128 and not interpret) else plan.kv_block_size
    counts, indices = plan.kv_counts, plan.kv_indices
    grid = (plan.num_q_blocks, batch * heads)
    _block_mass_kernel[grid](
        q, k, lse, mass,
        counts, indices, key_lengths if key_lengths is not None else counts,
        *strides(q, layout), *strides(k, layout), *plan_strides(plan),
        heads, seq_q, seq_kv, head_dim, plan.num_q_blocks, plan.num_kv_blocks, scale * LOG2E,
        Q_BLOCK=plan.q_block_size, KV_BLOCK=plan.kv_block_size, BLOCK_N=block_n, BLOCK_D=block_d,
        HAS_KEY_LENGTHS=key_lengths is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST_OPERANDS=interpret and q.dtype == torch.bfloat16,
        num_warps=8 if plan.q_block_size == 128 else 4, num_stages=1 if interpret else 2,
    )
    return mass
