"""Sparse-attention methods: each plans a block sparsity for a sequence layout.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a :class:`~fastdit.kernels.BlockSparsity`)
-> ``kernels/`` (executes it). A method never launches an attention kernel of its own; adding a
method is one new file here.
"""

from .base import MethodPlan
from .gna import GNA, GNACheck
from .paro import PARO, ParoPlan
from .radial import Radial

__all__ = ["GNA", "GNACheck", "MethodPlan", "PARO", "ParoPlan", "Radial"]
