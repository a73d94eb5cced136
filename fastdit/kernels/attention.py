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
one that loop is not compiled.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .plan import BlockSparsity
from .window import WindowMask

try:  # host-side tensor descriptors (TMA), Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """``acc + a @ b``; ``UPCAST_OPERANDS`` works around the Triton CPU interpreter's wrong
    results for bf16 ``tl.dot`` (seen with Triton 3.9) and is never set on a GPU."""
    if UPCAST_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _int8_scores(q, k):
    """``q @ k^T`` of int8 tiles as a real int8 x int8 -> int32 MMA, returned in fp32.

    The int32 -> fp32 conversion uses no conversion instruction (those run at a sixteenth of the
    FMA rate, like the exponentials): ``s + 0x4B400000`` read as fp32 is exactly
    ``1.5 * 2**23 + s`` for ``|s| < 2**22``, then one subtraction. An int8 dot over head_dim <= 256
    (``MAX_HEAD_DIM``) is at most ``127 * 127 * 256 < 2**22`` in magnitude, so this is exact; on an
    H100 it made the INT8 kernel 1-3% faster (``benchmarks/results/tune_int8_run2_*.json``)."""
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    return (s + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _online_softmax_step(
    acc, l_i, m_i, q, k, v, visible, qk_scale,
    MASK_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    """Fold one ``[BLOCK_N, D]`` tile of keys and values into the running softmax state;
    ``visible`` (``[1, BLOCK_N]`` or ``[BLOCK_M, BLOCK_N]``) masks scores when ``MASK_KV``."""
    qk = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_OPERANDS)
    return _fold_scores(
        acc, l_i, m_i, qk, v, visible, qk_scale, MASK_KV, DOT_PRECISION, UPCAST_OPERANDS
    )


@triton.jit
def _fold_scores(
    acc, l_i, m_i, qk, v, visible, qk_scale,
    MASK_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
):
    """Fold a ``[BLOCK_M, BLOCK_N]`` tile of raw scores ``qk`` (``qk * qk_scale`` in log2 units)
    and its values into the running softmax state: the online-softmax update shared by every
    attention kernel (P is cast to V's dtype for ``P @ V``, accumulated in fp32). ``visible``
    (``[1, BLOCK_N]`` or ``[BLOCK_M, BLOCK_N]``) masks scores when ``MASK_KV``."""
    if MASK_KV:
        qk = tl.where(visible, qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        # A row that has seen no valid key keeps m = -inf; subtract 0 instead (no NaN).
        m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_shift = m_ij
    p = tl.math.exp2(qk * qk_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST_OPERANDS)
    return acc, l_i, m_ij


@triton.jit
def _window_dim_ok(start, coord, span, dilation):
    """``[BLOCK_M, BLOCK_N]``: key coordinate inside the query's window in one dimension."""
    delta = coord[None, :] - start[:, None]
    return (delta >= 0) & (delta < span) & (delta % dilation == 0)


@triton.jit
def _window_visible(
    q_start_t, q_start_h, q_start_w, k_coords_ptr, cols, cols_ok,
    span_t, span_h, span_w, dil_t, dil_h, dil_w,
):
    """The factorised window rule of :class:`fastdit.kernels.window.WindowMask` for one tile."""
    k_t = tl.load(k_coords_ptr + cols * 3, mask=cols_ok, other=0)
    k_h = tl.load(k_coords_ptr + cols * 3 + 1, mask=cols_ok, other=0)
    k_w = tl.load(k_coords_ptr + cols * 3 + 2, mask=cols_ok, other=0)
    inside = _window_dim_ok(q_start_t, k_t, span_t, dil_t)
    inside = inside & _window_dim_ok(q_start_h, k_h, span_h, dil_h)
    inside = inside & _window_dim_ok(q_start_w, k_w, span_w, dil_w)
    inside = inside | (q_start_t < 0)[:, None] | (k_t < 0)[None, :]
    return inside & cols_ok[None, :]


@triton.jit
def _attend_kv_block(
    acc, l_i, m_i, q,
    k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
    kv_row_start, kv_len, head_dim,
    qk_scale,
    q_start_t, q_start_h, q_start_w, k_coords_ptr,
    span_t, span_h, span_w, dil_t, dil_h, dil_w,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_KV: tl.constexpr, EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INT8_QK: tl.constexpr, WINDOW: tl.constexpr,
):
    """Fold one key block (``KV_BLOCK`` rows from ``kv_row_start``) in, with pointer loads.

    ``INT8_QK``: Q and K are int8 tiles (the INT8 kernel) and ``q @ k^T`` is an int8 MMA.
    ``WINDOW``: the window mask applies (a partial block; implies ``MASK_KV``)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    for sub in tl.static_range(0, KV_BLOCK, BLOCK_N):
        # Scalar 64-bit advance, 32-bit offsets inside the tile.
        row_shift = (kv_row_start + sub).to(tl.int64)
        k_ptrs = k_base + row_shift * stride_ks + k_tile_offsets
        v_ptrs = v_base + row_shift * stride_vs + v_tile_offsets
        cols = kv_row_start + sub + offs_n
        cols_ok = cols < kv_len
        if MASK_KV:
            load_mask = cols_ok[:, None]
            if not EVEN_D:
                load_mask = load_mask & (offs_d[None, :] < head_dim)
            k = tl.load(k_ptrs, mask=load_mask, other=0.0)
            v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d[None, :] < head_dim
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        if INT8_QK:
            qk = _int8_scores(q, k)
        else:
            qk = _dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_OPERANDS)
        if WINDOW:
            visible = _window_visible(
                q_start_t, q_start_h, q_start_w, k_coords_ptr, cols, cols_ok,
                span_t, span_h, span_w, dil_t, dil_h, dil_w,
            )
            v, unseen_safe = _split_nonfinite(v, visible, acc)
        else:
            visible = cols_ok[None, :]
        acc, l_i, m_i = _fold_scores(
            acc, l_i, m_i, qk, v, visible, qk_scale, MASK_KV, DOT_PRECISION, UPCAST_OPERANDS
        )
        if WINDOW:
            acc += unseen_safe
    return acc, l_i, m_i


@triton.jit
def _split_nonfinite(v, visible, acc):
    """In a partial (window-masked) block some rows do not see a key whose value is NaN or inf,
    and ``0 * NaN`` in ``P @ V`` would still reach them. Returns ``v`` with such values set to 0
    and, per row and dim, what they add for the rows that see them (NaN, +inf or -inf; 0
    elsewhere). Only a tile holding a non-finite value pays for the three indicator products."""
    vf = v.to(tl.float32)
    finite = tl.abs(vf) < float("inf")  # False for NaN too
    added = tl.zeros_like(acc)
    if tl.max(tl.where(finite, 0, 1)) > 0:
        seen = visible.to(tl.float32)
        nan_hits = tl.dot(seen, (vf != vf).to(tl.float32), input_precision="ieee")
        plus = tl.dot(seen, (vf == float("inf")).to(tl.float32), input_precision="ieee") > 0
        minus = tl.dot(seen, (vf == float("-inf")).to(tl.float32), input_precision="ieee") > 0
        added = tl.where(plus, float("inf"), added)
        added = tl.where(minus, float("-inf"), added)
        added = tl.where((nan_hits > 0) | (plus & minus), float("nan"), added)
        v = tl.where(finite, v, tl.zeros_like(v))
    return v, added


@triton.jit
def _plan_row(
    kv_counts_ptr, kv_indices_ptr, key_lengths_ptr, batch, head, q_block,
    stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, seq_kv, HAS_KEY_LENGTHS: tl.constexpr,
):
    """The plan's row for ``(batch, head, q_block)``: key-block count, pointer to its sorted
    key-block indices, and the batch element's valid key length."""
    # stride_cb / stride_ch are 0 where the plan broadcasts over batch / heads.
    count = tl.load(kv_counts_ptr + batch * stride_cb + head * stride_ch + q_block)
    index_ptr = (
        kv_indices_ptr + batch.to(tl.int64) * stride_ib + head.to(tl.int64) * stride_ih
        + q_block.to(tl.int64) * stride_iq
    )
    kv_len = seq_kv
    if HAS_KEY_LENGTHS:
        kv_len = tl.minimum(tl.load(key_lengths_ptr + batch).to(tl.int32), seq_kv)
    return count, index_ptr, kv_len


@triton.jit
def _count_unmasked_blocks(index_ptr, count, kv_len, KV_BLOCK: tl.constexpr, EVEN_KV: tl.constexpr):
    """How many of the row's ``count`` key blocks lie entirely below ``kv_len``.

    Indices are sorted, so the blocks that reach past ``kv_len`` form a suffix of the row: the
    first ``num_unmasked`` blocks need no bounds mask.
    """
    num_unmasked = count
    if not EVEN_KV:
        full_blocks = kv_len // KV_BLOCK
        last = tl.load(index_ptr + num_unmasked - 1, mask=num_unmasked > 0, other=-1)
        while last >= full_blocks:
            num_unmasked -= 1
            last = tl.load(index_ptr + num_unmasked - 1, mask=num_unmasked > 0, other=-1)
    return num_unmasked


@triton.jit
def _normalized_output(acc, l_i, m_i):
    """``(acc / l, lse)`` with LSE in natural-log units; a row that visited no valid key gets
    output 0 and LSE -inf, never 0/0."""
    no_keys = l_i == 0.0
    l_safe = tl.where(no_keys, 1.0, l_i)
    lse = tl.where(no_keys, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


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
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)

    k_base = K + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    k_tile_offsets = offs_n[:, None] * stride_ks + offs_d[None, :]
    v_tile_offsets = offs_n[:, None] * stride_vs + offs_d[None, :]

    count, index_ptr, kv_len = _plan_row(
        kv_counts_ptr, kv_indices_ptr, key_lengths_ptr, batch, head, q_block,
        stride_cb, stride_ch, stride_ib, stride_ih, stride_iq, seq_kv, HAS_KEY_LENGTHS,
    )

    num_unmasked = _count_unmasked_blocks(index_ptr, count, kv_len, KV_BLOCK, EVEN_KV)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    if USE_TMA:
        # Hopper+: the copy engine fetches whole K/V tiles of the 2-D views
        # [B*S, H*D] (bshd) or [B*H*S, D] (bhsd); coordinates are rows, not bytes.
        if LAYOUT_BSHD:
            tma_row, tma_col = batch * seq_kv, head * BLOCK_D
        else:
            tma_row, tma_col = pid_bh * seq_kv, 0
        cols_all = tl.full([1, BLOCK_N], True, tl.int1)
        for i in range(0, num_unmasked):
            kv_row_start = tl.load(index_ptr + i) * KV_BLOCK
            for sub in tl.static_range(0, KV_BLOCK, BLOCK_N):
                k = k_desc.load([tma_row + kv_row_start + sub, tma_col])
                v = v_desc.load([tma_row + kv_row_start + sub, tma_col])
                acc, l_i, m_i = _online_softmax_step(
                    acc, l_i, m_i, q, k, v, cols_all, qk_scale, False, DOT_PRECISION,
                    UPCAST_OPERANDS,
                )
    else:
        for i in range(0, num_unmasked):
            kv_row_start = tl.load(index_ptr + i) * KV_BLOCK
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, k_base, stride_ks, v_base, stride_vs, k_tile_offsets,
                v_tile_offsets, kv_row_start, kv_len, head_dim, qk_scale,
                0, 0, 0, k_coords_ptr, 0, 0, 0, 1, 1, 1,
                KV_BLOCK, BLOCK_N, BLOCK_D, False, EVEN_D, DOT_PRECISION, UPCAST_OPERANDS, False,
                False,
            )
    for i in range(num_unmasked, count):
        kv_row_start = tl.load(index_ptr + i) * KV_BLOCK
        acc, l_i, m_i = _attend_kv_block(
            acc, l_i, m_i, q, k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
            kv_row_start, kv_len, head_dim, qk_scale,
            0, 0, 0, k_coords_ptr, 0, 0, 0, 1, 1, 1,
            KV_BLOCK, BLOCK_N, BLOCK_D, True, EVEN_D, DOT_PRECISION, UPCAST_OPERANDS, False,
            False,
        )
    if HAS_WINDOW:
        # Partial blocks: the window rule decides per (query, key) pair.
        q_rows = q_row_start + offs_m
        q_start_t = tl.load(q_start_ptr + q_rows * 3, mask=rows_ok, other=0)
        q_start_h = tl.load(q_start_ptr + q_rows * 3 + 1, mask=rows_ok, other=0)
        q_start_w = tl.load(q_start_ptr + q_rows * 3 + 2, mask=rows_ok, other=0)
        partial_count, partial_ptr, _ = _plan_row(
            partial_counts_ptr, partial_indices_ptr, key_lengths_ptr, batch, head, q_block,
            stride_pcb, stride_pch, stride_pib, stride_pih, stride_piq, seq_kv, False,
        )
        for i in range(0, partial_count):
            kv_row_start = tl.load(partial_ptr + i) * KV_BLOCK
            acc, l_i, m_i = _attend_kv_block(
                acc, l_i, m_i, q, k_base, stride_ks, v_base, stride_vs, k_tile_offsets,
                v_tile_offsets, kv_row_start, kv_len, head_dim, qk_scale,
                q_start_t, q_start_h, q_start_w, k_coords_ptr,
                span_t, span_h, span_w, dil_t, dil_h, dil_w,
                KV_BLOCK, BLOCK_N, BLOCK_D, True, EVEN_D, DOT_PRECISION, UPCAST_OPERANDS, False,
                True,
            )

    out, lse = _normalized_output(acc, l_i, m_i)
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
# has is shrunk at the first launch (see _launch_with_fallback).
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
_working_configs: dict[tuple, tuple[int, int, int, int]] = {}


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


