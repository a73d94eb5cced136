"""Sparse-attention methods: each plans a block sparsity for a sequence layout.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a :class:`~fastdit.kernels.BlockSparsity`)
-> ``kernels/`` (executes it). A method never launches an attention kernel of its own; adding a
method is one new file here.
"""

from .adaspa import AdaSpa, AdaSpaRuntime
from .agent import Agent
from .base import MethodPlan
from .gna import GNA, GNACheck
from .paro import PARO, ParoPlan
from .radial import Radial
from .vmoba import VMoBA

__all__ = ["AdaSpa", "AdaSpaRuntime", "Agent", "GNA", "GNACheck", "MethodPlan", "PARO", "ParoPlan", "Radial", "VMoBA"]
