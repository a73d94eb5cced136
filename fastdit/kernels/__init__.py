"""Backends that execute any plan: FlashAttention-4 where it can, fastdit's Triton kernels, and a
PyTorch reference for each.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a :class:`BlockSparsity`) ->
``kernels/`` (executes it). A kernel never knows which method made its plan.
"""

from .backend import Backend, Request, backends, register_backend
from .dispatch import (
    block_mass,
    block_mean_pool,
    block_sparse_attention,
    choose_backend,
    dense_attention,
    explain_backends,
    fastest_dense_backend,
    quantize_qk_int8,
    segment_mean_pool,
)
from .plan import SUPPORTED_BLOCK_SIZES, BlockSparsity
from .quantized import QuantizedQK
from .window import WindowMask

__all__ = [
    "Backend",
    "Request",
    "backends",
    "register_backend",
    "SUPPORTED_BLOCK_SIZES",
    "BlockSparsity",
    "QuantizedQK",
    "WindowMask",
    "block_mass",
    "block_mean_pool",
    "block_sparse_attention",
    "choose_backend",
    "dense_attention",
    "explain_backends",
    "fastest_dense_backend",
    "quantize_qk_int8",
    "segment_mean_pool",
]
