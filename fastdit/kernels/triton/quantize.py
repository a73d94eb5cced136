"""Per-block INT8 quantization of Q or K, fused with K smoothing: the Triton kernel and its launcher.

For every batch ``b``, head ``h`` and block ``c`` of ``BLOCK`` consecutive tokens of ``x`` (Q or K,
any layout), with ``mu`` the smoothing vector (K's mean, or 0 for Q) and ``valid`` the rows below
the sequence length (and, for K, below the batch element's valid key length)::

    y_i        = x_i - mu                                  (0 for rows that are not valid)
    s          = max_{i in c, d} |y_id| / 127              (1 / 127 for an all-zero block)
    x_q[i]     = trunc(y_i * (127 / max|y|) + sign(y_i) / 2)   (round half away from 0)
    scale[c]   = s * scale_multiplier                      (Q: softmax scale * log2(e) folded in)
    shift[i]   = shift_multiplier * x_i . dot_vector       (optional: Q's LSE correction q . k_mean)

``x_q`` is written int8, contiguous ``(B, H, S, D)``, whatever the input layout, which is what the
INT8 attention kernel reads. With ``FP8`` (``quantize="fp8"``) 448 takes 127's place and ``x_q`` is
``e4m3(y_i * (448 / max|y|))`` (round to nearest even), written ``torch.float8_e4m3fn``. One
program per (block, batch * head): one read of ``x``, one int8 write.

K is read once. ``mu`` is not K's exact mean (which would need a pass over all of K before any
block could be quantized: a second read, or a grid-wide barrier Triton does not have) but the
mean of :data:`~fastdit.kernels.quantized.KEY_MEAN_SAMPLES` valid keys spread over the sequence
(:func:`~fastdit.kernels.quantized.sampled_key_mean`: one gather of 64 rows per head before this
launch, 16 KB per head at D = 128 in bf16, 0.1% of K at Wan2.1-14B 720p). Softmax ignores any
vector subtracted from all keys of a head and Q's LSE shift uses the same ``mu``, so only the
INT8 range depends on it. A first version computed the sample inside this launch (every program
reading the 64 rows from L2): on an H200 it took 9.35 ms for Q and K at 14B 720p against 0.90 ms
for the launch with a separate full mean (benchmarks/results/h200_2026-12-02_run6/fp8_k_once/), so
the sample is gathered outside. ``benchmarks/fp8_tune.py`` times the quantization passes on their
own; every attention timing fastdit reports includes them.

For ``quantize="int8-fp8"`` V goes to FP8 e4m3 per channel (:func:`triton_quantize_v_fp8`): its
per-channel ``max |v|`` is one PyTorch reduction (``aminmax``), then one launch writes
``v_q = e4m3(clamp(v * 448 / max|v_d|, -448, 448))``, ``[B, H, S, D]`` or transposed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quantized import FP8_E4M3_MAX, QuantizedQK, QuantizedV, sampled_key_mean, value_absmax
from .triton_common import LOG2E, e4m3_round, strides


@triton.jit
def _quantize_blocks_kernel(
    X, Mu, DotVector, Xq, Scale, Shift, key_lengths_ptr,
    stride_xb, stride_xh, stride_xs,
    num_heads, seq_len, head_dim, num_blocks, scale_multiplier, shift_multiplier,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    SUBTRACT_MU: tl.constexpr, WRITE_SHIFT: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    FP8: tl.constexpr = False, INTERPRET: tl.constexpr = False,
):
    block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    offs_m = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    rows = block * BLOCK + offs_m
    rows_in = rows < seq_len
    d_ok = offs_d < head_dim
    valid = rows_in
    if HAS_KEY_LENGTHS:
        valid = valid & (rows < tl.load(key_lengths_ptr + batch))

    x_ptrs = (
        X + batch.to(tl.int64) * stride_xb + head.to(tl.int64) * stride_xh
        + (block * BLOCK).to(tl.int64) * stride_xs
        + offs_m[:, None] * stride_xs + offs_d[None, :]
    )
    x = tl.load(x_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if WRITE_SHIFT:
        dot_vector = tl.load(DotVector + pid_bh.to(tl.int64) * head_dim + offs_d, mask=d_ok, other=0.0)
        shift = tl.sum(x * dot_vector[None, :], 1) * shift_multiplier
        tl.store(Shift + pid_bh.to(tl.int64) * seq_len + rows, shift, mask=rows_in)
    if SUBTRACT_MU:
        mu = tl.load(Mu + pid_bh.to(tl.int64) * head_dim + offs_d, mask=d_ok, other=0.0)
        x = tl.where(valid[:, None] & d_ok[None, :], x - mu[None, :], 0.0)

    # An all-zero block (Q rows of zeros, K rows that are all padding) gets max 1, not 0: its int8
    # values are 0 either way, and a zero scale would turn the kernel's masked -inf scores to NaN.
    absmax = tl.max(tl.max(tl.abs(x), 1), 0)
    absmax = tl.where(absmax > 0.0, absmax, 1.0)
    if FP8:
        # (x * 448) is exact (bf16/fp16 inputs) and div_rn rounds correctly: the same fp32 value
        # as the PyTorch reference's, on the GPU (where "/" is approximate) and the interpreter.
        y = tl.minimum(tl.maximum(tl.math.div_rn(x * 448.0, absmax), -448.0), 448.0)
        if INTERPRET:  # the CPU interpreter's fp8 cast rounds wrongly (see e4m3_round)
            y = e4m3_round(y)
        x_q = y.to(tl.float8e4nv)
        range_max = 448.0
    else:
        y = x * (127.0 / absmax)
        y = y + tl.where(y >= 0.0, 0.5, -0.5)
        x_q = tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)  # float -> int truncates toward 0
        range_max = 127.0
    xq_ptrs = (
        Xq + pid_bh.to(tl.int64) * seq_len * head_dim
        + rows.to(tl.int64)[:, None] * head_dim + offs_d[None, :]
    )
    tl.store(xq_ptrs, x_q, mask=rows_in[:, None] & d_ok[None, :])
    tl.store(Scale + pid_bh.to(tl.int64) * num_blocks + block, absmax / range_max * scale_multiplier)


def _quantize(
    x: torch.Tensor,
    block: int,
    layout: str,
    *,
    mu: torch.Tensor | None,
    dot_vector: torch.Tensor | None,
    scale_multiplier: float,
    shift_multiplier: float,
    key_lengths: torch.Tensor | None,
    fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if layout == "bshd":
        batch, seq_len, heads, head_dim = x.shape
    else:
        batch, heads, seq_len, head_dim = x.shape
    num_blocks = triton.cdiv(seq_len, block)
    x_q = torch.empty((batch, heads, seq_len, head_dim),
                      dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty((batch, heads, num_blocks), dtype=torch.float32, device=x.device)
    shift = (
        torch.empty((batch, heads, seq_len), dtype=torch.float32, device=x.device)
        if dot_vector is not None
        else None
    )
    placeholder = scale  # pointer for arguments a constexpr flag switches off
    _quantize_blocks_kernel[(num_blocks, batch * heads)](
        x,
        mu if mu is not None else placeholder,
        dot_vector if dot_vector is not None else placeholder,
        x_q, scale,
        shift if shift is not None else placeholder,
        key_lengths if key_lengths is not None else placeholder,
        *strides(x, layout),
        heads, seq_len, head_dim, num_blocks, scale_multiplier, shift_multiplier,
        BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        SUBTRACT_MU=mu is not None, WRITE_SHIFT=dot_vector is not None,
        HAS_KEY_LENGTHS=key_lengths is not None, FP8=fp8, INTERPRET=x.device.type == "cpu",
        num_warps=8 if block * head_dim >= 128 * 128 else 4,
    )
    return x_q, scale, shift


def triton_quantize_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_block_size: int,
    kv_block_size: int,
    scale: float,
    layout: str,
    key_lengths: torch.Tensor | None,
    lse_shift: bool,
    smooth_k: bool = True,
    fp8: bool = False,
) -> QuantizedQK:
    """Quantize validated Q and K (see ``fastdit.kernels.quantize_qk_int8``): K's sampled mean
    (64 rows per head), then one launch for K (smoothing fused, K read once) and one for Q
    (``scale * log2(e)`` folded in, LSE shift); ``fp8``: to e4m3 instead of INT8 (``quantize="fp8"``)."""
    mean = sampled_key_mean(k, layout, key_lengths, smooth_k).contiguous()
    k_q, k_scale, _ = _quantize(
        k, kv_block_size, layout, mu=mean if smooth_k else None, dot_vector=None,
        scale_multiplier=1.0, shift_multiplier=0.0, key_lengths=key_lengths, fp8=fp8,
    )
    q_q, q_scale, shift = _quantize(
        q, q_block_size, layout, mu=None, dot_vector=mean if lse_shift else None,
        scale_multiplier=scale * LOG2E, shift_multiplier=scale, key_lengths=None, fp8=fp8,
    )
    return QuantizedQK(q_q, q_scale, k_q, k_scale, mean, shift, q_block_size, kv_block_size, scale)


@triton.jit
def _quantize_v_fp8_kernel(
    V, InvScale, Vq, key_lengths_ptr,
    stride_vb, stride_vh, stride_vs,
    num_heads, seq_len, head_dim, out_seq,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr,
    TRANSPOSED: tl.constexpr, INTERPRET: tl.constexpr,
):
    block = tl.program_id(0)
    pid_bh = tl.program_id(1)
    batch = pid_bh // num_heads
    head = pid_bh % num_heads
    rows = block * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    valid = rows < seq_len
    if HAS_KEY_LENGTHS:
        valid = valid & (rows < tl.load(key_lengths_ptr + batch))
    v_ptrs = (
        V + batch.to(tl.int64) * stride_vb + head.to(tl.int64) * stride_vh
        + (block * BLOCK).to(tl.int64) * stride_vs
        + tl.arange(0, BLOCK)[:, None] * stride_vs + offs_d[None, :]
    )
    v = tl.load(v_ptrs, mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    inv = tl.load(InvScale + pid_bh.to(tl.int64) * head_dim + offs_d, mask=d_ok, other=1.0)
    y = tl.minimum(tl.maximum(v * inv[None, :], -448.0), 448.0)
    if INTERPRET:  # the CPU interpreter's fp8 cast rounds wrongly (see e4m3_round)
        y = e4m3_round(y)
    v_q = y.to(tl.float8e4nv)
    base = Vq + pid_bh.to(tl.int64) * out_seq * head_dim
    if TRANSPOSED:
        # [D, out_seq]: rows past seq_len up to out_seq (the 16-byte padding) are written 0.
        tl.store(
            base + offs_d[None, :].to(tl.int64) * out_seq + rows[:, None], v_q,
            mask=(rows < out_seq)[:, None] & d_ok[None, :],
        )
    else:
        tl.store(
            base + rows.to(tl.int64)[:, None] * head_dim + offs_d[None, :], v_q,
            mask=(rows < seq_len)[:, None] & d_ok[None, :],
        )


def triton_quantize_v_fp8(
    v: torch.Tensor,
    *,
    layout: str,
    key_lengths: torch.Tensor | None,
    transposed: bool,
    block: int = 128,
) -> QuantizedV:
    """V (fp16/bf16, ``layout``) -> :class:`~fastdit.kernels.quantized.QuantizedV`: e4m3 per
    channel, ``[B, H, S, D]`` or transposed ``[B, H, D, S_pad]``; keys past ``key_lengths`` are
    stored 0 and do not enter the scales."""
    if layout == "bshd":
        batch, seq_len, heads, head_dim = v.shape
    else:
        batch, heads, seq_len, head_dim = v.shape
    absmax = value_absmax(v, layout, key_lengths)
    absmax = torch.where(absmax > 0, absmax, 1.0)  # an all-zero channel: any scale, never 0
    out_seq = -(-seq_len // 16) * 16 if transposed else seq_len
    shape = (batch, heads, head_dim, out_seq) if transposed else (batch, heads, seq_len, head_dim)
    v_q = torch.empty(shape, dtype=torch.float8_e4m3fn, device=v.device)
    inv_scale = (FP8_E4M3_MAX / absmax).contiguous()
    grid = (triton.cdiv(out_seq, block), batch * heads)
    _quantize_v_fp8_kernel[grid](
        v, inv_scale, v_q, key_lengths if key_lengths is not None else inv_scale,
        *strides(v, layout), heads, seq_len, head_dim, out_seq,
        BLOCK=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_KEY_LENGTHS=key_lengths is not None, TRANSPOSED=transposed,
        INTERPRET=v.device.type == "cpu",
        num_warps=8 if block * head_dim >= 128 * 128 else 4,
    )
    return QuantizedV(v_q, absmax / FP8_E4M3_MAX, transposed)
