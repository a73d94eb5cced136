"""CogVideoX 1.0 and 1.5 (``CogVideoXTransformer3DModel``) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' CogVideoX (checked against diffusers 0.42):

* joint self-attention is ``transformer_blocks[i].attn1``, run by ``CogVideoXAttnProcessor2_0``
  (which calls SDPA itself): one set of projections over ``[text | video]``, LayerNorm QK norm per
  head, RoPE on the video rows only (the 5B models and 1.5; the 2B model has none), no mask. The
  text is the T5 prompt padded to 226 tokens, attended to in full (padding included), as stock does;
* the input is ``(B, F, C, H, W)`` (frames on dim 1); the grid is
  ``(F // patch_size_t, H // patch_size, W // patch_size)`` (no temporal patch in 1.0): 13 x 30 x 45
  = 17,550 tokens for the 5B models at 49 x 480 x 720; 11 x 48 x 85 = 44,880 for 1.5 (2x2x2 patch) at
  81 x 768 x 1360. The pipelines batch the CFG passes into one forward; the step comes from the timestep.

On sparse steps and layers the attention runs on the method's plan over ``[text | video]`` (text
before the video, rows and columns dense); Q/K/V are computed exactly as stock. Methods that
reorder tokens (GNA) reorder the video per call, the text in place.
"""

from __future__ import annotations

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import JointAttnProcessor, argument, check_video_sizes

__all__ = ["CogVideoXSparseAttnProcessor"]

FAMILY = "CogVideoX"
MODEL = "CogVideoXTransformer3DModel"


class CogVideoXSparseAttnProcessor(JointAttnProcessor):
    """Attention processor for CogVideoX's joint attention that runs it through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial(decay=0.5))

        pipe.transformer.set_attn_processor(CogVideoXSparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = CogVideoXAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self._is_bound(attn):
            return self._stock(*stock_args)
        if attention_mask is not None:
            raise ValueError(f"{MODEL}'s joint attention takes no mask, got one of shape {tuple(attention_mask.shape)}")
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._stock(*stock_args)

        num_text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (
            projection(joint).unflatten(2, (attn.heads, -1)) for projection in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = torch.cat([query[:, :num_text], apply_rotary_emb(query[:, num_text:], image_rotary_emb, sequence_dim=1)], 1)
            key = torch.cat([key[:, :num_text], apply_rotary_emb(key[:, num_text:], image_rotary_emb, sequence_dim=1)], 1)
        out = self._sparse_attention(attn, layer, query, key, value)
        out = attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(query.dtype)))
        text, video = out.split([num_text, out.shape[1] - num_text], dim=1)
        return video, text


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.transformer_blocks]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 2, MODEL)


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """``[text | video]``: the prompt (padded length), then the patchified grid, frame-major."""
    hidden_states, _ = forward_inputs(args, kwargs)
    text = argument(args, kwargs, "encoder_hidden_states", 1, MODEL)
    config = transformer.config
    _, frames, _, height, width = hidden_states.shape
    patch_t = config.patch_size_t or 1
    grid = LatentGrid(frames // patch_t, height // config.patch_size, width // config.patch_size)
    return SequenceLayout(grid, TextSegment(text.shape[1], "before"))



def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """CogVideoX's rule: frames ``4k + 1`` (VAE 4x temporal), sides multiples of 16."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=4, spatial=16)


class CogVideoXAdapter(ModelAdapter):
    """``CogVideoXTransformer3DModel``: see the module docstring."""

    model_classes = ("CogVideoXTransformer3DModel",)
    family = FAMILY
    processor_class = CogVideoXSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_sizes = staticmethod(check_sizes)
