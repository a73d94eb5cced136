"""fastdit: fast block-sparse attention for video and image diffusion in HuggingFace diffusers.

The whole system is one line::

    layout (latent grid T x H x W, text segments, tile permutations)
      -> methods/<name>.py (plans a block sparsity: which key blocks each query block visits)
      -> kernels/ (Triton kernels that execute any plan, plus a PyTorch reference)
    pipelines/<model>.py adapts one diffusers model family to that line.

A new method is a :class:`fastdit.methods.Method` subclass with a ``name``; a new model family a
:class:`fastdit.pipelines.ModelAdapter` subclass; both register themselves (and come from
third-party packages through the entry-point groups ``fastdit.methods`` and ``fastdit.pipelines``).
"""

from . import kernels, layout, methods, pipelines
from .methods.paro.calibrate import calibrate
from .integration import apply, attach, remove, supported_models
from .kernels import (
    BlockSparsity,
    block_mass,
    block_mean_pool,
    block_sparse_attention,
    segment_mean_pool,
)
from .layout import LatentGrid, SequenceLayout, TextSegment, TilePermutation
from .methods.agent import Agent
from .methods.adaspa import AdaSpa
from .methods.dense import Dense
from .methods.gna import GNA
from .methods.paro import PARO, ParoPlan
from .methods.radial import Radial
from .methods.vmoba import VMoBA
from .natten import na1d, na2d, na3d
from .schedule import Schedule

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AdaSpa",
    "GNA",
    "PARO",
    "Dense",
    "ParoPlan",
    "Radial",
    "Schedule",
    "VMoBA",
    "apply",
    "attach",
    "calibrate",
    "remove",
    "supported_models",
    "na1d",
    "na2d",
    "na3d",
    "BlockSparsity",
    "LatentGrid",
    "SequenceLayout",
    "TextSegment",
    "TilePermutation",
    "__version__",
    "block_mass",
    "block_mean_pool",
    "block_sparse_attention",
    "segment_mean_pool",
    "kernels",
    "layout",
    "methods",
    "pipelines",
]
