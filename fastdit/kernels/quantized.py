"""INT8 Q and K for the quantized attention kernel: the container both backends share.

SageAttention's scheme (Zhang et al., 2025) as PARO (METHODS.md section 5) uses it:

* K is smoothed first: ``k_j <- k_j - k_mean`` with ``k_mean`` a per-(batch, head) mean of
  :data:`KEY_MEAN_SAMPLES` valid keys spread over the sequence (:func:`sampled_key_mean`: it
  reads those rows only, so quantizing K reads K once). Every score of a query row ``i`` moves
  by the same ``-scale * q_i . k_mean``, which softmax ignores, so the output is unchanged
  whatever ``k_mean`` is; the LSE moves by that amount and ``lse_shift = scale * q_i . k_mean``
  (fp32, from the unquantized Q) restores it. Smoothing removes the large offset channels that
  keys share, which would otherwise eat the INT8 range; a sample's mean removes them as well as
  the exact mean, up to about ``std / sqrt(KEY_MEAN_SAMPLES)`` per channel.
* Q and K are quantized symmetrically per token block: ``s = max|x| / 127`` over the block's
  (valid) rows and all head dims, ``x_q = round_half_away(x / s)`` in ``[-127, 127]`` (an all-zero
  block keeps ``s = 1 / 127``: never a zero scale, which would make masked scores NaN).
* ``scale * log2(e)`` is folded into Q's block scale, so the kernel's scores
  ``q_q . k_q * q_scale * k_scale`` are already in log2 units for ``exp2``.

``quantize="int8-fp8"`` (SageAttention2's scheme on Hopper) also quantizes V, to FP8 e4m3 per
channel (:class:`QuantizedV`): ``s_d = max_j |v_jd| / 448`` over the valid keys of a (batch, head),
``v_q = e4m3(v / s_d)`` (round to nearest even on the GPU; 448 is e4m3's largest finite value).
The kernel runs ``P @ V`` in FP8 with ``P`` scaled by :data:`P_SCALE` (the softmax sum carries
the same factor, so ``acc / l`` has none) and multiplies by ``s_d`` once, at the end (see
:func:`fastdit.kernels.triton.triton_common.fp8_pv`).

``quantize="fp8"`` (issue 13's FP8 Q.K^T variant) quantizes Q and K to e4m3 instead of INT8,
with the same per-block scales and K smoothing (``s = max|x| / 448``, ``x_q = e4m3(x / s)``, round
to nearest even), so that Q.K^T is an FP8 MMA with an fp32 result (no int32 -> fp32 conversion in
the kernel); P.V is FP8 as in ``"int8-fp8"``. e4m3 keeps 3 mantissa bits against INT8's ~7 at a
block's largest values, so its scores are less precise (``benchmarks/fp8_error_budget.py``).

Blocks are the plan's blocks (``q_block_size`` and ``kv_block_size`` tokens), so every tile of the
kernel lies inside one scale block. Key rows at or past a batch element's valid length are stored
as 0 and do not enter the sampled mean or the scales (they may hold anything, even NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# "int8": INT8 Q.K^T, P.V in V's 16-bit dtype. "int8-fp8": INT8 Q.K^T, FP8 e4m3 P.V. "fp8": FP8
# e4m3 Q.K^T and P.V. The FP8 modes need compute capability >= 8.9; older GPUs run "int8"
# instead (see FP8_MIN_CAPABILITY).
QUANTIZATIONS = ("int8", "int8-fp8", "fp8")
FP8_QUANTIZATIONS = ("int8-fp8", "fp8")
FP8_QK_QUANTIZATIONS = ("fp8",)
FP8_MIN_CAPABILITY = (8, 9)
FP8_E4M3_MAX = 448.0
# K is smoothed by the mean of this many valid keys spread evenly over the sequence, not of all of
# them, so that K is read once (by the quantization launch) plus this many rows per head. Any
# vector would do (softmax ignores a shift shared by a head's keys; lse_shift corrects the LSE); N
# keys of per-channel spread sigma miss the full mean by about sigma / sqrt(N), sigma / 8 here,
# which widens a block's max|k - mu| (about 4 sigma) by a few percent at most, while the shared
# offset it removes can be many sigma (gpu_check's drifting-mean and offset-20 keys).
KEY_MEAN_SAMPLES = 64
# P (in [0, 1]) times this before the e4m3 cast: its largest entries use e4m3's whole range.
P_SCALE = FP8_E4M3_MAX
# The INT8 kernels' int32 -> fp32 offset: an int32 s plus 0x4B400000, read as fp32, is exactly
# SCORE_OFFSET + s for |s| < 2**22 (triton_common.int8_offset_scores).
SCORE_OFFSET = 12582912.0  # 1.5 * 2**23


@dataclass(frozen=True, eq=False)
class QuantizedQK:
    """INT8 (or, for ``quantize="fp8"``, e4m3) Q and K with their per-block scales, contiguous
    ``(B, H, S, D)``.

    Attributes:
        q: int8 ``[B, H, S_q, D]`` (or ``torch.float8_e4m3fn``).
        q_scale: fp32 ``[B, H, ceil(S_q / q_block_size)]``: ``max|q| / 127 * scale * log2(e)``
            (``/ 448`` for e4m3).
        k: int8 ``[B, H, S_kv, D]`` of the smoothed keys (or ``torch.float8_e4m3fn``).
        k_scale: fp32 ``[B, H, ceil(S_kv / kv_block_size)]``: ``max|k - k_mean| / 127``
            (``/ 448`` for e4m3).
        k_mean: fp32 ``[B, H, D]``: the smoothing vector subtracted from every key.
        lse_shift: fp32 ``[B, H, S_q]``: ``scale * q_i . k_mean`` (add it to the smoothed LSE),
            or ``None`` when not requested.
        q_block_size, kv_block_size: tokens per scale block (the plan's block sizes).
        scale: the softmax scale folded into ``q_scale``.
    """

    q: torch.Tensor
    q_scale: torch.Tensor
    k: torch.Tensor
    k_scale: torch.Tensor
    k_mean: torch.Tensor
    lse_shift: torch.Tensor | None
    q_block_size: int
    kv_block_size: int
    scale: float


def sampled_key_mean(
    k: torch.Tensor, layout: str, key_lengths: torch.Tensor | None, smooth: bool = True
) -> torch.Tensor:
    """fp32 ``[B, H, D]``: the smoothing vector, for each batch element with ``L`` valid keys the
    mean of keys ``floor(j * L / N)``, ``j < N`` (``N`` = :data:`KEY_MEAN_SAMPLES`), spread over
    the whole valid range; of all ``L`` when ``L < N``; zeros for ``L = 0`` or when ``smooth`` is
    False.

    One gather of ``N`` rows per batch element, on K's device, without a host synchronisation
    (``key_lengths`` stay a tensor); rows past a length are never used (they may hold NaN).
    Both backends and the reference take K's mean from here.
    """
    seq_dim = 1 if layout == "bshd" else 2
    batch, heads, head_dim = k.shape[0], k.shape[3 - seq_dim], k.shape[3]
    seq_len = k.shape[seq_dim]
    if not smooth or seq_len == 0 or batch == 0:
        return torch.zeros((batch, heads, head_dim), dtype=torch.float32, device=k.device)
    if key_lengths is None:  # the same rows for every batch element: one gather, one reduction
        rows = torch.arange(min(seq_len, KEY_MEAN_SAMPLES), device=k.device)
        if seq_len >= KEY_MEAN_SAMPLES:
            rows = rows * seq_len // KEY_MEAN_SAMPLES
        return k.index_select(seq_dim, rows).sum(dim=seq_dim, dtype=torch.float32) / len(rows)
    lengths = key_lengths.to(device=k.device, dtype=torch.int64).clamp(0, seq_len)
    j = torch.arange(KEY_MEAN_SAMPLES, device=k.device)
    count = lengths.clamp(max=KEY_MEAN_SAMPLES)  # [B]
    in_sample = j[None, :] < count[:, None]  # [B, N]
    rows = torch.where(lengths[:, None] >= KEY_MEAN_SAMPLES,
                       j[None, :] * lengths[:, None] // KEY_MEAN_SAMPLES, j[None, :])
    rows = torch.where(in_sample, rows, 0)
    index = torch.arange(batch, device=k.device)[:, None]
    samples = k[index, rows] if layout == "bshd" else k[index, :, rows]  # [B, N, H, D] either way
    samples = torch.where(in_sample[:, :, None, None], samples.float(), 0.0)
    return samples.sum(dim=1) / count.clamp(min=1).to(torch.float32)[:, None, None]


@dataclass(frozen=True, eq=False)
class QuantizedV:
    """V in FP8 e4m3 with one scale per (batch, head, channel), for the FP8 modes.

    Attributes:
        v: ``torch.float8_e4m3fn``, ``[B, H, S_kv, D]`` contiguous, or with ``transposed``
            ``[B, H, D, S_pad]`` (keys contiguous, ``S_pad`` = ``S_kv`` rounded up to 16: 16-byte
            rows for Hopper's tensor descriptors; the columns past ``S_kv`` hold 0).
        scale: fp32 ``[B, H, D]``: ``max_j |v_jd| / 448`` over the valid keys (``1 / 448`` for an
            all-zero channel); ``v ~= v_q * scale``.
        transposed: the layout of ``v`` (Hopper's FP8 MMA reads its B operand K-major).
    """

    v: torch.Tensor
    scale: torch.Tensor
    transposed: bool


def fp8_unsupported(device: torch.device) -> str | None:
    """Why ``device`` cannot run FP8 P.V (``None`` if it can): CUDA compute capability < 8.9."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_MIN_CAPABILITY:
        return (
            f"FP8 P.V needs compute capability >= 8.9 (Ada, Hopper), got {major}.{minor}: "
            "quantize='int8-fp8' and 'fp8' calls run quantize='int8' there"
        )
    return None


def value_absmax(v: torch.Tensor, layout: str, key_lengths: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``[B, H, D]``: ``max |v|`` per channel over the valid keys (one read of V, no copy
    without ``key_lengths``; rows past a length are excluded, they may hold NaN)."""
    seq_dim = 1 if layout == "bshd" else 2
    if key_lengths is not None:
        seq_len = v.shape[seq_dim]
        lengths = key_lengths.to(device=v.device, dtype=torch.int64).clamp(0, seq_len)
        valid = torch.arange(seq_len, device=v.device)[None, :] < lengths[:, None]
        valid = valid[:, :, None, None] if layout == "bshd" else valid[:, None, :, None]
        v = torch.where(valid, v, 0)
    low, high = torch.aminmax(v, dim=seq_dim)
    return torch.maximum(high.float(), -low.float())
