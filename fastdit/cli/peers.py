"""The executors fastdit's benchmarks time themselves against, called the way their users call them.

Each ``*_attention(...)`` returns a function of ``(q, k, v)`` in ``(B, S, H, D)`` returning the output
in the same layout, or raises :class:`PeerUnavailable` with the reason (not installed, no GPU).
Used by ``fastdit bench`` (kernel rows) and ``benchmarks/e2e_bench.py`` (the "best dense"
baseline: stock processors with dense FA4 attention).

- FA4 (``flash-attn-4``, CuTe DSL): dense ``flash_attn_func``; block-sparse with
  ``BlockSparseTensorsTorch`` lists built once per plan (outside the timing, like a plan).
- FA3 (``fa3-fwd``): dense forward, prebuilt sm90.
- FlexAttention with ``kernel_options={"BACKEND": "FLASH"}`` (torch >= 2.11 lowers it to FA4):
  an always-true ``mask_mod`` and the kept blocks marked full, since with the default no-op
  ``mask_mod`` the block lists are dropped and it runs dense.
- SageAttention 1.x (``sageattention``): INT8 Q.K, fp16 P.V, Triton; dense only.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from ..kernels import BlockSparsity

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class PeerUnavailable(RuntimeError):
    """A peer executor cannot run here; the message says why."""


def _need_cuda(device: torch.device, what: str) -> None:
    if device.type != "cuda":
        raise PeerUnavailable(f"{what} needs a CUDA device, got {device.type}")


def _flash4(device: torch.device):
    _need_cuda(device, "FA4")
    from ..kernels.flash4 import flash_attn_cute

    module = flash_attn_cute()
    if isinstance(module, str):
        raise PeerUnavailable(module)
    return module


def fa4_dense_attention(device: torch.device, scale: float | None = None) -> Attention:
    module = _flash4(device)

    def run(q, k, v):
        out = module.flash_attn_func(q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out

    return run


def fa4_block_sparse_attention(plan: BlockSparsity, batch: int, scale: float | None = None) -> Attention:
    module = _flash4(plan.device)
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch

    from ..kernels.flash4 import flash4_block_sparse_tensors

    tensors = BlockSparseTensorsTorch(
        **flash4_block_sparse_tensors(plan, batch), block_size=(plan.q_block_size, plan.kv_block_size)
    )

    def run(q, k, v):
        out = module.flash_attn_func(q, k, v, softmax_scale=scale, block_sparse_tensors=tensors)
        return out[0] if isinstance(out, tuple) else out

    return run


def fa3_dense_attention(device: torch.device, scale: float | None = None) -> Attention:
    _need_cuda(device, "FA3")
    if importlib.util.find_spec("fa3_fwd_interface") is None:
        raise PeerUnavailable("fa3-fwd is not installed (pip install fa3-fwd)")
    from fa3_fwd_interface import flash_attn_func

    def run(q, k, v):
        out = flash_attn_func(q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out

    return run


def sage_attention(device: torch.device, scale: float | None = None) -> Attention:
    _need_cuda(device, "SageAttention")
    if importlib.util.find_spec("sageattention") is None:
        raise PeerUnavailable("sageattention is not installed (pip install sageattention)")
    from sageattention import sageattn

    def run(q, k, v):
        # smooth_k subtracts K's mean in place; softmax ignores the shift, so K's users do too.
        return sageattn(q, k, v, tensor_layout="NHD", is_causal=False, sm_scale=scale)

    return run


def _always(batch, head, q_idx, kv_idx):
    return q_idx >= 0


def flex_flash_attention(plan: BlockSparsity | None, batch: int, heads: int, seq_len: int,
                         device: torch.device) -> Attention:
    """FlexAttention on its FLASH (FA4) backend; ``plan=None`` runs dense."""
    _need_cuda(device, "FlexAttention's FLASH backend")
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError as exc:
        raise PeerUnavailable(f"FlexAttention unavailable: {exc}") from None
    block_mask = None
    if plan is not None:
        dims = (batch, heads, plan.num_q_blocks)
        counts = plan.kv_counts.expand(*dims).contiguous()
        indices = torch.zeros(*dims, plan.num_kv_blocks, dtype=torch.int32, device=device)
        indices[..., : plan.kv_indices.shape[-1]] = plan.kv_indices.expand(*dims, -1)
        block_mask = BlockMask.from_kv_blocks(
            torch.zeros_like(counts), torch.zeros_like(indices), full_kv_num_blocks=counts,
            full_kv_indices=indices, BLOCK_SIZE=(plan.q_block_size, plan.kv_block_size),
            mask_mod=_always, seq_lengths=(seq_len, seq_len),
        )
    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        out = compiled(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=block_mask,
                       kernel_options={"BACKEND": "FLASH"})
        return out.transpose(1, 2)

    return run
