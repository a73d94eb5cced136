"""Control plans for quality checks: the same density as a method, the blocks chosen at random.

A sparse method is only as good as the blocks it keeps. :class:`RandomBlocks` keeps, in every
query-block row, the same number of key blocks as a given density, chosen uniformly at random (a
fixed seed per layout). On the embedded trained model a method at its defaults must stay close to
dense while this control, at the method's density, falls clearly below it
(``tests/test_quality_trained.py``, ``benchmarks/quality_table.py``): a method that keeps the
wrong blocks looks like this control.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity
from ..layout import LatentGrid, SequenceLayout
from ..methods.base import Method, MethodPlan, PlanCache

__all__ = ["RandomBlocks"]


@dataclass(frozen=True)
class RandomBlocks(Method):
    """Every query block visits ``max(1, round(density * nK))`` key blocks drawn at random.

    Not registered (no ``name``): a control for tests and benchmarks, built directly.

    Attributes:
        density: target share of (query block, key block) pairs, in (0, 1].
        block_size: query and key block size, 64 or 128.
        seed: the draw; the same seed and layout give the same plan.
    """

    density: float
    block_size: int = 128
    seed: int = 0
    _cache: PlanCache = field(default_factory=PlanCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        density = self.density
        if (isinstance(density, bool) or not isinstance(density, numbers.Real)
                or not 0 < float(density) <= 1):
            raise ValueError(f"density must be a number in (0, 1], got density={density!r}")
        if self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got "
                             f"block_size={self.block_size!r}")

    def blocks_per_row(self, num_blocks: int) -> int:
        return min(num_blocks, max(1, round(float(self.density) * num_blocks)))

    def plan(self, layout: SequenceLayout | LatentGrid, device=None) -> MethodPlan:
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        device = PlanCache.device(device)

        def build() -> MethodPlan:
            blocks = math.ceil(layout.num_tokens / self.block_size)
            keep = self.blocks_per_row(blocks)
            generator = torch.Generator().manual_seed(self.seed)
            order = torch.rand(blocks, blocks, generator=generator).argsort(dim=1)[:, :keep]
            block_map = torch.zeros(blocks, blocks, dtype=torch.bool)
            block_map.scatter_(1, order, True)
            sparsity = BlockSparsity.from_block_map(block_map[None, None].to(device),
                                                    self.block_size)
            return MethodPlan(sparsity, layout)

        return self._cache.get_or_build((layout, device), build)
