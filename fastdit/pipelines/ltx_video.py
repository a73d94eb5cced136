"""LTX-Video (``LTXVideoTransformer3DModel``: T2V, I2V, condition pipelines) on fastdit's line.

Where things are in diffusers' LTX-Video (checked against diffusers 0.42):

* self-attention is ``transformer_blocks[i].attn1`` (``LTXVideoAttnProcessor``): Q/K/V
  projections, RMS norm across heads, RoPE on ``[B, S, C]`` (interleaved pairs over the whole inner
  dim), then heads; no text inside it. ``attn2`` is cross-attention to the text (stock, untouched);
* the input is already packed, ``hidden_states`` ``[B, S, C]``, so the grid is not in its shape:
  ``LTXPipeline``/``LTXImageToVideoPipeline`` pass the token grid as ``num_frames``, ``height``,
  ``width`` (RoPE is built from them); ``LTXConditionPipeline`` passes ``video_coords`` ``[B, 3, S]``
  instead, and prepends **conditioning tokens** (each condition at a frame index > 0 is encoded and
  packed in front of the video: ``[condition 1 | condition 2 | ... | video]``). Per-token timesteps
  (``[B, S]``, conditioning tokens at lower noise) give the step through their maximum.

The layout is the video grid (frame-major, 6,144 tokens for 121 x 512 x 768) and, for the
condition pipeline, its conditioning tokens as a segment *before* the video that every method keeps
dense (rows and columns), as text is kept in joint models: the method's rule applies to the video,
conditions see and are seen by everything. From ``video_coords`` the grid is found as the suffix
that starts at the last token with coordinates ``(0, 0, 0)`` (the video's first token; conditions
sit at frame indices > 0) and is verified to be a complete frame-major grid; this costs one host
read of the coordinates per new coordinate tensor (the pipeline passes the same one every step).
Methods that reorder tokens (GNA) reorder per attention call.
"""

from __future__ import annotations

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import JointAttnProcessor, argument, check_video_sizes

__all__ = ["LTXVideoSparseAttnProcessor", "grid_from_video_coords"]

FAMILY = "LTX-Video"
MODEL = "LTXVideoTransformer3DModel"


class LTXVideoSparseAttnProcessor(JointAttnProcessor):
    """Attention processor for ``LTXAttention`` that runs self-attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial(decay=0.5))

        pipe.transformer.set_attn_processor(LTXVideoSparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)

    Cross-attention calls go to the stock ``LTXVideoAttnProcessor`` unchanged.
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

        super().__init__(method, schedule)
        self._stock = LTXVideoAttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None or not self._is_bound(attn):
            return self._call_stock(self._stock, *stock_args)
        if attention_mask is not None:
            raise ValueError(f"{MODEL}'s self-attention takes no mask, got one of shape {tuple(attention_mask.shape)}")
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._call_stock(self._stock, *stock_args)
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        query = attn.norm_q(attn.to_q(hidden_states))
        key = attn.norm_k(attn.to_k(hidden_states))
        value = attn.to_v(hidden_states)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb)
            key = apply_rotary_emb(key, image_rotary_emb)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        out = self._sparse_attention(attn, layer, query, key, value)
        out = out.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def grid_from_video_coords(video_coords: torch.Tensor) -> tuple[int, LatentGrid]:
    """``(conditioning tokens, grid)`` of an ``LTXConditionPipeline`` sequence from its ``[B, 3, S]``
    coordinates (see the module docstring). Raises ValueError when the suffix is not a grid."""
    if video_coords.dim() != 3 or video_coords.shape[1] != 3:
        raise ValueError(f"{MODEL}: video_coords must be [B, 3, S], got {tuple(video_coords.shape)}")
    coords = video_coords[0].detach().to("cpu", torch.float64)
    origin = (coords == 0).all(dim=0).nonzero()
    if origin.numel() == 0:
        raise ValueError(f"{MODEL}: no token of video_coords sits at (0, 0, 0), the video's first token")
    start = int(origin[-1])
    t, h, w = coords[:, start:]

    def leading_run(flags: torch.Tensor) -> int:
        stop = (~flags).nonzero()
        return int(stop[0]) if stop.numel() else flags.numel()

    width = leading_run((h == 0) & (t == 0))
    per_frame = leading_run(t == 0)
    seq = t.numel()
    problem = per_frame % width or seq % per_frame
    if not problem:
        frames, height = seq // per_frame, per_frame // width
        t, h, w = coords[:, start:].view(3, frames, height, width)
        problem = not (
            bool((t == t[:, :1, :1]).all())  # one time per frame
            and bool((h == h[:1, :, :1]).all())  # rows: the same in every frame and column
            and bool((w == w[:1, :1, :]).all())  # columns: the same in every frame and row
            and bool((t[1:, 0, 0] > t[:-1, 0, 0]).all())
            and bool((h[0, 1:, 0] > h[0, :-1, 0]).all())
            and bool((w[0, 0, 1:] > w[0, 0, :-1]).all())
        )
    if problem:
        raise ValueError(
            f"{MODEL}: the {seq} tokens from the last (0, 0, 0) coordinate on are not a frame-major "
            "video grid; fastdit reads the grid from num_frames/height/width or from LTXConditionPipeline's "
            "video_coords"
        )
    return start, LatentGrid(frames, height, width)


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.transformer_blocks]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 2, MODEL)


_coords_cache: list = []  # [(video_coords tensor, result)]: the latest one only


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """The video grid, and conditioning tokens (if any) as a dense segment before it."""
    hidden_states, _ = forward_inputs(args, kwargs)
    seq = hidden_states.shape[1]
    num_frames = argument(args, kwargs, "num_frames", 4, MODEL, None)
    video_coords = argument(args, kwargs, "video_coords", 8, MODEL, None)
    if num_frames is not None:
        height = argument(args, kwargs, "height", 5, MODEL, None)
        width = argument(args, kwargs, "width", 6, MODEL, None)
        grid = LatentGrid(num_frames, height, width)
        extra = seq - grid.num_tokens
    elif video_coords is not None:
        if _coords_cache and _coords_cache[0][0] is video_coords:
            extra, grid = _coords_cache[0][1]
        else:
            extra, grid = grid_from_video_coords(video_coords)
            _coords_cache[:] = [(video_coords, (extra, grid))]
    else:
        raise ValueError(f"{MODEL}.forward got neither num_frames/height/width nor video_coords: no grid")
    if extra < 0 or extra + grid.num_tokens != seq:
        raise ValueError(f"{MODEL}: {seq} tokens do not hold the grid {grid.shape} ({grid.num_tokens} tokens)")
    return SequenceLayout(grid, TextSegment(extra, "before") if extra else None)



def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """LTX-Video's rule: frames ``8k + 1`` (VAE 8x temporal), sides multiples of 32."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=8, spatial=32)


class LTXVideoAdapter(ModelAdapter):
    """``LTXVideoTransformer3DModel``: see the module docstring."""

    model_classes = ("LTXVideoTransformer3DModel",)
    family = FAMILY
    processor_class = LTXVideoSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_sizes = staticmethod(check_sizes)
