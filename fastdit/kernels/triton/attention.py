"""Block-sparse attention forward: the Triton kernel and its launcher.

For every batch ``b``, head ``h`` and query row ``i`` in query block ``p``::

    S_ij  = scale * q_i . k_j                 for j in the key blocks listed by plan[b, h, p],
                                              j < valid key length of b
    out_i = sum_j softmax_j(S_ij) v_j
    lse_i = log sum_j exp(S_ij)               (natural log; -inf and out_i = 0 when no j)

Layouts: ``"bshd"`` (diffusers' ``(B, S, H, D)``) or ``"bhsd"``; any strides with a unit last
stride. Offsets into Q/K/V/O are built from 64-bit scalar bases plus 32-bit in-tile offsets, so
tensors of more than 2**31 elements are addressed correctly.

The kernel is FlashAttention-2's online softmax over the plan's key-block list (names from the
papers: ``m_i`` running max in log2 units, ``l_i`` running sum, ``acc`` unnormalised output).
``scale * log2(e)`` is folded once into ``qk_scale`` and exponentials use ``exp2``. Because a
plan's key-block indices are sorted, the blocks that can need a bounds mask (the ragged last block,
blocks past a key-padding length) are a suffix of each row: the main loop runs unmasked and only
that suffix pays for masking. A :class:`~fastdit.kernels.window.WindowMask` adds a last loop over
its partial blocks, where the factorised window rule masks scores per (query, key) pair; without
one that loop is not compiled. ``triton_common.WARP_SPECIALIZE`` (an experiment, off by default)
compiles each row as one warp-specialized loop instead (see
:func:`~fastdit.kernels.triton.triton_common.attend_plan_row`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import BlockSparsity
from .allocation import scoped_allocator
from .triton_common import (
    LOG2E,
    TensorDescriptor,
    attend_kv_blocks,
    attend_plan_row,
    count_unmasked_blocks,
    launch_with_fallback,
    load_q_tile,
    normalized_output,
    plan_row,
    plan_strides,
    strides,
    tma_view,
    WARP_SPECIALIZED_CONFIG,
    warp_specialization_skipped,
)
from ..window import WindowMask


@triton.jit
def _block_sparse_attn_fwd(
    Q, K, V, Out, Lse, k_desc, v_desc,
    kv_counts_ptr, kv_indices_ptr, key_lengths_ptr,
    partial_counts_ptr, partial_indices_ptr, q_start_ptr, k_coords_ptr,
    stride_pcb, stride_pch, stride_pib, stride_pih, stride_piq,
    span_t, span_h, span_w, dil_t, dil_h, dil_w,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    num_heads, seq_q, seq_kv, head_dim, qk_scale,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_KV: tl.constexpr, EVEN_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    USE_TMA: tl.constexpr, LAYOUT_BSHD: tl.constexpr, HAS_WINDOW: tl.constexpr,
    WINDOW_DILATED: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    q_row_start = pid_m * BLOCK_M
    q_block = q_row_start // Q_BLOCK

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = (q_row_start + offs_m) < seq_q
    d_ok = offs_d < head_dim

    q_ptrs = (
        Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        + q_row_start.to(tl.int64) * stride_qs
        + offs_m[:, None] * stride_qs + offs_d[None, :]
    )
    if WARP_SPECIALIZE:
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        q = load_q_tile(q_base, stride_qs, seq_q, q_row_start, BLOCK_M, BLOCK_D)
    else:
        q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    k_tile_offsets = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_tile_offsets = offs_n[:, None] * stride_vs + offs_d[None, :]

    count, index_ptr, kv_len = plan_row(
        kv_counts_ptr, kv_indices_ptr, key_lengths_ptr, batch, head, q_block,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, seq_kv, HAS_KEY_LENGTHS,
    )

    if WARP_SPECIALIZE:  # the row runs in one masked loop (attend_plan_row)
        num_unmasked = count
    else:
        num_unmasked = count_unmasked_blocks(index_ptr, count, kv_len, KV_BLOCK, EVEN_KV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Hopper+ (USE_TMA): the copy engine fetches whole K/V tiles of the 2-D views
    # [B*S, H*D] (bshd) or [B*H*S, D] (bhsd); coordinates are rows, not bytes.
    if LAYOUT_BSHD:
        tma_row, tma_col = batch * seq_kv, head * BLOCK_D
    else:
        tma_row, tma_col = pid_bh * seq_kv, 0
    acc, l_i, m_i = attend_plan_row(
        acc, l_i, m_i, q, index_ptr, num_unmasked, count,
        k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
        kv_len, head_dim, qk_scale, k_desc, v_desc, tma_row, tma_col, tma_row, tma_col,
        KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D,
        DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, USE_TMA=USE_TMA,
        WARP_SPECIALIZE=WARP_SPECIALIZE, EVEN_KV=EVEN_KV,
    )
    if HAS_WINDOW:
        # Partial blocks: the window rule decides per (query, key) pair.
        q_rows = q_row_start + offs_m
        q_start_t = tl.load(q_start_ptr + q_rows * 3, mask=rows_ok, other=0)
        q_start_h = tl.load(q_start_ptr + q_rows * 3 + 1, mask=rows_ok, other=0)
        q_start_w = tl.load(q_start_ptr + q_rows * 3 + 2, mask=rows_ok, other=0)
        partial_count, partial_ptr, _ = plan_row(
            partial_counts_ptr, partial_indices_ptr, key_lengths_ptr, batch, head, q_block,
            stride_pcb, stride_pch, stride_pib, stride_pih, stride_piq, seq_kv, False,
        )
        acc, l_i, m_i = attend_kv_blocks(
            acc, l_i, m_i, q, partial_ptr, 0, partial_count,
            k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
            kv_len, head_dim, qk_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASK_KV=True, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, WINDOW=True,
            q_start_t=q_start_t, q_start_h=q_start_h, q_start_w=q_start_w,
            k_coords_ptr=k_coords_ptr, span_t=span_t, span_h=span_h, span_w=span_w,
            dil_t=dil_t, dil_h=dil_h, dil_w=dil_w, DILATED=WINDOW_DILATED,
        )

    out, lse = normalized_output(acc, l_i, m_i)
    o_ptrs = (
        Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + q_row_start.to(tl.int64) * stride_os
        + offs_m[:, None] * stride_os + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        lse_ptrs = Lse + pid_bh.to(tl.int64) * seq_q + q_row_start + offs_m
        tl.store(lse_ptrs, lse, mask=rows_ok)


# Launch configurations, keyed on what changes the best one: head-dim tile, block sizes and
# element size. (BLOCK_M, BLOCK_N, num_warps, num_stages); from benchmarks/tune_attention.py on
# an H100 (bf16, Wan2.1-1.3B 480p shape, dense and 25 % plans). A config that needs more shared memory than the GPU
# has is shrunk at the first launch (see triton_common.launch_with_fallback).
_CONFIGS = {
    # (BLOCK_D, Q_BLOCK, KV_BLOCK, element bytes): config
    (64, 128, 128, 2): (128, 128, 8, 2),
    (128, 128, 128, 2): (128, 128, 8, 3),
    (256, 128, 128, 2): (64, 64, 4, 1),
    (64, 64, 64, 2): (64, 64, 4, 2),
    (128, 64, 64, 2): (64, 64, 4, 2),
    (256, 64, 64, 2): (64, 32, 4, 1),
    # fp32 (tests) at head_dim 256: (64, 64, 4, 1) spilled so much that one compile took 45 s
    # on an H100 and block 128 did not finish in minutes; this one compiles in 8-20 s.
    (256, 128, 128, 4): (32, 32, 8, 1),
    (256, 64, 64, 4): (32, 32, 8, 1),
}


def _launch_config(block_d: int, q_block: int, kv_block: int, element_bytes: int, interpret: bool):
    if interpret:
        # The CPU interpreter is slowest on many small programs: take the biggest tiles.
        return q_block, kv_block, 4, 1
    config = _CONFIGS.get((block_d, q_block, kv_block, element_bytes))
    if config is not None:
        return config
    if q_block != kv_block:  # mixed block sizes: the smaller tile of each
        return min(q_block, 128 if block_d <= 128 else 64), min(kv_block, 64), 4, 2
    block = min(q_block, 64 if block_d > 128 or element_bytes > 2 else 128)
    return block, min(kv_block, block), 4 if block == 64 else 8, 1 if element_bytes > 2 else 2


def _tma_views(k: torch.Tensor, v: torch.Tensor, layout: str, interpret: bool):
    """2-D views of K and V for tensor-descriptor loads, or None unless both qualify."""
    k_view, v_view = tma_view(k, layout, interpret), tma_view(v, layout, interpret)
    if k_view is None or v_view is None:
        return None
    return k_view, v_view


def triton_block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsity,
    *,
    scale: float,
    layout: str,
    return_lse: bool,
    key_lengths: torch.Tensor | None,
    interpret: bool,
    window: WindowMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the kernel on validated inputs (see ``fastdit.kernels.block_sparse_attention``)."""
    if layout == "bshd":
        batch, seq_q, heads, head_dim = q.shape
        seq_kv = k.shape[1]
    else:
        batch, heads, seq_q, head_dim = q.shape
        seq_kv = k.shape[2]
    out = torch.empty_like(q)
    lse = (
        torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
        if return_lse
        else out  # unused placeholder pointer
    )
    block_d = max(16, triton.next_power_of_2(head_dim))
    counts, indices = plan.kv_counts, plan.kv_indices
    row_strides = plan_strides(plan)
    tma_views = _tma_views(k, v, layout, interpret)
    warp_specialize = False  # the warp-specialized kernel, where it applies (see WARP_SPECIALIZE)
    if warp_specialization_skipped(
        q.device, q.dtype, head_dim, q_block_size=plan.q_block_size,
        kv_block_size=plan.kv_block_size, key_padding=key_lengths is not None,
        window=window is not None, quantized=False, interpret=interpret,
    ) is None:
        views = [tma_view(x, layout, interpret, on_interpreter=True) for x in (q, k, v)]
        if all(view is not None for view in views):
            tma_views, warp_specialize = views[1:], True
    if window is None:  # HAS_WINDOW=False compiles no window loop: these are never read
        window_args = (counts, indices, counts, counts, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1)
    else:
        spans = tuple(w * d for w, d in zip(window.window, window.dilation))
        window_args = (
            window.partial.kv_counts, window.partial.kv_indices,
            window.query_start, window.key_coords, *plan_strides(window.partial),
            *spans, *window.dilation,
        )

    def launch(block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
        if tma_views is not None:
            k_desc = TensorDescriptor.from_tensor(tma_views[0], [block_n, block_d])
            v_desc = TensorDescriptor.from_tensor(tma_views[1], [block_n, block_d])
        else:
            k_desc, v_desc = k, v  # unused
        grid = (triton.cdiv(seq_q, block_m), batch * heads)
        _block_sparse_attn_fwd[grid](
            q, k, v, out, lse, k_desc, v_desc,
            counts, indices, key_lengths if key_lengths is not None else counts,
            *window_args,
            *strides(q, layout), *strides(k, layout), *strides(v, layout),
            *strides(out, layout), *row_strides,
            heads, seq_q, seq_kv, head_dim, scale * LOG2E,
            Q_BLOCK=plan.q_block_size, KV_BLOCK=plan.kv_block_size,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            EVEN_KV=key_lengths is None and seq_kv % plan.kv_block_size == 0,
            EVEN_D=block_d == head_dim,
            HAS_KEY_LENGTHS=key_lengths is not None,
            RETURN_LSE=return_lse,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_OPERANDS=interpret and q.dtype == torch.bfloat16,
            USE_TMA=tma_views is not None,
            LAYOUT_BSHD=layout == "bshd",
            HAS_WINDOW=window is not None,
            WINDOW_DILATED=window is not None and max(window.dilation) > 1,
            WARP_SPECIALIZE=warp_specialize,
            num_warps=num_warps, num_stages=num_stages,
        )

    if warp_specialize:  # each launch with Triton's allocator for Q's device-built descriptor
        launch = scoped_allocator(q.device)(launch)
    element_bytes = q.element_size()
    config = _launch_config(block_d, plan.q_block_size, plan.kv_block_size, element_bytes, interpret)
    if warp_specialize and not interpret:
        config = WARP_SPECIALIZED_CONFIG
    if interpret:
        launch(*config)
        return out, (lse if return_lse else None)
    key = (block_d, plan.q_block_size, plan.kv_block_size, q.dtype, tma_views is not None,
           window is not None, q.device.index, warp_specialize)
    launch_with_fallback(key, config, launch)
    return out, (lse if return_lse else None)
