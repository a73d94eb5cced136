"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``, T2V and I2V) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' HunyuanVideo 1.5 (checked against diffusers 0.42):

* joint self-attention is ``transformer_blocks[i].attn`` (54 dual-stream blocks; no single-stream
  blocks), run by ``HunyuanVideo15AttnProcessor2_0``: video through ``to_q/to_k/to_v`` +
  ``norm_q/norm_k`` and RoPE, the other tokens through ``add_q_proj/add_k_proj/add_v_proj`` +
  ``norm_added_q/norm_added_k`` (no RoPE); the sequence is ``[video | other]``;
* the other tokens are, per sample, ``[valid image | valid byT5 | valid text | padding]``: the
  transformer itself moves every valid token (SigLIP image tokens in I2V, byT5 glyph tokens, Qwen
  text tokens) before every padded one and hands the blocks that ``[B, L]`` mask. The processor
  builds a **query-and-key** mask from it: a valid token attends to valid tokens only, and a padded
  row attends to nothing (its output is zero);
* the token refiner (``context_embedder.token_refiner``) has its own self-attention over the text,
  run by diffusers' default ``AttnProcessor2_0``: left to that stock processor;
* the latent grid is ``(F // patch_size_t, H // patch_size, W // patch_size)`` at the
  transformer's input (patch 1 at 480p/720p: 31 x 30 x 53 = 49,290 and 31 x 45 x 80 = 111,600
  tokens for 121 frames); the other tokens number ``L = image + byT5 + text`` (729 + 256 + 1000 at
  the pipeline's defaults). The step comes from the timestep (the pipeline's guider sets a
  ``cache_context`` without a step index).

On sparse steps and layers the attention runs on the method's plan over ``[video | other]`` with the
other tokens dense (every method keeps text rows and columns). The mask is reproduced exactly: the
other tokens are sorted valid-first per sample (a stable sort, the identity for what the
transformer builds, so any mask is handled), valid keys are one count per sample (the kernel's
``key_padding``), and padded rows are set to zero, as the stock processor's fully masked rows are.
No padded key is ever attended to, and every output, padded rows included, equals stock.
Methods that reorder tokens (GNA) get the video tile-major per call, the other tokens in place.
"""

from __future__ import annotations

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import (
    JointAttnProcessor,
    argument,
    check_video_sizes,
    gather_tokens,
    scatter_tokens,
    zero_padded_rows,
)

__all__ = ["HunyuanVideo15SparseAttnProcessor"]

FAMILY = "HunyuanVideo 1.5"
MODEL = "HunyuanVideo15Transformer3DModel"


class HunyuanVideo15SparseAttnProcessor(JointAttnProcessor):
    """Attention processor for HunyuanVideo 1.5 that runs the joint attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial(decay=0.95, sink=False))

        pipe.transformer.set_attn_processor(HunyuanVideo15SparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)

    One instance can be installed on every attention module: the token refiner's self-attention
    goes to diffusers' default processor, any joint module fastdit did not register to the stock one.
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = HunyuanVideo15AttnProcessor2_0()
        self._stock_default = AttnProcessor2_0()  # the token refiner's


    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        if getattr(attn, "add_q_proj", None) is None:  # the token refiner
            return self._stock_default(attn, hidden_states, encoder_hidden_states, attention_mask)
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self._is_bound(attn):
            return self._call_stock(self._stock, *stock_args)
        if encoder_hidden_states is None or attention_mask is None:
            raise ValueError(f"{MODEL}'s joint attention is called with the other tokens and their mask")
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._call_stock(self._stock, *stock_args)

        num_video, num_other = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if tuple(attention_mask.shape) != (hidden_states.shape[0], num_other):
            raise ValueError(
                f"{MODEL}: expected the [B, L] mask of the other tokens, got shape "
                f"{tuple(attention_mask.shape)} for B={hidden_states.shape[0]}, L={num_other}"
            )
        heads = attn.heads
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(2, (heads, -1)))
        key = attn.norm_k(attn.to_k(hidden_states).unflatten(2, (heads, -1)))
        value = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        other_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        other_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        other_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if attn.norm_added_q is not None:
            other_query = attn.norm_added_q(other_query)
        if attn.norm_added_k is not None:
            other_key = attn.norm_added_k(other_key)

        order, lengths = self._valid_first(attention_mask)
        other_query, other_key, other_value = (
            gather_tokens(x, order) for x in (other_query, other_key, other_value)
        )
        query = torch.cat([query, other_query], dim=1)
        key = torch.cat([key, other_key], dim=1)
        value = torch.cat([value, other_value], dim=1)
        out = self._sparse_attention(attn, layer, query, key, value, key_lengths=lengths + num_video)
        out = out.flatten(2, 3).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](out[:, :num_video]))
        # Padded rows attend to nothing in the stock processor: zeros, in the model's order.
        other = scatter_tokens(zero_padded_rows(out[:, num_video:], lengths), order)
        return hidden_states, attn.to_add_out(other)


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn for block in transformer.transformer_blocks]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 1, MODEL)


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """``[video | other]``: the patchified grid, then image + byT5 + text tokens (padded length)."""
    hidden_states, _ = forward_inputs(args, kwargs)
    config = transformer.config
    _, _, frames, height, width = hidden_states.shape
    grid = LatentGrid(frames // config.patch_size_t, height // config.patch_size, width // config.patch_size)
    text = argument(args, kwargs, "encoder_hidden_states", 2, MODEL)
    byt5 = argument(args, kwargs, "encoder_hidden_states_2", 5, MODEL, None)
    image = argument(args, kwargs, "image_embeds", 7, MODEL, None)
    other = text.shape[1] + sum(x.shape[1] for x in (byt5, image) if x is not None)
    return SequenceLayout(grid, TextSegment(length=other, position="after"))



def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """The pipeline's size rule: frames ``4k + 1`` (VAE 4x temporal), sides multiples of 16."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=4, spatial=16)


class HunyuanVideo15Adapter(ModelAdapter):
    """``HunyuanVideo15Transformer3DModel``: see the module docstring."""

    model_classes = ("HunyuanVideo15Transformer3DModel",)
    family = FAMILY
    processor_class = HunyuanVideo15SparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_sizes = staticmethod(check_sizes)
