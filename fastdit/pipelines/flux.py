"""Flux.1 (``FluxTransformer2DModel``: dev, schnell, img2img, inpaint, fill, control) on fastdit's line.

Where things are in diffusers' Flux (checked against diffusers 0.42):

* joint self-attention in two kinds of blocks, both run by ``FluxAttnProcessor``:
  ``transformer_blocks[i].attn`` (19 dual-stream blocks: image through ``to_q/to_k/to_v``, text
  through ``add_q_proj/add_k_proj/add_v_proj``, RMS norms, the processor concatenates ``[text |
  image]``) and ``single_transformer_blocks[i].attn`` (38 single-stream blocks: the block
  concatenates ``[text | image]`` before attention; no output projection). RoPE covers every token
  (text ids are zeros). No mask: the T5 prompt is padded to 512 tokens and attended to in full;
* the input is packed 2x2 latents ``[B, N, C]``; the grid comes from ``img_ids`` (``(0, row, col)``
  per token, row-major), verified to be one complete grid: one host read per new ``img_ids``
  tensor (the pipelines build it once per call). 1 MP (1024 x 1024) is 64 x 64 = 4,096 image
  tokens + 512 text; 4 MP is 16,384 + 512.

Layers are numbered dual-stream blocks first, then single-stream blocks. An image is one latent
frame: Radial's frame-distance rule does not apply (refused with the reason); GNA with a 2-D
window, Agent (image cells), VMoBA, AdaSpa and PARO run. Text rows and columns stay dense. Flux
Kontext appends the reference image's tokens (ids ``(1, row, col)``) after the target's: not a
single grid, refused with a clear error.
"""

from __future__ import annotations

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import JointAttnProcessor, argument, check_video_sizes, refuse_frame_rules

__all__ = ["FluxSparseAttnProcessor", "grid_from_ids"]

FAMILY = "Flux.1"
MODEL = "FluxTransformer2DModel"


class FluxSparseAttnProcessor(JointAttnProcessor):
    """Attention processor for ``FluxAttention`` that runs the joint attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.GNA(window=(1, 17, 17)))

        pipe.transformer.set_attn_processor(FluxSparseAttnProcessor(fastdit.Agent()))
        fastdit.attach(pipe)
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        super().__init__(method, schedule)
        self._stock = FluxAttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self._is_bound(attn):
            return self._call_stock(self._stock, *stock_args)
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._call_stock(self._stock, *stock_args)
        if attention_mask is not None:
            raise ValueError(f"{MODEL}: fastdit runs Flux's attention without a mask, got one of shape {tuple(attention_mask.shape)}")
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, text_query, text_key, text_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:  # dual-stream: [text | image]
            text_query, text_key, text_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (text_query, text_key, text_value)
            )
            query = torch.cat([attn.norm_added_q(text_query), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_key), key], dim=1)
            value = torch.cat([text_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        out = self._sparse_attention(attn, layer, query, key, value)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:  # single-stream: the block projects
            return out
        text, image = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text.contiguous())


def grid_from_ids(img_ids: torch.Tensor) -> LatentGrid:
    """The ``1 x rows x cols`` grid of ``img_ids`` (``[N, 3]``, ``(0, row, col)`` row-major)."""
    ids = (img_ids[0] if img_ids.dim() == 3 else img_ids).detach().to("cpu", torch.float64)  # 3-D: deprecated
    rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    index = torch.arange(ids.shape[0], dtype=torch.float64)
    canonical = rows * cols == ids.shape[0] and bool(
        (ids[:, 0] == 0).all() and (ids[:, 1] == index // cols).all() and (ids[:, 2] == index % cols).all()
    )
    if not canonical:
        raise ValueError(
            f"{MODEL}: img_ids are not one row-major grid of (0, row, col) ids (Flux Kontext's "
            "reference-image tokens, or custom ids); fastdit adapts text + one latent image"
        )
    return LatentGrid(1, rows, cols)


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    """Dual-stream blocks' ``attn``, then single-stream blocks' ``attn``.

    Raises ValueError when an IP-Adapter processor is installed there: fastdit's processor would
    replace it and the image prompt would be dropped without a word."""
    modules = [block.attn for block in transformer.transformer_blocks] + [
        block.attn for block in transformer.single_transformer_blocks
    ]
    adapters = {type(m.processor).__name__ for m in modules if "IPAdapter" in type(m.processor).__name__}
    if adapters:
        raise ValueError(
            f"{MODEL} has IP-Adapter processors ({', '.join(sorted(adapters))}) on its joint attention; "
            "fastdit's processor would replace them: unload the IP-Adapter before fastdit.apply"
        )
    return modules


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 3, MODEL)


_ids_cache: list = []  # [(img_ids tensor, grid)]: the latest one only


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """``[text | image]``: the prompt (padded length), then the packed latent grid."""
    hidden_states, _ = forward_inputs(args, kwargs)
    text = argument(args, kwargs, "encoder_hidden_states", 1, MODEL)
    img_ids = argument(args, kwargs, "img_ids", 4, MODEL)
    if _ids_cache and _ids_cache[0][0] is img_ids:
        grid = _ids_cache[0][1]
    else:
        grid = grid_from_ids(img_ids)
        _ids_cache[:] = [(img_ids, grid)]
    if grid.num_tokens != hidden_states.shape[1]:
        raise ValueError(f"{MODEL}: {hidden_states.shape[1]} image tokens but img_ids describe {grid.shape}")
    return SequenceLayout(grid, TextSegment(text.shape[1], "before"))



def check_method(method) -> None:
    refuse_frame_rules(method, MODEL)


def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """Flux's rule: sides multiples of 16 (VAE 8x, 2x2 packing); images have no frame count."""
    check_video_sizes(FAMILY, height, width, None, temporal=None, spatial=16)


class FluxAdapter(ModelAdapter):
    """``FluxTransformer2DModel``: see the module docstring."""

    model_classes = ("FluxTransformer2DModel",)
    family = FAMILY
    processor_class = FluxSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_method = staticmethod(check_method)
    check_sizes = staticmethod(check_sizes)
