"""Dense attention on fastdit's own kernel: every query block visits every key block.

The baseline of every comparison, and numerically the stock processor's output (same softmax
attention, computed by :func:`fastdit.kernels.block_sparse_attention` with a full plan).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity
from ..layout import LatentGrid, SequenceLayout
from .base import Method, MethodPlan, PlanCache

__all__ = ["Dense"]


@dataclass(frozen=True)
class Dense(Method):
    """Full attention through fastdit's block-sparse kernel with a dense plan."""

    name = "dense"
    # The kernel baseline: a schedule's dense steps would only hand it to the stock processor.
    follows_schedule = False

    block_size: int = 128
    _cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={self.block_size!r}"
            )

    def plan(self, layout: SequenceLayout | LatentGrid, device=None) -> MethodPlan:
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        device = PlanCache.device(device)

        def build() -> MethodPlan:
            seq = layout.num_tokens
            return MethodPlan(BlockSparsity.dense(seq, seq, self.block_size, device=device), layout)

        return self._cache.get_or_build((layout, device), build)
