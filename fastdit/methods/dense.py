"""Dense attention on fastdit's own kernel: every query block visits every key block.

The baseline of every comparison, and numerically the stock processor's output (same softmax
attention, computed by :func:`fastdit.kernels.block_sparse_attention` with a full plan).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity
from ..layout import LatentGrid, SequenceLayout
from .base import Method, MethodPlan

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense(Method):
    """Full attention through fastdit's block-sparse kernel with a dense plan."""

    name = "dense"
    # The kernel baseline: a schedule's dense steps would only hand it to the stock processor.
    follows_schedule = False

    block_size: int = 128

    def __post_init__(self) -> None:
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={self.block_size!r}"
            )

    def plan(self, layout: SequenceLayout | LatentGrid, device=None) -> MethodPlan:
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        key = (layout, torch.device(device) if device is not None else None)
        cache = self.__dict__.setdefault("_plans", {})
        if key not in cache:
            seq = layout.num_tokens
            cache[key] = MethodPlan(BlockSparsity.dense(seq, seq, self.block_size, device=device), layout)
        return cache[key]
