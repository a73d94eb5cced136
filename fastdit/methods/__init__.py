"""Sparse-attention methods: each plans a block sparsity for a sequence layout.

Architecture line: ``layout`` -> ``methods/<name>.py`` (plans a :class:`~fastdit.kernels.BlockSparsity`)
-> ``kernels/`` (executes it). A method never launches an attention kernel of its own; adding a
method is one new file: a :class:`Method` subclass with a ``name`` (see :mod:`.base`).
"""

from . import base
from .base import *  # noqa: F403 - the Method base, what methods produce, the registry

# fastdit's own methods, registered in this order (the order `fastdit info` lists them in).
from .dense import Dense  # isort: skip
from .radial import Radial  # isort: skip
from .gna import GNA, GNACheck  # isort: skip
from .agent import Agent  # isort: skip
from .vmoba import VMoBA  # isort: skip
from .adaspa import AdaSpa, AdaSpaRuntime  # isort: skip
from .paro import PARO, ParoPlan  # isort: skip

__all__ = [
    *base.__all__,
    "AdaSpa",
    "AdaSpaRuntime",
    "Agent",
    "Dense",
    "GNA",
    "GNACheck",
    "PARO",
    "ParoPlan",
    "Radial",
    "VMoBA",
]
