"""INT8 Q and K for the quantized attention kernel: the container both backends share.

SageAttention's scheme (Zhang et al., 2025) as PARO (METHODS.md section 5) uses it:

* K is smoothed first: ``k_j <- k_j - k_mean`` with ``k_mean`` the per-(batch, head) mean over
  the valid keys. Every score of a query row ``i`` moves by the same ``-scale * q_i . k_mean``,
  which softmax ignores, so the output is unchanged; the LSE moves by that amount and
  ``lse_shift = scale * q_i . k_mean`` (fp32, from the unquantized Q) restores it. Smoothing
  removes the large offset channels that keys share, which would otherwise eat the INT8 range.
* Q and K are quantized symmetrically per token block: ``s = max|x| / 127`` over the block's
  (valid) rows and all head dims, ``x_q = round_half_away(x / s)`` in ``[-127, 127]`` (an all-zero
  block keeps ``s = 1 / 127``: never a zero scale, which would make masked scores NaN).
* ``scale * log2(e)`` is folded into Q's block scale, so the kernel's scores
  ``q_q . k_q * q_scale * k_scale`` are already in log2 units for ``exp2``.

Blocks are the plan's blocks (``q_block_size`` and ``kv_block_size`` tokens), so every tile of the
kernel lies inside one scale block. Key rows at or past a batch element's valid length are stored
as 0 and do not enter the mean or the scales (they may hold anything, even NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTIZATIONS = ("int8",)


@dataclass(frozen=True, eq=False)
class QuantizedQK:
    """INT8 Q and K with their per-block scales, contiguous ``(B, H, S, D)``.

    Attributes:
        q: int8 ``[B, H, S_q, D]``.
        q_scale: fp32 ``[B, H, ceil(S_q / q_block_size)]``: ``max|q| / 127 * scale * log2(e)``.
        k: int8 ``[B, H, S_kv, D]`` of the smoothed keys.
        k_scale: fp32 ``[B, H, ceil(S_kv / kv_block_size)]``: ``max|k - k_mean| / 127``.
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


def key_mean(k: torch.Tensor, layout: str, key_lengths: torch.Tensor | None, smooth: bool = True) -> torch.Tensor:
    """fp32 ``[B, H, D]`` mean of the valid keys (zeros when ``smooth`` is False).

    Without padding this is one fp32-accumulating reduction over K (no fp32 copy of K); with
    ``key_lengths`` the rows past each length are excluded (they may hold NaN).
    """
    seq_dim = 1 if layout == "bshd" else 2
    batch, heads, head_dim = k.shape[0], k.shape[3 - seq_dim], k.shape[3]
    if not smooth:
        return torch.zeros((batch, heads, head_dim), dtype=torch.float32, device=k.device)
    seq_len = k.shape[seq_dim]
    if key_lengths is None:
        return k.sum(dim=seq_dim, dtype=torch.float32) / seq_len
    lengths = key_lengths.to(device=k.device, dtype=torch.int64).clamp(0, seq_len)
    valid = torch.arange(seq_len, device=k.device)[None, :] < lengths[:, None]  # [B, S]
    valid = valid[:, :, None, None] if layout == "bshd" else valid[:, None, :, None]
    sums = torch.where(valid, k, 0).sum(dim=seq_dim, dtype=torch.float32)
    return sums / lengths.clamp_min(1).to(torch.float32)[:, None, None]
