"""Adapters from diffusers model families to fastdit's layout -> method -> kernel line.

Each module here (one per model family) holds the family's attention processor and its
:class:`ModelAdapter` subclass, which says where Q, K, V and RoPE are, where text sits in the
sequence, and how the latent grid and the denoising step are learned through diffusers hooks.
Defining the subclass registers it (see :mod:`.base`); third-party packages add families through
the entry-point group ``fastdit.pipelines``. The embedded offline demo pipelines are built in
:mod:`fastdit.testing.tiny`.
"""

from . import base
from .base import *  # noqa: F403 - the adapter interface, its registry, the processor base

# fastdit's own model families: importing a module registers its adapter.
from . import (  # noqa: E402, F401  (isort: skip)
    cogvideox, flux, hunyuan_video, hunyuan_video15, ltx_video, mochi, qwenimage, skyreels_v2, unet, wan, wan_vace,
)

__all__ = base.__all__
