"""Plain-PyTorch references for every kernel in ``fastdit.kernels``.

Each computes the same function as its Triton kernel from the same plan, in fp32, by masking
ordinary attention (the INT8 path: by quantizing the same way and attending over the
dequantized values; the INT8+FP8 path by replaying the kernel's online softmax tile by tile with
P and V rounded to e4m3). Tests compare the kernels against these; they are also the execution path
on a CPU without ``TRITON_INTERPRET=1``. Work is split over query-block chunks so that no
``S_q x S_kv`` tensor larger than :data:`MAX_CHUNK_ELEMENTS` exists at once.
"""

from __future__ import annotations

import math

import torch

from .backend import Backend, register_backend
from .plan import BlockSparsity
from .window import WindowMask
from .quantized import (
    FP8_E4M3_MAX,
    FP8_QK_QUANTIZATIONS,
    FP8_QUANTIZATIONS,
    P_SCALE,
    SCORE_OFFSET,
    QuantizedQK,
    QuantizedV,
    fp8_unsupported,
    sampled_key_mean,
    value_absmax,
)

LOG2E = 1.4426950408889634
MAX_CHUNK_ELEMENTS = 1 << 26


def _to_bhsd_fp32(x: torch.Tensor, layout: str) -> torch.Tensor:
    x = x.transpose(1, 2) if layout == "bshd" else x
    return x.to(torch.float32)


