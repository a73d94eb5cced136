"""What every method produces: a block sparsity over a sequence layout, in a stated token order."""

from __future__ import annotations

from dataclasses import dataclass

from ..kernels import BlockSparsity
from ..layout import SequenceLayout, TilePermutation


@dataclass(frozen=True, eq=False)
class MethodPlan:
    """A method's plan for one sequence layout.

    Attributes:
        sparsity: which key blocks each query block visits, over the whole self-attention
            sequence (video and text tokens) in the order given by ``permutation``.
        layout: the sequence the plan was built for (grid and text segment).
        permutation: ``None`` when the plan is over diffusers' frame-major token order; otherwise
            the tile-major permutation of the video tokens (text kept in place) that Q, K and V
            must go through before the kernel, and the output after it, inverted.
    """

    sparsity: BlockSparsity
    layout: SequenceLayout
    permutation: TilePermutation | None = None

    @property
    def density(self) -> float:
        return self.sparsity.density

    @property
    def sequence_length(self) -> int:
        """Tokens the kernel sees: the layout's, plus tile padding when permuted."""
        if self.permutation is None:
            return self.layout.num_tokens
        return self.permutation.permuted_sequence_length(self.layout)
