"""Block-sparse attention with INT8 Q and K: the Triton kernel and its launcher.

Inputs are a :class:`~fastdit.kernels.quantized.QuantizedQK` (int8 ``Q_q``, ``K_q`` contiguous
``(B, H, S, D)``, fp32 per-block scales ``sq`` and ``sk``, K smoothed by its mean ``mu``, see
:mod:`fastdit.kernels.triton.quantize`) and V in fp16/bf16, ``"bshd"`` or ``"bhsd"``. For every batch
``b``, head ``h`` and query row ``i`` in query block ``p``, over the key blocks ``c`` of
``plan[b, h, p]`` and keys ``j < kv_len``::

    s2_ij  = (Q_q[i] . K_q[j]) * sq[p] * sk[c]      int8 x int8 -> int32 MMA, then fp32;
                                                    sq holds scale * log2(e): s2 is in log2 units
    out_i  = sum_j exp2(s2_ij - m_i) v_j / sum_j exp2(s2_ij - m_i)
    lse_i  = ln 2 * (m_i + log2 sum_j exp2(s2_ij - m_i)) + scale * q_i . mu

``s2_ij / log2(e)`` approximates ``scale * q_i . (k_j - mu)``, i.e. the exact scores shifted by the
row constant ``-scale * q_i . mu``: the softmax (and so the output) ignores it, the LSE gets it
back from ``lse_shift``. The online softmax is the bf16 kernel's (``_fold_scores``: exp2, running
max ``m_i`` and sum ``l_i``); P is cast to V's dtype for ``P @ V`` with fp32 accumulation (an fp16
accumulator there caused black frames in SageAttention users' bf16 models).

Plans, bounds handling (the masked suffix of each row), 64-bit offsets, Hopper TMA loads and the
key-block loops are the bf16 kernel's, shared through :mod:`fastdit.kernels.triton.triton_common`
(``INT8_QK=True`` switches the loops to int8 scores and per-key-block scales).

``quantize="fp8"``: Q and K arrive in e4m3 (same per-block scales over 448 instead of 127) and
``Q_q . K_q`` is an FP8 MMA with an fp32 result (:func:`~fastdit.kernels.triton.triton_common.scores`
picks the MMA by the tiles' dtype); everything else is ``"int8-fp8"``'s.

``quantize="int8-fp8"`` (``FP8_PV=True``): V arrives as a
:class:`~fastdit.kernels.quantized.QuantizedV` (e4m3, scale ``s_d`` per channel), P·V is an FP8
MMA of ``e4m3(448 * p)`` and ``v_q`` (:func:`~fastdit.kernels.triton.triton_common.fp8_pv`: two-level
fp32 accumulation with ``FP8_ACC=0``, else Triton's ``max_num_imprecise_acc=FP8_ACC``); ``l``
sums the same ``448 * p`` (computed as ``exp2(x + log2 448)``), so the output is
``acc / l * s_d`` and the LSE loses ``ln 448``. ``V_T``: V stored transposed (``[D, S]``, keys
contiguous).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..plan import BlockSparsity
from ..quantized import P_SCALE, QuantizedQK, QuantizedV
from .allocation import scoped_allocator
from .triton_common import (
    TensorDescriptor,
    attend_plan_row,
    count_unmasked_blocks,
    launch_with_fallback,
    load_q_tile,
    normalized_output,
    plan_row,
    plan_strides,
    strides,
    tma_device,
    tma_view,
    WARP_SPECIALIZED_CONFIG,
    warp_specialization_skipped,
)


@triton.jit
def _int8_block_sparse_attn_fwd(
    Qq, Kq, V, Out, Lse, QScale, KScale, LseShift, VScale, k_desc, v_desc,
    kv_counts_ptr, kv_indices_ptr, key_lengths_ptr,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_cb, stride_ch,
    stride_ib, stride_ih, stride_iq,
    num_heads, seq_q, seq_kv, head_dim, num_q_blocks, num_kv_blocks,
    Q_BLOCK: tl.constexpr, KV_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_KV: tl.constexpr, EVEN_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    RETURN_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_OPERANDS: tl.constexpr,
    USE_TMA: tl.constexpr, LAYOUT_BSHD: tl.constexpr,
    FP8_PV: tl.constexpr, FP8_ACC: tl.constexpr, V_T: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
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

    # Int8 Q and K are contiguous (B, H, S, D): rows are head_dim apart.
    q_ptrs = (
        Qq + (pid_bh.to(tl.int64) * seq_q + q_row_start) * head_dim
        + offs_m[:, None] * head_dim + offs_d[None, :]
    )
    if WARP_SPECIALIZE:
        q_base = Qq + pid_bh.to(tl.int64) * seq_q * head_dim
        q = load_q_tile(q_base, head_dim, seq_q, q_row_start, BLOCK_M, BLOCK_D)
    else:
        q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    q_scale = tl.load(QScale + pid_bh.to(tl.int64) * num_q_blocks + q_block)

    k_base = Kq + pid_bh.to(tl.int64) * seq_kv * head_dim
    v_base = V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
    k_tile_offsets = offs_n[:, None] * head_dim + offs_d[None, :]
    if V_T:  # [BLOCK_D, BLOCK_N] tiles of V^T (stride_vs is 1, stride_vd the padded length)
        v_tile_offsets = offs_d[:, None] * stride_vd + offs_n[None, :]
    else:
        v_tile_offsets = offs_n[:, None] * stride_vs + offs_d[None, :]
    k_scale_row = KScale + pid_bh.to(tl.int64) * num_kv_blocks

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

    # Hopper+ (USE_TMA): whole tiles of the 2-D views [B*H*S, D] (int8 K) and [B*S, H*D] or
    # [B*H*S, D] (V); coordinates are rows, not bytes. Each key block's scores are dequantized
    # with the query block's scale times the key block's own (INT8_QK).
    k_row = pid_bh * seq_kv
    if FP8_PV:  # V quantized: [B*H*S, D], or [B*H*D, S_pad] (V_T)
        if V_T:
            v_row, v_col = pid_bh * BLOCK_D, 0
        else:
            v_row, v_col = pid_bh * seq_kv, 0
    elif LAYOUT_BSHD:
        v_row, v_col = batch * seq_kv, head * BLOCK_D
    else:
        v_row, v_col = pid_bh * seq_kv, 0
    acc, l_i, m_i = attend_plan_row(
        acc, l_i, m_i, q, index_ptr, num_unmasked, count,
        k_base, head_dim, v_base, stride_vs, k_tile_offsets, v_tile_offsets,
        kv_len, head_dim, q_scale, k_desc, v_desc, k_row, 0, v_row, v_col,
        KV_BLOCK=KV_BLOCK, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, EVEN_D=EVEN_D,
        DOT_PRECISION=DOT_PRECISION, UPCAST_OPERANDS=UPCAST_OPERANDS, USE_TMA=USE_TMA,
        INT8_QK=True, k_scale_row=k_scale_row, FP8_PV=FP8_PV, FP8_ACC=FP8_ACC, V_T=V_T,
        WARP_SPECIALIZE=WARP_SPECIALIZE, EVEN_KV=EVEN_KV, TMA_TAIL=FP8_PV,
    )

    out, lse = normalized_output(acc, l_i, m_i)
    if FP8_PV:  # V was scaled by 448 / max|v_d|: undo it per channel. P's 448 is in l too, so
        # acc / l has none, but the LSE (from l) is ln(448) too large.
        v_scale = tl.load(VScale + pid_bh.to(tl.int64) * head_dim + offs_d, mask=d_ok, other=0.0)
        out = out * v_scale[None, :]
        lse = lse - LN_P_SCALE
    o_ptrs = (
        Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
        + q_row_start.to(tl.int64) * stride_os
        + offs_m[:, None] * stride_os + offs_d[None, :]
    )
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    if RETURN_LSE:
        row_offsets = pid_bh.to(tl.int64) * seq_q + q_row_start + offs_m
        lse = lse + tl.load(LseShift + row_offsets, mask=rows_ok, other=0.0)
        tl.store(Lse + row_offsets, lse, mask=rows_ok)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) keyed on (BLOCK_D, Q_BLOCK, KV_BLOCK). Head_dim 128 with
# 128-token blocks: from benchmarks/tune_int8.py on an H100 (the sweep of 18 configurations at the
# Wan2.1-1.3B 480p shape, confirmed at 14B 720p; one warpgroup on 64-row query tiles is fastest).
# The others are not tuned on a GPU: SageAttention's Triton INT8 defaults. A config that does not
# fit is shrunk at the first launch.
_INT8_CONFIGS = {
    (64, 128, 128): (128, 64, 4, 3),
    (128, 128, 128): (64, 128, 4, 2),
    (256, 128, 128): (64, 32, 4, 1),
    (64, 64, 64): (64, 64, 4, 3),
    (128, 64, 64): (64, 64, 4, 3),
    (256, 64, 64): (64, 32, 4, 1),
}


def _int8_launch_config(block_d: int, q_block: int, kv_block: int, interpret: bool):
    if interpret:
        return q_block, kv_block, 4, 1
    config = _INT8_CONFIGS.get((block_d, q_block, kv_block))
    if config is not None:
        return config
    return min(q_block, 64), min(kv_block, 64), 4, 2


LN_P_SCALE = tl.constexpr(math.log(P_SCALE))  # ln(448): the FP8 kernels' l carries P's 448

# FP8 P.V defaults of quantize="int8-fp8" (benchmarks/fp8_bench.py measures the alternatives):
# FP8_ACCUMULATION 0 is two-level accumulation, n > 0 Triton's max_num_imprecise_acc=n, -1 its
# default (no promotion on sm_90);
# V_TRANSPOSED stores V as [D, S] (the K-major B operand of Hopper's FP8 MMA);
# FP8_LAUNCH_CONFIG: None launches the FP8 modes with the INT8 kernel's table (_INT8_CONFIGS,
# not tuned for FP8 P.V yet); a tuple (BLOCK_M, BLOCK_N, num_warps, num_stages) launches every
# FP8 call with it instead (benchmarks/fp8_tune.py sweeps it). BLOCK_M must divide the plan's
# query block and BLOCK_N its key block (powers of two >= 16); the configuration is used as
# given, never shrunk: one that does not fit the GPU raises Triton's OutOfResources.
# FP8_MAXNREG caps the FP8 modes' registers per thread (Triton's maxnreg) on the default launch
# configuration at head_dim 128 (_fp8_register_cap); None lets ptxas choose. The FP8 kernels read
# a row's ragged last key block through the tensor descriptors too (attend_plan_row's TMA_TAIL),
# so ptxas takes 164-167 registers at any length, and the cap keeps it at three 4-warp programs
# per SM without spills (sm_90, ptxas 13.0: 75,600 and 32,760 tokens). On an H200 (run 8) the
# kernel took 149.97 ms at Wan2.1-14B 720p's 75,600 tokens (150.26 uncapped) and 8.22 ms at
# 1.3B 480p's 32,760 (9.18 uncapped). With the masked tail on pointer loads it had taken
# 245-255 registers (two programs per SM): 173.97 ms uncapped and 152.87 capped at 75,600, but
# at 32,760 the cap spilled 780 bytes (10.34 -> 11.97 ms).
FP8_ACCUMULATION = 0
V_TRANSPOSED = True
FP8_LAUNCH_CONFIG: tuple[int, int, int, int] | None = None
FP8_MAXNREG: int | None = 168


def _fp8_register_cap(fp8: bool, block_d: int, other_kernel: bool) -> dict:
    """Triton's ``maxnreg`` launch option for an FP8 launch (see :data:`FP8_MAXNREG`): the
    default plain kernel at head_dim 128, at any length; ``other_kernel`` (the interpreter,
    warp specialization, an ``FP8_LAUNCH_CONFIG`` override) gets none."""
    if not fp8 or FP8_MAXNREG is None or other_kernel or block_d != 128:
        return {}
    return dict(maxnreg=FP8_MAXNREG)


def check_launch_config(config, q_block: int, kv_block: int) -> tuple[int, int, int, int]:
    """``config`` as a ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` tuple of ints, or a
    ``ValueError`` naming the constraint it breaks for this plan's blocks."""
    try:
        block_m, block_n, num_warps, num_stages = (int(x) for x in config)
    except (TypeError, ValueError):
        raise ValueError(
            f"FP8_LAUNCH_CONFIG must be None or (BLOCK_M, BLOCK_N, num_warps, num_stages), got {config!r}"
        ) from None
    for name, value, block in (("BLOCK_M", block_m, q_block), ("BLOCK_N", block_n, kv_block)):
        if value < 16 or value & (value - 1) or block % value:
            kind = "query" if name == "BLOCK_M" else "key"
            raise ValueError(
                f"FP8_LAUNCH_CONFIG: {name} must be a power of two >= 16 dividing the plan's {kind} "
                f"block {block}, got {name}={value}"
            )
    if num_warps not in (1, 2, 4, 8, 16) or num_stages < 1:
        raise ValueError(
            "FP8_LAUNCH_CONFIG: num_warps must be 1, 2, 4, 8 or 16 and num_stages >= 1, got "
            f"num_warps={num_warps}, num_stages={num_stages}"
        )
    return block_m, block_n, num_warps, num_stages


def triton_int8_block_sparse_attention(
    quantized: QuantizedQK,
    v: torch.Tensor,
    plan: BlockSparsity,
    *,
    layout: str,
    return_lse: bool,
    key_lengths: torch.Tensor | None,
    interpret: bool,
    quantized_v: QuantizedV | None = None,
    fp8_accumulation: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the INT8 kernel on validated inputs; the output has V's layout and dtype.

    With ``quantized_v`` (``quantize="int8-fp8"``) P.V runs in FP8 on its e4m3 values (``v`` then
    only gives the output's dtype); ``fp8_accumulation`` (default :data:`FP8_ACCUMULATION`):
    0 for two-level accumulation, ``n > 0`` for ``max_num_imprecise_acc=n`` (clamped to the key
    tile ``BLOCK_N``: Triton requires ``n <= BLOCK_N``; ``n = BLOCK_N`` promotes once a tile), -1
    for Triton's default (on sm_90: no promotion)."""
    batch, heads, seq_q, head_dim = quantized.q.shape
    seq_kv = quantized.k.shape[2]
    if return_lse and quantized.lse_shift is None:
        raise ValueError("return_lse needs a QuantizedQK made with lse_shift=True")
    fp8 = quantized_v is not None
    if quantized.q.dtype == torch.float8_e4m3fn and not fp8:
        raise ValueError("e4m3 Q and K (quantize='fp8') run with FP8 P.V: pass quantized_v")
    fp8_acc = FP8_ACCUMULATION if fp8_accumulation is None else int(fp8_accumulation)
    if fp8_acc < -1:
        raise ValueError(
            "fp8_accumulation must be 0 (two-level), a positive count or -1 (no promotion), "
            f"got {fp8_acc}"
        )
    out_shape = (batch, seq_q, heads, head_dim) if layout == "bshd" else (batch, heads, seq_q, head_dim)
    out = torch.empty(out_shape, dtype=v.dtype, device=v.device)
    lse = (
        torch.empty((batch, heads, seq_q), dtype=torch.float32, device=v.device)
        if return_lse
        else out  # unused placeholder pointer
    )
    # int8 MMA needs a reduction dim of at least 32.
    block_d = max(32, triton.next_power_of_2(head_dim))
    if fp8:
        v_data = quantized_v.v
        v_transposed = quantized_v.transposed
        if v_transposed:  # [B, H, D, S_pad] -> (batch, head, key, channel) strides
            v_strides = (v_data.stride(0), v_data.stride(1), 1, v_data.shape[3])
        else:
            v_strides = (*strides(v_data, "bhsd"), 1)
    else:
        v_data, v_transposed = v, False
        v_strides = (*strides(v, layout), 1)

    def tma_views(on_interpreter: bool):
        """Q's, K's and V's 2-D views for tensor-descriptor loads, or None unless K's and V's
        qualify (Q's may be None)."""
        q_view, k_view = (
            tma_view(x, "bhsd", interpret, dtypes=(torch.int8, torch.float8_e4m3fn),
                     on_interpreter=on_interpreter)
            for x in (quantized.q, quantized.k)
        )
        if v_transposed:
            v_view = _transposed_tma_view(v_data, interpret, on_interpreter)
        elif fp8:
            v_view = tma_view(v_data, "bhsd", interpret, dtypes=(torch.float8_e4m3fn,),
                              on_interpreter=on_interpreter)
        else:
            v_view = tma_view(v, layout, interpret, on_interpreter=on_interpreter)
        if k_view is None or v_view is None or block_d != head_dim:
            return None
        return q_view, k_view, v_view

    views = tma_views(on_interpreter=False)
    warp_specialize = False  # the warp-specialized kernel, where it applies (see WARP_SPECIALIZE)
    if warp_specialization_skipped(
        v.device, v.dtype, head_dim, q_block_size=plan.q_block_size,
        kv_block_size=plan.kv_block_size, key_padding=key_lengths is not None, window=False,
        quantized=True, interpret=interpret,
    ) is None:
        specialized_views = tma_views(on_interpreter=True)
        if specialized_views is not None and specialized_views[0] is not None:
            views, warp_specialize = specialized_views, True
    use_tma = views is not None

    def launch(block_m: int, block_n: int, num_warps: int, num_stages: int) -> None:
        if use_tma:
            k_desc = TensorDescriptor.from_tensor(views[1], [block_n, block_d])
            v_block = [block_d, block_n] if v_transposed else [block_n, block_d]
            v_desc = TensorDescriptor.from_tensor(views[2], v_block)
        else:
            k_desc, v_desc = quantized.k, v_data  # unused
        grid = (triton.cdiv(seq_q, block_m), batch * heads)
        _int8_block_sparse_attn_fwd[grid](
            quantized.q, quantized.k, v_data, out, lse, quantized.q_scale, quantized.k_scale,
            quantized.lse_shift if return_lse else out,
            quantized_v.scale if fp8 else out, k_desc, v_desc,
            plan.kv_counts, plan.kv_indices, key_lengths if key_lengths is not None else plan.kv_counts,
            *v_strides, *strides(out, layout), *plan_strides(plan),
            heads, seq_q, seq_kv, head_dim, quantized.q_scale.shape[2], quantized.k_scale.shape[2],
            Q_BLOCK=plan.q_block_size, KV_BLOCK=plan.kv_block_size,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            EVEN_KV=key_lengths is None and seq_kv % plan.kv_block_size == 0,
            EVEN_D=block_d == head_dim,
            HAS_KEY_LENGTHS=key_lengths is not None,
            RETURN_LSE=return_lse,
            DOT_PRECISION="tf32",
            UPCAST_OPERANDS=interpret and (v.dtype == torch.bfloat16 or fp8),
            USE_TMA=use_tma,
            LAYOUT_BSHD=layout == "bshd",
            FP8_PV=fp8, FP8_ACC=min(fp8_acc, block_n) if fp8 else 0, V_T=v_transposed,
            WARP_SPECIALIZE=warp_specialize,
            num_warps=num_warps, num_stages=num_stages, **registers,
        )

    registers = _fp8_register_cap(
        fp8, block_d, interpret or warp_specialize or FP8_LAUNCH_CONFIG is not None
    )
    if warp_specialize:  # each launch with Triton's allocator for Q's device-built descriptor
        launch = scoped_allocator(v.device)(launch)
    override = FP8_LAUNCH_CONFIG if fp8 else None
    if override is not None:  # as given, on the interpreter too (which ignores warps and stages)
        launch(*check_launch_config(override, plan.q_block_size, plan.kv_block_size))
        return out, (lse if return_lse else None)
    config = _int8_launch_config(block_d, plan.q_block_size, plan.kv_block_size, interpret)
    if warp_specialize and not interpret:
        config = WARP_SPECIALIZED_CONFIG
    if interpret:
        launch(*config)
        return out, (lse if return_lse else None)
    key = ("int8", block_d, plan.q_block_size, plan.kv_block_size, v.dtype, use_tma, v.device.index,
           fp8, fp8_acc if fp8 else 0, v_transposed, quantized.q.dtype, warp_specialize,
           registers.get("maxnreg"))
    launch_with_fallback(key, config, launch)
    return out, (lse if return_lse else None)


def _transposed_tma_view(v_t: torch.Tensor, interpret: bool, on_interpreter: bool = False):
    """The 2-D view ``[B*H*D, S_pad]`` of a transposed e4m3 V for tensor-descriptor loads, or None
    where that path does not apply (as :func:`~fastdit.kernels.triton.triton_common.tma_view`)."""
    if not tma_device(v_t, interpret, on_interpreter) or v_t.shape[2] not in (64, 128):
        return None
    if not v_t.is_contiguous() or v_t.data_ptr() % 16 or v_t.shape[3] % 16:
        return None
    return v_t.view(-1, v_t.shape[3])
