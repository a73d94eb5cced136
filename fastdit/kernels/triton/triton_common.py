"""What fastdit's Triton kernels share: the online-softmax step, the key-block loops, plan rows,
bounds handling, window masks, strides, TMA views and the launch fallback.

Device functions (``@triton.jit``) are inlined into the kernels that call them. The key-block
loops, :func:`attend_kv_blocks` (pointer loads, any bounds mask, the window rule) and
:func:`attend_kv_blocks_tma` (Hopper tensor-descriptor loads of whole tiles), and
:func:`attend_plan_row` (a plan row: its unmasked blocks, then its masked suffix) serve both the
bf16 kernel (:mod:`fastdit.kernels.triton.attention`) and the INT8 one
(:mod:`fastdit.kernels.triton.int8_attention`): constexpr switches passed by keyword (``USE_TMA``,
``MASK_KV``, ``INT8_QK``, ``WINDOW``, ``FP8_PV``/``FP8_ACC``/``V_T``, ``WARP_SPECIALIZE``) select
what each loop compiles, so a switched-off feature costs no instruction. The switches are ordinary
parameters passed by keyword, never keyword-only (``*``): Triton 3.6 binds only
positional-or-keyword parameters of a device function (a keyword-only constexpr is undefined in
its body there, while the interpreter accepts it).

Names follow the flash-attention papers: ``m_i`` running max in log2 units, ``l_i`` running sum,
``acc`` unnormalised output, ``qk_scale = scale * log2(e)`` (exponentials use ``exp2``).
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import os

import torch
import triton
import triton.language as tl

from ..plan import BlockSparsity
from ..quantized import P_SCALE, SCORE_OFFSET as SCORE_OFFSET_VALUE
from .allocation import allocator_unavailable

try:  # host-side tensor descriptors (TMA), Triton >= 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = [
    "LOG2E",
    "TensorDescriptor",
    "WARP_SPECIALIZED_CONFIG",
    "WARP_SPECIALIZE_ENV",
    "attend_kv_block",
    "attend_kv_blocks",
    "attend_kv_blocks_tma",
    "attend_plan_row",
    "count_unmasked_blocks",
    "dot",
    "e4m3_round",
    "fold_scores",
    "fp8_pv",
    "hopper_unsupported",
    "int8_offset_scores",
    "launch_with_fallback",
    "load_q_tile",
    "normalized_output",
    "plan_row",
    "plan_strides",
    "scores",
    "strides",
    "tma_device",
    "tma_view",
    "warp_specialization_skipped",
    "warp_specialize_setting",
    "window_visible",
    "working_launch_configs",
]

LOG2E = 1.4426950408889634
# int8_offset_scores' int32 -> fp32 offset: s + 0x4B400000 read as fp32 is SCORE_OFFSET + s.
SCORE_OFFSET = tl.constexpr(SCORE_OFFSET_VALUE)
# P times P_SCALE (448, e4m3's largest finite value) as an exponent: the FP8 P.V
# computes exp2(x + LOG2_P_SCALE) = 448 exp2(x) directly.
LOG2_P_SCALE = tl.constexpr(math.log2(P_SCALE))


# --------------------------------------------------------------------------- device functions
@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """``acc + a @ b``; ``UPCAST_OPERANDS`` works around the Triton CPU interpreter's wrong
    results for bf16 ``tl.dot`` (seen with Triton 3.9) and is never set on a GPU (the FP8 path
    uses it to round to e4m3 before the interpreter's cast, :func:`e4m3_round`)."""
    if UPCAST_OPERANDS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def int8_offset_scores(q, k):
    """``SCORE_OFFSET + q @ k^T`` of int8 tiles, as a real int8 x int8 -> int32 MMA, in fp32.

    The int32 -> fp32 conversion uses no conversion instruction (those run at a sixteenth of the
    FMA rate, like the exponentials): ``s + 0x4B400000`` read as fp32 is exactly
    ``1.5 * 2**23 + s`` (:data:`SCORE_OFFSET` + ``s``) for ``|s| < 2**22``. An int8 dot over
    head_dim <= 256 (``MAX_HEAD_DIM``) is at most ``127 * 127 * 256 < 2**22`` in magnitude, so this
    is exact; on an H100 it made the INT8 kernel 1-3% faster
    (``benchmarks/results/h100_2026-11-23/tune_int8_run2_*.json``). The offset is not subtracted
    here: :func:`fold_scores` (``OFFSET_SCORES``) folds it into its one FMA per score."""
    s = tl.dot(q, tl.trans(k), out_dtype=tl.int32)
    return (s + 0x4B400000).to(tl.float32, bitcast=True)


@triton.jit
def scores(q, k, INT8_QK: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """Raw scores ``q @ k^T`` of one tile. ``INT8_QK`` (the quantized kernel: per-block scales):
    an int8 MMA for int8 tiles, returned as ``SCORE_OFFSET + q @ k^T``
    (:func:`int8_offset_scores`; pass ``OFFSET_SCORES=q.dtype == tl.int8`` to :func:`fold_scores`),
    an FP8 MMA with an fp32 result for e4m3 tiles (``quantize="fp8"``; the tiles' dtype picks,
    at compile time)."""
    if INT8_QK:
        if q.dtype == tl.int8:  # SCORE_OFFSET + q @ k^T: fold_scores subtracts the offset
            qk = int8_offset_scores(q, k)
        elif UPCAST_OPERANDS:  # the interpreter: e4m3 -> fp32 is exact there, fp32 products
            qk = tl.dot(q.to(tl.float32), tl.trans(k).to(tl.float32), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
    else:
        qk = dot(q, tl.trans(k), None, DOT_PRECISION, UPCAST_OPERANDS)
    return qk


@triton.jit
def e4m3_round(x):
    """``x`` (fp32, ``|x| <= 448``) rounded to the nearest e4m3 value, ties to even, subnormals
    kept: what the GPU's ``x.to(tl.float8e4nv)`` does, in fp32 arithmetic. The Triton CPU
    interpreter's own cast loses the carry into the exponent (7.9 becomes 4, 127 becomes 64, seen
    with Triton 3.9) and flushes subnormals; kernels round with this first under the interpreter,
    after which its cast is exact."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    ulp_exponent = tl.maximum(exponent, -6) - 3  # 3 mantissa bits; subnormals below 2**-6
    ulp = ((ulp_exponent + 127) << 23).to(tl.float32, bitcast=True)
    return ((x / ulp + 12582912.0) - 12582912.0) * ulp  # 1.5 * 2**23: round half to even


@triton.jit
def fp8_pv(acc, p8, v, FP8_ACC: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """``acc + p8 @ v`` as an FP8 e4m3 MMA, fp32 accumulation (the int8-fp8 mode).

    ``p8`` is the online softmax's fp32 tile already times :data:`P_SCALE` (448, e4m3's largest
    finite value: :func:`fold_scores` computes ``exp2(x + LOG2_P_SCALE)``), so it spans e4m3's
    range and its largest entries keep e4m3's full 3-bit mantissa; ``l`` sums the same values,
    so ``acc / l`` needs no division by 448. ``v`` is e4m3, quantized per channel; the kernel
    applies V's channel scales once, after the loop.

    Hopper's FP8 MMA adds its products with less than fp32 precision. ``FP8_ACC = 0``: two-level
    accumulation (SageAttention2): the tile's product goes to a fresh fp32 register tile, then one
    fp32 addition into ``acc`` (Triton never folds that addition into the MMA for fp8 operands on
    sm_90: its default ``max_num_imprecise_acc`` there is 2**30). ``FP8_ACC = n > 0``: one MMA
    into ``acc`` with ``max_num_imprecise_acc=n`` (Triton promotes to fp32 every ``n`` products
    along the keys; ``n`` at most the tile's ``BLOCK_N``). ``FP8_ACC = -1``: one MMA into ``acc``
    with Triton's default (on sm_90 no promotion at all: fastest, least precise)."""
    if UPCAST_OPERANDS:  # the interpreter (see e4m3_round)
        p8 = e4m3_round(p8)
    p8 = p8.to(tl.float8e4nv)
    if FP8_ACC == 0:
        return acc + tl.dot(p8, v)
    if FP8_ACC < 0:
        return tl.dot(p8, v, acc)
    return tl.dot(p8, v, acc, max_num_imprecise_acc=FP8_ACC)


@triton.jit
def fold_scores(
    acc, l_i, m_i, qk, v, visible, qk_scale,
    MASK_KV: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    FP8_PV: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, OFFSET_SCORES: tl.constexpr = False,
):
    """Fold a ``[BLOCK_M, BLOCK_N]`` tile of raw scores ``qk`` (``qk * qk_scale`` in log2 units)
    and its values into the running softmax state: the online-softmax update shared by every
    attention kernel (P is cast to V's dtype for ``P @ V``, accumulated in fp32; with ``FP8_PV``
    V is an e4m3 tile and :func:`fp8_pv` runs ``P @ V`` in FP8 on ``P`` times 448, which ``l``
    then carries too). ``visible`` (``[1, BLOCK_N]`` or ``[BLOCK_M, BLOCK_N]``) masks scores
    when ``MASK_KV``. ``OFFSET_SCORES``: ``qk`` is :func:`int8_offset_scores`' form
    (:data:`SCORE_OFFSET` + the scores).

    The running max ``m`` is kept in log2 units of the true scores; the offset (times the
    scale) and FP8's factor 448 go into one per-row bias, so each score costs one FMA before
    its exponential (on an H200 this made the FP8 loop 13% faster, ``benchmarks/fp8_bound.py``)."""
    if MASK_KV:
        qk = tl.where(visible, qk, float("-inf"))
    if OFFSET_SCORES:  # explicit FMAs: one rounding on a GPU and the interpreter alike (the
        # offset form's products are ~2**23 times the scale; the tile model rounds them once too)
        row_max = tl.fma(tl.max(qk, 1), qk_scale, -(SCORE_OFFSET * qk_scale))
    else:
        row_max = tl.max(qk, 1) * qk_scale
    m_ij = tl.maximum(m_i, row_max)
    if MASK_KV:
        # A row that has seen no valid key keeps m = -inf; subtract 0 instead (no NaN).
        m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
    else:
        m_shift = m_ij
    bias = m_shift
    if OFFSET_SCORES:  # an explicit FMA here too (a compiler would contract it or not)
        bias = tl.fma(SCORE_OFFSET, qk_scale, bias)
    if FP8_PV:
        bias = bias - LOG2_P_SCALE
    if OFFSET_SCORES:
        p = tl.math.exp2(tl.fma(qk, qk_scale, -bias[:, None]))
    else:
        p = tl.math.exp2(qk * qk_scale - bias[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if FP8_PV:
        acc = fp8_pv(acc, p, v, FP8_ACC, UPCAST_OPERANDS)
    else:
        acc = dot(p.to(v.dtype), v, acc, DOT_PRECISION, UPCAST_OPERANDS)
    return acc, l_i, m_ij


@triton.jit
def _window_dim_ok(start, coord, span, dilation, DILATED: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]``: key coordinate inside the query's window in one dimension.
    ``DILATED``: some dimension has a dilation above 1; without it the integer remainder (tens
    of instructions per pair on a GPU) is not computed."""
    delta = coord[None, :] - start[:, None]
    inside = (delta >= 0) & (delta < span)
    if DILATED:
        inside = inside & (delta % dilation == 0)
    return inside


@triton.jit
def window_visible(
    q_start_t, q_start_h, q_start_w, k_coords_ptr, cols, cols_ok,
    span_t, span_h, span_w, dil_t, dil_h, dil_w, DILATED: tl.constexpr = True,
):
    """The factorised window rule of :class:`fastdit.kernels.window.WindowMask` for one tile
    (``DILATED``: see :func:`_window_dim_ok`)."""
    k_t = tl.load(k_coords_ptr + cols * 3, mask=cols_ok, other=0)
    k_h = tl.load(k_coords_ptr + cols * 3 + 1, mask=cols_ok, other=0)
    k_w = tl.load(k_coords_ptr + cols * 3 + 2, mask=cols_ok, other=0)
    inside = _window_dim_ok(q_start_t, k_t, span_t, dil_t, DILATED)
    inside = inside & _window_dim_ok(q_start_h, k_h, span_h, dil_h, DILATED)
    inside = inside & _window_dim_ok(q_start_w, k_w, span_w, dil_w, DILATED)
    inside = inside | (q_start_t < 0)[:, None] | (k_t < 0)[None, :]
    return inside & cols_ok[None, :]


@triton.jit
def attend_kv_block(
    acc, l_i, m_i, q,
    k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
    kv_row_start, kv_len, head_dim, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KV: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    INT8_QK: tl.constexpr = False, WINDOW: tl.constexpr = False,
    q_start_t=0, q_start_h=0, q_start_w=0, k_coords_ptr=None,
    span_t=0, span_h=0, span_w=0, dil_t=1, dil_h=1, dil_w=1,
    FP8_PV: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, V_T: tl.constexpr = False,
    DILATED: tl.constexpr = True,
):
    """Fold one key block (``KV_BLOCK`` rows from ``kv_row_start``) in, with pointer loads.

    ``MASK_KV``: keys at or past ``kv_len`` are masked (the ragged last block, key padding).
    ``INT8_QK``: Q and K are int8 tiles (the INT8 kernel) and ``q @ k^T`` is an int8 MMA.
    ``WINDOW``: the window rule of the ``q_start_*``/``k_coords_ptr``/``span_*``/``dil_*``
    arguments applies (a partial block; needs ``MASK_KV``); they are unused otherwise.
    ``FP8_PV``/``FP8_ACC``: V is e4m3 and ``P @ V`` runs in FP8 (:func:`fp8_pv`). ``V_T``: V is
    stored transposed (``[D, S]``, keys contiguous: ``v_tile_offsets`` is ``[BLOCK_D, BLOCK_N]``
    and ``stride_vs`` is 1), the K-major B operand Hopper's FP8 MMA reads."""
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
            if V_T:
                v_mask = cols_ok[None, :]
                if not EVEN_D:
                    v_mask = v_mask & (offs_d[:, None] < head_dim)
                v = tl.load(v_ptrs, mask=v_mask, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=load_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            d_ok = offs_d[None, :] < head_dim
            k = tl.load(k_ptrs, mask=d_ok, other=0.0)
            if V_T:
                v = tl.load(v_ptrs, mask=offs_d[:, None] < head_dim, other=0.0)
            else:
                v = tl.load(v_ptrs, mask=d_ok, other=0.0)
        if V_T:
            v = tl.trans(v)
        qk = scores(q, k, INT8_QK, DOT_PRECISION, UPCAST_OPERANDS)
        if WINDOW:
            visible = window_visible(
                q_start_t, q_start_h, q_start_w, k_coords_ptr, cols, cols_ok,
                span_t, span_h, span_w, dil_t, dil_h, dil_w, DILATED,
            )
        else:
            visible = cols_ok[None, :]
        acc, l_i, m_i = fold_scores(
            acc, l_i, m_i, qk, v, visible, qk_scale, MASK_KV, DOT_PRECISION, UPCAST_OPERANDS,
            FP8_PV, FP8_ACC, OFFSET_SCORES=q.dtype == tl.int8,
        )
    return acc, l_i, m_i


@triton.jit
def _kv_block_start(index_ptr, i, qk_scale, k_scale_row, KV_BLOCK: tl.constexpr, INT8_QK: tl.constexpr):
    """First key row of the ``i``-th key block of a plan row, and the scale of its scores: with
    ``INT8_QK`` the query block's ``qk_scale`` times the key block's own (from ``k_scale_row``)."""
    kv_block = tl.load(index_ptr + i)
    kv_row_start = kv_block * KV_BLOCK
    block_scale = qk_scale
    if INT8_QK:
        block_scale = qk_scale * tl.load(k_scale_row + kv_block)
    return kv_row_start, block_scale


@triton.jit
def attend_kv_blocks(
    acc_in, l_in, m_in, q, index_ptr, first, last,
    k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
    kv_len, head_dim, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_KV: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    INT8_QK: tl.constexpr = False, WINDOW: tl.constexpr = False, k_scale_row=None,
    q_start_t=0, q_start_h=0, q_start_w=0, k_coords_ptr=None,
    span_t=0, span_h=0, span_w=0, dil_t=1, dil_h=1, dil_w=1,
    FP8_PV: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, V_T: tl.constexpr = False,
    DILATED: tl.constexpr = True,
):
    """The key-block loop: entries ``first .. last - 1`` of a plan row (``index_ptr``), each folded
    in by :func:`attend_kv_block` with pointer loads.

    With ``INT8_QK``, ``qk_scale`` is the query block's scale and each key block's own scale is
    read from ``k_scale_row`` (the INT8 kernel's per-block dequantization); otherwise
    ``qk_scale`` is ``scale * log2(e)`` for every block. The other switches are
    :func:`attend_kv_block`'s."""
    # The loop carries (m_i, l_i, acc) in this order, as the kernels' own loops did: Triton
    # orders loop-carried values by first definition, so this keeps the generated code.
    m_i, l_i, acc = m_in, l_in, acc_in
    for i in range(first, last):
        kv_row_start, block_scale = _kv_block_start(
            index_ptr, i, qk_scale, k_scale_row, KV_BLOCK, INT8_QK
        )
        acc, l_i, m_i = attend_kv_block(
            acc, l_i, m_i, q, k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
            kv_row_start, kv_len, head_dim, block_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASK_KV=MASK_KV, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK,
            WINDOW=WINDOW, q_start_t=q_start_t, q_start_h=q_start_h, q_start_w=q_start_w,
            k_coords_ptr=k_coords_ptr, span_t=span_t, span_h=span_h, span_w=span_w,
            dil_t=dil_t, dil_h=dil_h, dil_w=dil_w, FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T,
            DILATED=DILATED,
        )
    return acc, l_i, m_i


@triton.jit
def _attend_kv_block_tma(
    acc, l_i, m_i, q, index_ptr, i, k_desc, v_desc, k_row, k_col, v_row, v_col, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INT8_QK: tl.constexpr, k_scale_row,
    FP8_PV: tl.constexpr, FP8_ACC: tl.constexpr, V_T: tl.constexpr,
    MASK_KV: tl.constexpr, kv_len,
):
    """Fold the ``i``-th key block of a plan row in, with tensor-descriptor loads (the body of
    :func:`attend_kv_blocks_tma`)."""
    kv_row_start, block_scale = _kv_block_start(
        index_ptr, i, qk_scale, k_scale_row, KV_BLOCK, INT8_QK
    )
    for sub in tl.static_range(0, KV_BLOCK, BLOCK_N):
        k = k_desc.load([k_row + kv_row_start + sub, k_col])
        if V_T:
            v = tl.trans(v_desc.load([v_row, v_col + kv_row_start + sub]))
        else:
            v = v_desc.load([v_row + kv_row_start + sub, v_col])
        qk = scores(q, k, INT8_QK, DOT_PRECISION, UPCAST_OPERANDS)
        visible = None
        if MASK_KV:
            visible = (kv_row_start + sub + tl.arange(0, BLOCK_N) < kv_len)[None, :]
        acc, l_i, m_i = fold_scores(
            acc, l_i, m_i, qk, v, visible, block_scale, MASK_KV, DOT_PRECISION, UPCAST_OPERANDS,
            FP8_PV, FP8_ACC, OFFSET_SCORES=q.dtype == tl.int8,
        )
    return acc, l_i, m_i


@triton.jit
def attend_kv_blocks_tma(
    acc_in, l_in, m_in, q, index_ptr, first, last,
    k_desc, v_desc, k_row, k_col, v_row, v_col, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr, INT8_QK: tl.constexpr = False, k_scale_row=None,
    FP8_PV: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, V_T: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False, MASK_KV: tl.constexpr = False, kv_len=0,
):
    """The key-block loop with Hopper tensor-descriptor loads. K tiles are read at rows
    ``k_row + kv row`` of column ``k_col`` of K's 2-D view, V tiles likewise (with ``V_T``, V's
    view is transposed: its tiles are ``[BLOCK_D, BLOCK_N]`` at row ``v_row``, column
    ``v_col + kv row``); the switches are :func:`attend_kv_blocks`'s. Without ``MASK_KV`` the
    blocks must lie entirely below the valid key length; with it, scores of keys at or past
    ``kv_len`` are masked, while the tiles are read whole, so the values of those keys (the next
    rows of the 2-D view, or zeros past its end) must be finite.

    ``WARP_SPECIALIZE`` (:data:`WARP_SPECIALIZE`) compiles the loop as
    ``tl.range(first, last, warp_specialize=True)``: Triton's automatic warp specialization
    (on Hopper, Triton >= 3.5) may split it into a TMA producer and MMA/softmax consumer warp
    groups. It is a separate loop so that, switched off, the kernel is exactly the plain one on
    any Triton (``warp_specialize`` is not a ``tl.range`` parameter of the oldest supported)."""
    # The loop carries (m_i, l_i, acc) in this order, as the kernels' own loops did: Triton
    # orders loop-carried values by first definition, so this keeps the generated code.
    m_i, l_i, acc = m_in, l_in, acc_in
    if WARP_SPECIALIZE:
        for i in tl.range(first, last, warp_specialize=True):
            acc, l_i, m_i = _attend_kv_block_tma(
                acc, l_i, m_i, q, index_ptr, i, k_desc, v_desc, k_row, k_col, v_row, v_col,
                qk_scale,
                KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
                UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK, k_scale_row=k_scale_row,
                FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T, MASK_KV=MASK_KV, kv_len=kv_len,
            )
    else:
        for i in range(first, last):
            acc, l_i, m_i = _attend_kv_block_tma(
                acc, l_i, m_i, q, index_ptr, i, k_desc, v_desc, k_row, k_col, v_row, v_col,
                qk_scale,
                KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
                UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK, k_scale_row=k_scale_row,
                FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T, MASK_KV=MASK_KV, kv_len=kv_len,
            )
    return acc, l_i, m_i


@triton.jit
def attend_plan_row(
    acc, l_i, m_i, q, index_ptr, num_unmasked, count,
    k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
    kv_len, head_dim, qk_scale, k_desc, v_desc, k_row, k_col, v_row, v_col,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr, USE_TMA: tl.constexpr,
    INT8_QK: tl.constexpr = False, k_scale_row=None,
    FP8_PV: tl.constexpr = False, FP8_ACC: tl.constexpr = 0, V_T: tl.constexpr = False,
    WARP_SPECIALIZE: tl.constexpr = False, EVEN_KV: tl.constexpr = False,
    TMA_TAIL: tl.constexpr = False,
):
    """All ``count`` key blocks of a plan row: the first ``num_unmasked`` (entirely below the
    valid key length, :func:`count_unmasked_blocks`) without a bounds mask, by tensor-descriptor
    loads with ``USE_TMA`` (``k_desc``/``v_desc`` at ``k_row``/``k_col``, ``v_row``/``v_col``)
    or pointer loads; the rest with the mask, by pointer loads, or with ``TMA_TAIL`` (needs
    ``USE_TMA``) by the tensor descriptors too, the tiles read whole and their scores masked
    (see :func:`attend_kv_blocks_tma`: the values past ``kv_len`` must be finite, as the FP8
    modes' own quantized K and V are). The pointer-loaded tail keeps its ``[BLOCK_N, BLOCK_D]``
    offset tensors alive through the kernel: on sm_90 the FP8 kernels took 245-255 registers
    with it and 164-167 without. Arguments as in :func:`attend_kv_blocks`.

    ``WARP_SPECIALIZE`` (:data:`WARP_SPECIALIZE`; needs ``USE_TMA`` and Q loaded by TMA too):
    the whole row in one warp-specialized tensor-descriptor loop, every block masked by
    ``kv_len`` unless ``EVEN_KV`` (``num_unmasked`` is unused): Triton's Hopper pass fails on a
    kernel with a second loop of ``tl.dot`` (with pointer loads, triton-lang/triton#9728, or
    tensor-descriptor ones) or a while loop (:func:`count_unmasked_blocks`)."""
    if WARP_SPECIALIZE:
        return attend_kv_blocks_tma(
            acc, l_i, m_i, q, index_ptr, 0, count,
            k_desc, v_desc, k_row, k_col, v_row, v_col, qk_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
            UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK, k_scale_row=k_scale_row,
            FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T, WARP_SPECIALIZE=True,
            MASK_KV=not EVEN_KV, kv_len=kv_len,
        )
    if USE_TMA:
        acc, l_i, m_i = attend_kv_blocks_tma(
            acc, l_i, m_i, q, index_ptr, 0, num_unmasked,
            k_desc, v_desc, k_row, k_col, v_row, v_col, qk_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
            UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK, k_scale_row=k_scale_row,
            FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T,
        )
    else:
        acc, l_i, m_i = attend_kv_blocks(
            acc, l_i, m_i, q, index_ptr, 0, num_unmasked,
            k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
            kv_len, head_dim, qk_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASK_KV=False, EVEN_D=EVEN_D,
            DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK,
            k_scale_row=k_scale_row, FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T,
        )
    if USE_TMA and TMA_TAIL:
        return attend_kv_blocks_tma(
            acc, l_i, m_i, q, index_ptr, num_unmasked, count,
            k_desc, v_desc, k_row, k_col, v_row, v_col, qk_scale,
            KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, DOT_PRECISION=DOT_PRECISION,
            UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK, k_scale_row=k_scale_row,
            FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T, MASK_KV=True, kv_len=kv_len,
        )
    return attend_kv_blocks(
        acc, l_i, m_i, q, index_ptr, num_unmasked, count,
        k_base, stride_ks, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
        kv_len, head_dim, qk_scale,
        KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, MASK_KV=True, EVEN_D=EVEN_D,
        DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, INT8_QK=INT8_QK,
        k_scale_row=k_scale_row, FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T,
    )


@triton.jit
def plan_row(
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
def count_unmasked_blocks(index_ptr, count, kv_len, KV_BLOCK: tl.constexpr, EVEN_KV: tl.constexpr):
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
def load_q_tile(
    q_base, stride_qs, seq_q, q_row_start, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The ``[BLOCK_M, BLOCK_D]`` query tile at row ``q_row_start`` of the ``[seq_q, BLOCK_D]``
    matrix at ``q_base`` (row stride ``stride_qs``, 16-byte aligned), by a tensor descriptor
    built on the device; rows past ``seq_q`` read as zeros. The warp-specialized kernels load Q
    this way: Triton's Hopper pass fails on a pointer-loaded MMA operand, and it splits the tile
    between its two consumer warp groups, which a host-built descriptor's fixed block forbids."""
    desc = tl.make_tensor_descriptor(
        q_base, shape=[seq_q, BLOCK_D], strides=[stride_qs, 1], block_shape=[BLOCK_M, BLOCK_D]
    )
    return desc.load([q_row_start, 0])


@triton.jit
def normalized_output(acc, l_i, m_i):
    """``(acc / l, lse)`` with LSE in natural-log units; a row that visited no valid key gets
    output 0 and LSE -inf, never 0/0."""
    no_keys = l_i == 0.0
    l_safe = tl.where(no_keys, 1.0, l_i)
    lse = tl.where(no_keys, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    return acc / l_safe[:, None], lse


# --------------------------------------------------------------------------- host side
# Hopper automatic warp specialization, an experiment (off by default; benchmarks/fp8_tune.py
# times it). True runs the bf16 and quantized kernels' plan rows in one tensor-descriptor loop
# tl.range(..., warp_specialize=True), which Triton >= 3.5 splits on Hopper into a TMA producer
# warp group and two consumer groups (MMAs and softmax). Triton's pass accepts only such a
# kernel: Q loaded by a device-built descriptor (load_q_tile; on a GPU its launch needs Triton's
# allocator, which allocation.scoped_allocator provides for that launch only), no while loop
# and no second loop of tl.dot, so the row's last block is masked inside the loop
# (attend_plan_row). It applies where warp_specialization_skipped finds no reason and Q, K and
# V have tensor-descriptor views (contiguous, 16-byte aligned); on the CPU interpreter, which
# ignores warp_specialize, the loop's arithmetic runs. Elsewhere the plain kernels run; off,
# the kernels are the plain ones on any Triton. The environment variable
# FASTDIT_WARP_SPECIALIZE=0 or 1, where set, takes precedence (warp_specialize_setting).
WARP_SPECIALIZE = False
WARP_SPECIALIZE_ENV = "FASTDIT_WARP_SPECIALIZE"
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of the warp-specialized kernels: 128-row query tiles
# on 4 warps, which Triton's Hopper pass splits between two consumer warp groups of 64 rows
# (FA3's layout) and a TMA producer group, 12 warps in all. With 64-row tiles Triton 3.6 gives
# both consumer groups the same rows (twice the work); with 8 warps it does not specialize.
WARP_SPECIALIZED_CONFIG = (128, 128, 4, 2)

# Triton releases (major.minor) whose warp-specialized kernels gave wrong outputs on a GPU, with
# the date of the ``gpu_check --warp-specialize`` run on an H200 that showed it:
# * 3.6 (benchmarks/results/h200_2026-12-02_run6/): every check that ran warp-specialized failed
#   (bf16 errors up to 1.6e29, LSE off by up to 9.7, NaN in INT8/FP8, one ConvertNVGPUToLLVM
#   compile failure); every other check passed.
# * 3.9 (benchmarks/results/h200_2026-12-03_run8/triton39_ws/): the same pattern, 61 failures,
#   all warp-specialized, in the 432 checks that ran before the step's time limit (outputs off
#   by up to 7.9e37 or NaN, LSE by up to 144, five ConvertNVGPUToLLVM compile failures).
# On these releases the switch is refused with a logged warning and the plain kernels run.
WARP_SPECIALIZE_WRONG_TRITON = {"3.6": "2026-12-02", "3.9": "2026-12-03"}

logger = logging.getLogger(__name__)


def warp_specialize_setting() -> bool:
    """Whether the warp-specialized kernels are wanted where they apply: the environment
    variable ``FASTDIT_WARP_SPECIALIZE`` (``0`` or ``1``) where it is set and not empty, else
    :data:`WARP_SPECIALIZE` (a bool)."""
    value = os.environ.get(WARP_SPECIALIZE_ENV, "").strip()
    if value:
        if value not in ("0", "1"):
            raise ValueError(f"{WARP_SPECIALIZE_ENV} must be 0 or 1, got {value!r}")
        return value == "1"
    if not isinstance(WARP_SPECIALIZE, bool):
        raise ValueError(f"WARP_SPECIALIZE must be True or False, got {WARP_SPECIALIZE!r}")
    return WARP_SPECIALIZE


@functools.cache
def _range_has_warp_specialize() -> bool:
    return "warp_specialize" in inspect.signature(tl.range).parameters


@functools.cache
def _wrong_on_this_triton() -> str | None:
    """Why this Triton's warp-specialized kernels are refused (logged once), or None."""
    release = ".".join(triton.__version__.split(".")[:2])
    if release not in WARP_SPECIALIZE_WRONG_TRITON:
        return None
    reason = (f"Triton {release} gives wrong outputs with it (gpu_check --warp-specialize on an "
              f"H200, {WARP_SPECIALIZE_WRONG_TRITON[release]}); the plain kernel runs")
    logger.warning("fastdit: warp specialization is switched on but refused: %s", reason)
    return reason


def hopper_unsupported(device: torch.device) -> str | None:
    """``None`` on a Hopper GPU (compute capability 9.x), where the warp-specialized kernels
    were tuned and measured (:data:`WARP_SPECIALIZED_CONFIG`), else why not."""
    if device.type != "cuda":
        return f"needs a Hopper GPU, got device {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return f"needs a Hopper GPU (compute capability 9.x), got {major}.{minor}"
    return None


def warp_specialization_skipped(
    device: torch.device, dtype: torch.dtype, head_dim: int, *, q_block_size: int,
    kv_block_size: int, key_padding: bool, window: bool, quantized: bool, interpret: bool,
) -> str | None:
    """Why the warp-specialized kernels do not run such a call, or None where they do (given
    tensor-descriptor views: contiguous, 16-byte aligned inputs). ``quantized``: the INT8/FP8
    kernel (its Q and K are int8 or e4m3 whatever ``dtype``). ``interpret``: the CPU
    interpreter, which runs the loop's arithmetic without specializing (no GPU needed)."""
    if not warp_specialize_setting():
        if os.environ.get(WARP_SPECIALIZE_ENV, "").strip():
            return f"turned off ({WARP_SPECIALIZE_ENV}=0)"
        return "turned off (triton_common.WARP_SPECIALIZE is False)"
    if not _range_has_warp_specialize():
        return (f"Triton {triton.__version__} has no tl.range(..., warp_specialize=...) "
                "(Triton >= 3.5 has)")
    if TensorDescriptor is None:
        return f"Triton {triton.__version__} has no tensor descriptors (Triton >= 3.4 has)"
    unavailable = allocator_unavailable()
    if unavailable is not None:
        return unavailable
    not_hopper = None if interpret else hopper_unsupported(device)
    if not_hopper is not None:
        return not_hopper
    wrong = None if interpret else _wrong_on_this_triton()
    if wrong is not None:
        return wrong
    if not quantized and dtype not in (torch.float16, torch.bfloat16):
        return f"needs fp16 or bf16 inputs (tensor-descriptor loads), got {dtype}"
    if head_dim not in (64, 128):
        return f"needs head_dim 64 or 128 (tensor-descriptor loads), got {head_dim}"
    if q_block_size % 128 or kv_block_size % 128:
        return ("needs 128-token query and key blocks (64-row tiles repeat work in Triton's "
                f"consumer groups), got {q_block_size} and {kv_block_size}")
    if key_padding:
        return "key padding: the loop reads each row's last key block whole"
    if window:
        return "window-mask partial blocks need the plain kernel's masked loop"
    return None


# Launch key -> the configuration that fitted this GPU at its first launch (see
# launch_with_fallback). Tuning scripts clear it to measure a configuration afresh.
working_launch_configs: dict[tuple, tuple[int, int, int, int]] = {}


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


def launch_with_fallback(key: tuple, config: tuple[int, int, int, int], launch) -> None:
    """Launch with ``config`` (``(BLOCK_M, BLOCK_N, num_warps, num_stages)``), or the first
    smaller one that fits this GPU; remember which under ``key``."""
    if key in working_launch_configs:
        launch(*working_launch_configs[key])
        return
    error = None
    for candidate in _shrinking(config):
        try:
            launch(*candidate)
        except triton.runtime.errors.OutOfResources as out_of_resources:
            error = out_of_resources
            continue
        working_launch_configs[key] = candidate
        return
    raise RuntimeError(f"no launch configuration fits this GPU for {key=}") from error


def strides(x: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """(batch, head, sequence) strides for a 4-D tensor in ``layout``."""
    if layout == "bshd":
        return x.stride(0), x.stride(2), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def plan_strides(plan: BlockSparsity) -> tuple[int, int, int, int, int]:
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


def tma_device(x: torch.Tensor, interpret: bool, on_interpreter: bool = False) -> bool:
    """Whether ``x``'s device runs tensor-descriptor loads: Hopper or newer, or the CPU
    interpreter when ``on_interpreter``."""
    if TensorDescriptor is None:
        return False
    if interpret:
        return on_interpreter
    return x.device.type == "cuda" and torch.cuda.get_device_capability(x.device)[0] >= 9


def tma_view(
    x: torch.Tensor, layout: str, interpret: bool, dtypes=(torch.float16, torch.bfloat16),
    on_interpreter: bool = False,
):
    """The 2-D view of Q, K or V for tensor-descriptor loads (``[B*S, H*D]`` for bshd,
    ``[B*H*S, D]`` for bhsd), or None where that path does not apply: Hopper or newer (or the
    CPU interpreter, which runs tensor-descriptor loads too, with ``on_interpreter``), a dtype of
    ``dtypes``, head_dim 64 or 128, contiguous, 16-byte aligned."""
    if not tma_device(x, interpret, on_interpreter):
        return None
    if x.dtype not in dtypes or x.shape[-1] not in (64, 128):
        return None
    if not x.is_contiguous() or x.data_ptr() % 16:
        return None
    head_dim = x.shape[-1]
    width = x.shape[2] * head_dim if layout == "bshd" else head_dim
    return x.view(-1, width)