def _shrinking(config: tuple[int, int, int, int]):
    """``config``, then smaller ones: fewer stages, then narrower key tiles, then query tiles."""
    block_m, block_n, num_warps, num_stages = config
    yield config
    for stages in range(num_stages - 1, 0, -1):
        yield block_m, block_n, num_warps, stages
    while block_n > 16 or block_m > 16:
        if block_n > 16:
            block_n //= 2
        else:
            block_m //= 2
            num_warps = 4
        yield block_m, block_n, num_warps, 1


def _launch_with_fallback(key: tuple, config: tuple[int, int, int, int], launch) -> None:
    """Launch with ``config``, or the first smaller one that fits this GPU; remember which."""
    if key in _working_configs:
        launch(*_working_configs[key])
        return
    error = None
    for candidate in _shrinking(config):
        try:
            launch(*candidate)
        except triton.runtime.errors.OutOfResources as out_of_resources:
            error = out_of_resources
            continue
        _working_configs[key] = candidate
        return
    raise RuntimeError(f"no launch configuration fits this GPU for {key=}") from error


def _strides(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, sequence) strides for a 4-D tensor in ``layout``."""
    if layout == "bshd":
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _plan_strides(plan: BlockSparsity) -> tuple[int, int, int, int, int]:
    """(count batch, count head, index batch, index head, index query-block) strides; 0 where the
    plan broadcasts over batch or heads."""
    counts, indices = plan.kv_counts, plan.kv_indices
    return (
        counts.stride(0) if counts.shape[0] > 1 else 0,
        counts.stride(1) if counts.shape[1] > 1 else 0,
        indices.stride(0) if indices.shape[0] > 1 else 0,
        indices.stride(1) if indices.shape[1] > 1 else 0,
        indices.stride(2),
    )


def _tma_view(x: torch.Tensor, layout: str, interpret: bool, dtypes=(torch.float16, torch.bfloat16)):
    """The 2-D view of K or V for tensor-descriptor loads (``[B*S, H*D]`` for bshd, ``[B*H*S, D]``
    for bhsd), or None where that path does not apply: Hopper or newer, a dtype of ``dtypes``,
    head_dim 64 or 128, contiguous, 16-byte aligned."""
    if interpret or TensorDescriptor is None or x.device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return None
    if x.dtype not in dtypes or x.shape[-1] not in (64, 128):
        return None
    if not x.is_contiguous() or x.data_ptr() % 16:
        return None
    head_dim = x.shape[-1]
    width = x.shape[2] * head_dim if layout == "bshd" else head_dim
    return x.view(-1, width)


def _tma_views(k: torch.Tensor, v: torch.Tensor, layout: str, interpret: bool):
    """2-D views of K and V for tensor-descriptor loads, or None unless both qualify."""
    k_view, v_view = _tma_view(k, layout, interpret), _tma_view(v, layout, interpret)
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
    plan_strides = _plan_strides(plan)
    tma_views = _tma_views(k, v, layout, interpret)
    if window is None:
        window_args = (counts, indices, counts, counts, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1)
    else:
        spans = tuple(w * d for w, d in zip(window.window, window.dilation))
        window_args = (
            window.partial.kv_counts, window.partial.kv_indices,
            window.query_start, window.key_coords, *_plan_strides(window.partial),
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
            *_strides(q, layout), *_strides(k, layout), *_strides(v, layout),
            *_strides(out, layout), *plan_strides,
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
            num_warps=num_warps, num_stages=num_stages,
        )

    element_bytes = q.element_size()
    config = _launch_config(block_d, plan.q_block_size, plan.kv_block_size, element_bytes, interpret)
    if interpret:
        launch(*config)
        return out, (lse if return_lse else None)
    key = (block_d, plan.q_block_size, plan.kv_block_size, q.dtype, tma_views is not None,
           window is not None, q.device.index)
    _launch_with_fallback(key, config, launch)
    return out, (lse if return_lse else None)