def _token_mask(
    plan: BlockSparsity,
    q_blocks: slice,
    seq_q: int,
    seq_kv: int,
    key_lengths: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Boolean ``[B|Bp, H|Hp, rows, S_kv]`` mask for the query rows of ``q_blocks``."""
    block_map = plan.to_block_map()[:, :, q_blocks].to(device)
    rows = torch.arange(q_blocks.start * plan.q_block_size, seq_q, device=device)
    rows = rows[: (q_blocks.stop - q_blocks.start) * plan.q_block_size]
    cols = torch.arange(seq_kv, device=device)
    mask = block_map[:, :, (rows // plan.q_block_size - q_blocks.start)][
        ..., cols // plan.kv_block_size
    ]
    if key_lengths is not None:
        mask = mask & (cols[None, :] < key_lengths.to(device)[:, None])[:, None, None, :]
    return mask


def _nonfinite_terms(probs: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``sum_j [visible_ij] p_ij * v_jd`` over keys whose values are NaN or +-inf (0 elsewhere in
    ``values``), as IEEE arithmetic gives it (0 * inf = NaN, inf - inf = NaN), without forming
    ``p * v`` per (row, key, dim): counts of the cases by indicator matmuls."""
    visible = visible.expand(probs.shape)
    positive = (visible & (probs > 0)).to(torch.float32)
    zero = (visible & (probs == 0)).to(torch.float32)
    nan_hits = torch.einsum("bhij,bhjd->bhid", visible.to(torch.float32), values.isnan().float())
    nan_hits += torch.einsum("bhij,bhjd->bhid", zero, values.isinf().float())
    plus = torch.einsum("bhij,bhjd->bhid", positive, values.isposinf().float()) > 0
    minus = torch.einsum("bhij,bhjd->bhid", positive, values.isneginf().float()) > 0
    terms = torch.where(plus, float("inf"), torch.where(minus, float("-inf"), 0.0))
    return torch.where((nan_hits > 0) | (plus & minus), float("nan"), terms)


def _query_chunks(plan: BlockSparsity, batch: int, heads: int, seq_kv: int):
    rows_per_chunk = max(1, MAX_CHUNK_ELEMENTS // max(1, batch * heads * seq_kv))
    blocks_per_chunk = max(1, rows_per_chunk // plan.q_block_size)
    for start in range(0, plan.num_q_blocks, blocks_per_chunk):
        yield slice(start, min(start + blocks_per_chunk, plan.num_q_blocks))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BlockSparsity,
    *,
    scale: float,
    layout: str = "bshd",
    return_lse: bool = False,
    key_lengths: torch.Tensor | None = None,
    window: WindowMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked softmax attention in fp32; output in the input's dtype and layout, LSE fp32.

    With ``window``, its partial blocks are visited too, under its token-level rule."""
    qf, kf, vf = (_to_bhsd_fp32(x, layout) for x in (q, k, v))
    batch, heads, seq_q, _ = qf.shape
    seq_kv = kf.shape[2]
    plan.check_shape(seq_q, seq_kv)
    # A key a row does not see must not reach its output, even when its value is NaN or inf
    # (0 * NaN = NaN in the P.V product): non-finite values are taken out of the product and
    # added back only where they are visible (one host read per call, to skip that when V is
    # finite, as it nearly always is).
    finite = torch.isfinite(vf)
    v_finite = vf if bool(finite.all()) else None
    if v_finite is None:
        v_finite = torch.where(finite, vf, 0.0)
        nonfinite_keys = (~finite).any(dim=-1).any(dim=(0, 1)).nonzero()[:, 0]  # [n_bad]
        v_nonfinite = torch.where(finite, 0.0, vf)[:, :, nonfinite_keys]  # [B, H, n_bad, D]
    out = torch.empty((batch, heads, seq_q, vf.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    for q_blocks in _query_chunks(plan, batch, heads, seq_kv):
        rows = slice(q_blocks.start * plan.q_block_size, min(seq_q, q_blocks.stop * plan.q_block_size))
        mask = _token_mask(plan, q_blocks, seq_q, seq_kv, key_lengths, q.device)
        if window is not None:
            partial = _token_mask(window.partial, q_blocks, seq_q, seq_kv, key_lengths, q.device)
            rule = window.allowed(torch.arange(rows.start, rows.stop, device=q.device),
                                  torch.arange(seq_kv, device=q.device))
            mask = mask | (partial & rule)
        scores = torch.einsum("bhid,bhjd->bhij", qf[:, :, rows], kf) * scale
        scores = scores.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)
        # Rows with no visible key: probabilities 0 (not NaN), output 0, LSE -inf.
        probs = torch.exp(scores - row_lse.nan_to_num(neginf=0.0)[..., None])
        rows_out = torch.einsum("bhij,bhjd->bhid", probs, v_finite)
        if v_finite is not vf:
            rows_out = rows_out + _nonfinite_terms(
                probs[..., nonfinite_keys], mask[..., nonfinite_keys], v_nonfinite
            )
        out[:, :, rows] = rows_out
        lse[:, :, rows] = row_lse
    out = out.transpose(1, 2) if layout == "bshd" else out
    return out.to(q.dtype), (lse if return_lse else None)


def block_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    plan: BlockSparsity,
    *,
    scale: float,
    layout: str = "bshd",
    key_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``W[b, h, p, c] = sum exp(scale * q_i . k_j - lse_i)`` over visited blocks, fp32."""
    qf, kf = _to_bhsd_fp32(q, layout), _to_bhsd_fp32(k, layout)
    batch, heads, seq_q, _ = qf.shape
    seq_kv = kf.shape[2]
    plan.check_shape(seq_q, seq_kv)
    mass = torch.zeros(
        (batch, heads, plan.num_q_blocks, plan.num_kv_blocks), dtype=torch.float32, device=q.device
    )
    # Rows with lse = -inf have no keys and contribute nothing.
    lse = torch.where(torch.isneginf(lse), float("inf"), lse.to(torch.float32))
    kv_block_of = torch.arange(seq_kv, device=q.device) // plan.kv_block_size
    for q_blocks in _query_chunks(plan, batch, heads, seq_kv):
        rows = slice(q_blocks.start * plan.q_block_size, min(seq_q, q_blocks.stop * plan.q_block_size))
        mask = _token_mask(plan, q_blocks, seq_q, seq_kv, key_lengths, q.device)
        scores = torch.einsum("bhid,bhjd->bhij", qf[:, :, rows], kf) * scale
        probs = torch.exp(scores - lse[:, :, rows, None]) * mask
        q_block_of = torch.arange(rows.start, rows.stop, device=q.device) // plan.q_block_size
        per_row = torch.zeros((batch, heads, probs.shape[2], plan.num_kv_blocks), device=q.device)
        per_row.index_add_(3, kv_block_of, probs)
        mass.index_add_(2, q_block_of, per_row)
    return mass


def block_mean_pool_reference(x: torch.Tensor, block_size: int, *, layout: str = "bshd") -> torch.Tensor:
    """Mean of each run of ``block_size`` tokens, fp32 ``[B, H, nb, D]``; the last run may be short."""
    xf = _to_bhsd_fp32(x, layout)
    seq_len = xf.shape[2]
    block_of = torch.arange(seq_len, device=x.device) // block_size
    num_blocks = int(block_of[-1]) + 1
    sums = torch.zeros((*xf.shape[:2], num_blocks, xf.shape[3]), device=x.device)
    sums.index_add_(2, block_of, xf)
    counts = torch.bincount(block_of, minlength=num_blocks).to(torch.float32)
    return sums / counts[:, None]


def segment_mean_pool_reference(x: torch.Tensor, offsets: torch.Tensor, *, layout: str = "bshd") -> torch.Tensor:
    """Mean of each run ``[offsets[c], offsets[c + 1])`` of tokens, fp32 ``[B, H, nseg, D]``."""
    xf = _to_bhsd_fp32(x, layout)
    offsets = offsets.to(device=x.device, dtype=torch.long)
    lengths = offsets[1:] - offsets[:-1]
    segment_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
    sums = torch.zeros((*xf.shape[:2], lengths.numel(), xf.shape[3]), device=x.device)
    sums.index_add_(2, segment_of, xf)
    return sums / lengths.to(torch.float32)[:, None]


def quantize_qk_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    q_block_size: int,
    kv_block_size: int,
    scale: float,
    layout: str = "bshd",
    key_lengths: torch.Tensor | None = None,
    lse_shift: bool = False,
    smooth_k: bool = True,
    fp8: bool = False,
    k_mean: torch.Tensor | None = None,
) -> QuantizedQK:
    """Per-block symmetric INT8 Q and K with K smoothed by its sampled mean
    (:func:`~fastdit.kernels.quantized.sampled_key_mean`, the vector
    :mod:`fastdit.kernels.triton.quantize` subtracts), in fp32 PyTorch; ``fp8``: e4m3
    (``quantize="fp8"``: ``e4m3(x * 448 / max|x|)`` per block, round to nearest even).
    ``k_mean`` (fp32 ``[B, H, D]``): another smoothing vector instead, for tests that compare
    choices (the exact mean, none)."""
    qf, kf = _to_bhsd_fp32(q, layout), _to_bhsd_fp32(k, layout)
    seq_kv = kf.shape[2]
    valid = None
    if key_lengths is not None:
        valid = (torch.arange(seq_kv, device=k.device)[None, :] < key_lengths.to(k.device)[:, None].long())
        valid = valid[:, None, :, None]
        kf = torch.where(valid, kf, 0.0)  # rows past the valid length may hold anything
    mean = sampled_key_mean(k, layout, key_lengths, smooth_k) if k_mean is None else k_mean.float()
    shift = torch.einsum("bhsd,bhd->bhs", qf, mean) * scale if lse_shift else None
    k_smoothed = kf - mean[:, :, None, :]
    if valid is not None:
        k_smoothed = torch.where(valid, k_smoothed, 0.0)
    k_q, k_scale = _quantize_blocks_reference(k_smoothed, kv_block_size, 1.0, fp8)
    q_q, q_scale = _quantize_blocks_reference(qf, q_block_size, scale * LOG2E, fp8)
    return QuantizedQK(q_q, q_scale, k_q, k_scale, mean, shift, q_block_size, kv_block_size, scale)


def _quantize_blocks_reference(x: torch.Tensor, block: int, multiplier: float, fp8: bool = False):
    """int8 (or e4m3) ``[B, H, S, D]`` and fp32 scales ``[B, H, ceil(S/block)]`` of an fp32
    ``[B, H, S, D]``."""
    batch, heads, seq_len, head_dim = x.shape
    num_blocks = -(-seq_len // block)
    padded = torch.zeros((batch, heads, num_blocks * block, head_dim), dtype=torch.float32, device=x.device)
    padded[:, :, :seq_len] = x
    blocks = padded.view(batch, heads, num_blocks, block, head_dim)
    absmax = blocks.abs().amax(dim=(-1, -2))
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # all-zero block: scale 1/127
    if fp8:
        y = (blocks * FP8_E4M3_MAX / absmax[..., None, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
        x_q = y.to(torch.float8_e4m3fn).view(batch, heads, -1, head_dim)[:, :, :seq_len]
        return x_q.contiguous(), absmax / FP8_E4M3_MAX * multiplier
    y = blocks * (127.0 / absmax)[..., None, None]
    y = y + torch.where(y >= 0, 0.5, -0.5)
    x_q = y.clamp(-127.0, 127.0).trunc().to(torch.int8).view(batch, heads, -1, head_dim)[:, :, :seq_len]
    return x_q.contiguous(), absmax / 127.0 * multiplier


def int8_attention_reference(
    quantized: QuantizedQK,
    v: torch.Tensor,
    plan: BlockSparsity,
    *,
    layout: str = "bshd",
    return_lse: bool = False,
    key_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The INT8 kernel's function in fp32: attention over the dequantized (smoothed) Q and K, then
    the LSE shift; output in V's dtype and ``layout``."""
    q_rows = torch.arange(quantized.q.shape[2], device=v.device) // quantized.q_block_size
    kv_rows = torch.arange(quantized.k.shape[2], device=v.device) // quantized.kv_block_size
    # q_scale holds scale * log2(e): the dequantized product is in log2 units; ln 2 turns it back.
    q_deq = quantized.q.float() * quantized.q_scale[:, :, q_rows, None]
    k_deq = quantized.k.float() * quantized.k_scale[:, :, kv_rows, None]
    v_bhsd = v.transpose(1, 2) if layout == "bshd" else v
    out, lse = attention_reference(
        q_deq, k_deq, v_bhsd.float(), plan, scale=1.0 / LOG2E, layout="bhsd", return_lse=True,
        key_lengths=key_lengths,
    )
    out = (out.transpose(1, 2) if layout == "bshd" else out).to(v.dtype)
    if not return_lse:
        return out, None
    return out, lse + quantized.lse_shift


def quantize_v_fp8_reference(
    v: torch.Tensor,
    *,
    layout: str = "bshd",
    key_lengths: torch.Tensor | None = None,
    transposed: bool = False,
) -> QuantizedV:
    """Per-channel e4m3 V (the function :func:`fastdit.kernels.triton.quantize.triton_quantize_v_fp8`
    computes), in PyTorch: ``v_q = e4m3(clamp(v * (448 / max|v_d|), -448, 448))``, rounding to
    nearest even (``torch.float8_e4m3fn``), keys past ``key_lengths`` stored 0."""
    absmax = value_absmax(v, layout, key_lengths)
    absmax = torch.where(absmax > 0, absmax, 1.0)
    vf = _to_bhsd_fp32(v, layout)
    seq_len = vf.shape[2]
    if key_lengths is not None:
        lengths = key_lengths.to(v.device)[:, None].long()
        valid = torch.arange(seq_len, device=v.device)[None, :] < lengths
        vf = torch.where(valid[:, None, :, None], vf, 0.0)
    inv = (FP8_E4M3_MAX / absmax)[:, :, None, :]
    v_q = (vf * inv).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    if transposed:
        padded = -(-seq_len // 16) * 16
        v_t = torch.zeros((*v_q.shape[:2], v_q.shape[3], padded), dtype=v_q.dtype, device=v.device)
        v_t[..., :seq_len] = v_q.transpose(2, 3)
        v_q = v_t
    return QuantizedV(v_q.contiguous(), absmax / FP8_E4M3_MAX, transposed)


def fp8_values(quantized_v: QuantizedV, seq_kv: int) -> torch.Tensor:
    """The e4m3 values of a :class:`QuantizedV` as fp32 ``[B, H, S_kv, D]`` (unscaled)."""
    v_q = quantized_v.v.float()
    return v_q[..., :seq_kv].transpose(2, 3) if quantized_v.transposed else v_q


def int8_fp8_attention_reference(
    quantized: QuantizedQK,
    quantized_v: QuantizedV,
    plan: BlockSparsity,
    *,
    dtype: torch.dtype,
    layout: str = "bshd",
    return_lse: bool = False,
    key_lengths: torch.Tensor | None = None,
    block_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The INT8+FP8 kernel's function, replayed: for every query block, its plan row's key blocks
    in order, ``block_n`` keys at a time (default: the whole key block, as the interpreter runs
    it), the online softmax of the kernel
    (:func:`~fastdit.kernels.triton.triton_common.fold_scores`) in the kernel's fp32 operations:
    the exact int8 scores plus ``c = 1.5 * 2**23`` (the kernel's int32 -> fp32 offset; no offset
    for e4m3 Q and K) times ``sc = q_scale * k_scale``, the running max
    ``m = max(m, fma(max(...), sc, -c * sc))``, ``p8 = exp2(fma(c + s, sc, -(fma(c, sc, m) -
    log2 448)))`` (``448 p``; an FMA rounds once, modelled by exact fp64 products), ``l`` the sum
    of the fp32 ``p8``, and ``acc = acc * alpha + e4m3(p8) @ v_q`` in fp32; then
    ``out = acc / l * v_scale`` and ``lse = ln 2 (m + log2 l) - ln 448`` (0 and LSE -inf for a row
    that saw no key). Output in ``dtype`` and ``layout``; rounding to e4m3 is
    ``torch.float8_e4m3fn``'s (nearest even)."""
    q_block, kv_block = quantized.q_block_size, quantized.kv_block_size
    block_n = block_n or kv_block
    batch, heads, seq_q, head_dim = quantized.q.shape
    seq_kv = quantized.k.shape[2]
    device = quantized.q.device
    num_q, num_kv = -(-seq_q // q_block), -(-seq_kv // kv_block)

    def blocks(x: torch.Tensor, rows: int, size: int) -> torch.Tensor:
        padded = x.new_zeros((batch, heads, rows * size, head_dim))
        padded[:, :, : x.shape[2]] = x
        return padded.view(batch, heads, rows, size, head_dim)

    q_int = blocks(quantized.q.float(), num_q, q_block)  # [B, H, nQ, bq, D]
    k_int = blocks(quantized.k.float(), num_kv, kv_block)  # [B, H, nK, bk, D]
    v_q = blocks(fp8_values(quantized_v, seq_kv), num_kv, kv_block)
    counts = plan.kv_counts.to(device).expand(batch, heads, num_q)
    indices = plan.kv_indices.to(device).long().expand(batch, heads, num_q, -1)
    kv_len = torch.full((batch,), seq_kv, device=device, dtype=torch.long)
    if key_lengths is not None:
        kv_len = key_lengths.to(device).long().clamp(0, seq_kv)
    m = torch.full((batch, heads, num_q, q_block), float("-inf"), device=device)
    l = torch.zeros_like(m)
    acc = torch.zeros((batch, heads, num_q, q_block, head_dim), device=device)
    k_scale = quantized.k_scale.to(device)
    offset = SCORE_OFFSET if quantized.q.dtype == torch.int8 else 0.0
    log2_p_scale = math.log2(P_SCALE)
    for slot in range(indices.shape[-1]):
        active = slot < counts  # [B, H, nQ]
        block = indices[..., slot].clamp(0, num_kv - 1)
        gather = block[..., None, None].expand(-1, -1, -1, kv_block, head_dim)
        k_tiles = torch.gather(k_int, 2, gather)
        v_tiles = torch.gather(v_q, 2, gather)
        block_scale = quantized.q_scale * torch.gather(k_scale, 2, block)  # fp32, as the kernel
        for sub in range(0, kv_block, block_n):
            raw = q_int @ k_tiles[..., sub : sub + block_n, :].transpose(-1, -2)  # exact integers
            cols = block[..., None] * kv_block + sub + torch.arange(block_n, device=device)
            visible = active[..., None] & (cols < kv_len[:, None, None, None])  # [B, H, nQ, bn]
            shifted = torch.where(visible[..., None, :], raw + offset, float("-inf"))
            offset_scaled = (offset * block_scale)[..., None]  # fp32, as the kernel
            if offset:  # the kernel's FMAs (one rounding): exact products in fp64, then fp32
                scale64 = block_scale.double()
                row_max = shifted.amax(-1).double() * scale64[..., None] - offset_scaled.double()
                row_max = row_max.float()
            else:
                row_max = shifted.amax(-1) * block_scale[..., None]
            m_new = torch.maximum(m, row_max)
            m_shift = torch.where(m_new == float("-inf"), 0.0, m_new)
            if offset:  # the kernel's fma(c, sc, m): one rounding
                bias = (offset * scale64[..., None] + m_shift.double()).float() - log2_p_scale
            else:
                bias = (m_shift + offset_scaled) - log2_p_scale
            if offset:
                exponent = shifted.double() * scale64[..., None, None] - bias.double()[..., None]
                exponent = exponent.float()
            else:
                exponent = shifted * block_scale[..., None, None] - bias[..., None]
            p8 = torch.exp2(exponent)  # 448 p
            alpha = torch.exp2(m - m_shift)
            l = l * alpha + p8.sum(-1)
            acc = acc * alpha[..., None] + (
                p8.to(torch.float8_e4m3fn).float() @ v_tiles[..., sub : sub + block_n, :])
            m = m_new
    no_keys = l == 0
    l_safe = torch.where(no_keys, 1.0, l)
    out = acc / l_safe[..., None] * quantized_v.scale.to(device)[:, :, None, None, :]
    out = out.reshape(batch, heads, num_q * q_block, head_dim)[:, :, :seq_q]
    out = (out.transpose(1, 2) if layout == "bshd" else out).to(dtype)
    if not return_lse:
        return out, None
    lse = torch.where(
        no_keys, float("-inf"), (m + torch.log2(l_safe)) * 0.6931471805599453 - math.log(P_SCALE)
    )
    lse = lse.reshape(batch, heads, num_q * q_block)[:, :, :seq_q]
    return out, lse + quantized.lse_shift


class ReferenceBackend(Backend):
    """The ``reference`` backend: the functions above, on any device and dtype."""

    name = "reference"
    priority = 90
    operations = ("attention", "block_mass", "block_mean_pool", "segment_mean_pool", "quantize_qk")

    def why_not(self, request):
        if request.quantize in FP8_QUANTIZATIONS:
            return fp8_unsupported(request.device)
        return None

    def attention(self, q, k, v, plan, *, scale, layout, return_lse, key_lengths, window, quantize, dense):
        if quantize is not None:
            quantized = quantize_qk_reference(
                q, k, q_block_size=plan.q_block_size, kv_block_size=plan.kv_block_size,
                scale=scale, layout=layout, key_lengths=key_lengths, lse_shift=return_lse,
                smooth_k=True, fp8=quantize in FP8_QK_QUANTIZATIONS,
            )
            if quantize in FP8_QUANTIZATIONS:
                quantized_v = quantize_v_fp8_reference(v, layout=layout, key_lengths=key_lengths)
                return int8_fp8_attention_reference(
                    quantized, quantized_v, plan, dtype=v.dtype, layout=layout,
                    return_lse=return_lse, key_lengths=key_lengths,
                )
            return int8_attention_reference(
                quantized, v, plan, layout=layout, return_lse=return_lse, key_lengths=key_lengths
            )
        return attention_reference(
            q, k, v, plan, scale=scale, layout=layout, return_lse=return_lse,
            key_lengths=key_lengths, window=window,
        )

    def block_mass(self, q, k, lse, plan, *, scale, layout, key_lengths):
        return block_mass_reference(q, k, lse, plan, scale=scale, layout=layout, key_lengths=key_lengths)

    def block_mean_pool(self, x, block_size, *, layout):
        return block_mean_pool_reference(x, block_size, layout=layout)

    def segment_mean_pool(self, x, offsets, *, layout):
        return segment_mean_pool_reference(x, offsets, layout=layout)

    def quantize_qk(self, q, k, *, q_block_size, kv_block_size, scale, layout, key_lengths, lse_shift, smooth_k):
        return quantize_qk_reference(
            q, k, q_block_size=q_block_size, kv_block_size=kv_block_size, scale=scale,
            layout=layout, key_lengths=key_lengths, lse_shift=lse_shift, smooth_k=smooth_k,
        )


register_backend(ReferenceBackend())
