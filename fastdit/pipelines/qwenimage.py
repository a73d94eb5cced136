"""QwenImage (``QwenImageTransformer2DModel``: text-to-image, img2img, inpaint, edit) on fastdit's line.

Where things are in diffusers' QwenImage (checked against diffusers 0.42):

* joint self-attention is ``transformer_blocks[i].attn`` (60 dual-stream blocks), run by
  ``QwenDoubleStreamAttnProcessor2_0``: image through ``to_q/to_k/to_v``, text through
  ``add_q_proj/add_k_proj/add_v_proj``, RMS norms, RoPE on both streams (complex frequencies), the
  sequence ``[text | image]``. The text is the prompt padded to the longest in the batch, and
  ``encoder_hidden_states_mask`` becomes a **key** mask: padded text keys are never attended to,
  padded text rows still attend (to the valid keys). So the padding sits in the middle of the
  sequence, between the valid text and the image;
* the input is packed 2x2 latents ``[B, N, C]`` and the grid comes from ``img_shapes`` (per sample a
  list of ``(frames, rows, cols)``: the generated image first, then any reference images of the edit
  pipelines, whose tokens follow in the sequence). 1 MP (1328 x 1328) is 83 x 83 = 6,889 tokens.

fastdit builds the kernel sequence as ``[image | references | text]``: the generated image's grid,
then a dense segment of the reference-image tokens (if any) and the text, the text sorted
valid-first per sample (a stable sort), so that one valid key count per sample (the kernel's
``key_padding``) masks exactly the padded keys, wherever the model put them. The text rows go back
to their positions afterwards. Every output equals stock's. An image is one latent frame: Radial's
frame-distance rule does not apply (refused with the reason); GNA (2-D window), Agent, VMoBA,
AdaSpa and PARO run.
"""

from __future__ import annotations

import math

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import (
    JointAttnProcessor,
    argument,
    check_video_sizes,
    gather_tokens,
    refuse_frame_rules,
    scatter_tokens,
)

__all__ = ["QwenImageSparseAttnProcessor"]

FAMILY = "QwenImage"
MODEL = "QwenImageTransformer2DModel"


class QwenImageSparseAttnProcessor(JointAttnProcessor):
    """Attention processor for QwenImage's joint attention that runs it through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Agent())

        pipe.transformer.set_attn_processor(QwenImageSparseAttnProcessor(fastdit.Agent()))
        fastdit.attach(pipe)
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = QwenDoubleStreamAttnProcessor2_0()


    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        stock_args = (attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask, image_rotary_emb)
        if not self._is_bound(attn):
            return self._call_stock(self._stock, *stock_args)
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse or encoder_hidden_states is None or attention_mask is not None:
            return self._call_stock(self._stock, *stock_args)  # stock raises on the last two

        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

        head_dim = attn.inner_dim // attn.heads
        image = [projection(hidden_states).unflatten(-1, (-1, head_dim)) for projection in (attn.to_q, attn.to_k, attn.to_v)]
        text = [projection(encoder_hidden_states).unflatten(-1, (-1, head_dim))
                for projection in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)]
        if attn.norm_q is not None:
            image[0] = attn.norm_q(image[0])
        if attn.norm_k is not None:
            image[1] = attn.norm_k(image[1])
        if attn.norm_added_q is not None:
            text[0] = attn.norm_added_q(text[0])
        if attn.norm_added_k is not None:
            text[1] = attn.norm_added_k(text[1])
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            image[0], image[1] = (apply_rotary_emb_qwen(x, image_freqs, use_real=False) for x in image[:2])
            text[0], text[1] = (apply_rotary_emb_qwen(x, text_freqs, use_real=False) for x in text[:2])

        num_image = hidden_states.shape[1]
        key_lengths = order = None
        if encoder_hidden_states_mask is not None:
            order, lengths = self._valid_first(encoder_hidden_states_mask)
            text = [gather_tokens(x, order) for x in text]
            key_lengths = lengths + num_image
        query, key, value = (torch.cat([i, t], dim=1) for i, t in zip(image, text))
        out = self._sparse_attention(attn, layer, query, key, value, key_lengths=key_lengths)
        out = out.flatten(2, 3).to(query.dtype)
        image_out, text_out = out[:, :num_image], out[:, num_image:]
        if order is not None:
            text_out = scatter_tokens(text_out, order)
        image_out = attn.to_out[0](image_out.contiguous())
        if len(attn.to_out) > 1:
            image_out = attn.to_out[1](image_out)
        return image_out, attn.to_add_out(text_out.contiguous())


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn for block in transformer.transformer_blocks]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 3, MODEL)


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """``[image | references + text]``: the generated image's grid, then the other tokens."""
    hidden_states, _ = forward_inputs(args, kwargs)
    text = argument(args, kwargs, "encoder_hidden_states", 1, MODEL)
    img_shapes = argument(args, kwargs, "img_shapes", 4, MODEL, None)
    if not img_shapes:
        raise ValueError(f"{MODEL}.forward got no img_shapes: fastdit reads the latent grid from them")
    per_sample = [[tuple(sample)] if isinstance(sample[0], int) else [tuple(s) for s in sample] for sample in img_shapes]
    shapes = per_sample[0]
    if any(sample != shapes for sample in per_sample):
        raise ValueError(f"{MODEL}: every sample of a batch must have the same img_shapes, got {img_shapes}")
    grid = LatentGrid(*shapes[0])
    references = sum(math.prod(shape) for shape in shapes[1:])
    if grid.num_tokens + references != hidden_states.shape[1]:
        raise ValueError(
            f"{MODEL}: {hidden_states.shape[1]} image tokens but img_shapes {shapes} describe "
            f"{grid.num_tokens + references}"
        )
    return SequenceLayout(grid, TextSegment(references + text.shape[1], "after"))



def check_method(method) -> None:
    refuse_frame_rules(method, MODEL)


def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """QwenImage's rule: sides multiples of 16 (VAE 8x, 2x2 packing); images have no frame count."""
    check_video_sizes(FAMILY, height, width, None, temporal=None, spatial=16)


class QwenImageAdapter(ModelAdapter):
    """``QwenImageTransformer2DModel``: see the module docstring."""

    model_classes = ("QwenImageTransformer2DModel",)
    family = FAMILY
    processor_class = QwenImageSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    check_method = staticmethod(check_method)
    check_sizes = staticmethod(check_sizes)
