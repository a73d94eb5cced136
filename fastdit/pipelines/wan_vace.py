"""Wan VACE (``WanVACETransformer3DModel``) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' Wan VACE (checked against diffusers 0.42): the main stack is Wan's
(``blocks[i].attn1`` self-attention over the patchified latent grid, ``attn2`` cross-attention),
and a control stack ``vace_blocks[j]`` (``WanVACETransformerBlock``) runs first on the control
latents (the VACE context, zero-padded to the latent's token count), with its own ``attn1``
self-attention over the same grid and the same RoPE; its hints are added to the main hidden states
after the blocks listed in ``config.vace_layers``. Every attention module runs Wan's
``WanAttnProcessor``. Reference images are extra latent frames in front of the video (the
pipeline concatenates them along the frame axis), so they are frames of the grid.

fastdit runs both stacks' self-attention with the method: layers are numbered main blocks first
(``0 .. num_layers - 1``), then the control blocks, so ``dense_layers`` counts main blocks first.
The processor is Wan's (:class:`~fastdit.pipelines.wan.WanSparseAttnProcessor`). Methods that
reorder tokens (GNA) reorder Q/K/V per attention call: the hints are added between blocks in
diffusers' order, so Wan's once-per-forward block hooks do not apply here.
"""

from __future__ import annotations

import torch

from .base import ModelAdapter
from .joint import check_video_sizes
from .wan import WanSparseAttnProcessor, forward_inputs, sequence_layout  # noqa: F401 (adapter interface)

__all__ = ["WanSparseAttnProcessor"]

FAMILY = "Wan VACE"

# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    """Main blocks' ``attn1``, then the control blocks' ``attn1``."""
    return [block.attn1 for block in transformer.blocks] + [block.attn1 for block in transformer.vace_blocks]



def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """Wan's rule: frames ``4k + 1``, sides multiples of 16."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=4, spatial=16)


class WanVACEAdapter(ModelAdapter):
    """``WanVACETransformer3DModel``: see the module docstring."""

    model_classes = ("WanVACETransformer3DModel",)
    family = FAMILY
    processor_class = WanSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_sizes = staticmethod(check_sizes)
