"""Triton block-sparse kernels that execute any plan, with a PyTorch reference for each.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a :class:`BlockSparsity`) ->
``kernels/`` (executes it). A kernel never knows which method made its plan.
"""

from .dispatch import (
    BACKENDS,
    block_mass,
    block_mean_pool,
    block_sparse_attention,
    choose_backend,
    explain_backends,
    quantize_qk_int8,
    segment_mean_pool,
)
from .plan import SUPPORTED_BLOCK_SIZES, BlockSparsity
from .quantized import QuantizedQK
from .window import WindowMask

__all__ = [
    "BACKENDS",
    "SUPPORTED_BLOCK_SIZES",
    "BlockSparsity",
    "QuantizedQK",
    "WindowMask",
    "block_mass",
    "block_mean_pool",
    "block_sparse_attention",
    "choose_backend",
    "explain_backends",
    "quantize_qk_int8",
    "segment_mean_pool",
]
