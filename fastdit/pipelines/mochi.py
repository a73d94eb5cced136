"""Mochi 1 (``MochiTransformer3DModel``) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' Mochi (checked against diffusers 0.42):

* joint self-attention is ``transformer_blocks[i].attn1`` (``MochiAttention``, run by
  ``MochiAttnProcessor2_0``): video through ``to_q/to_k/to_v`` + RMS norm per head + RoPE, text
  through ``add_q_proj/add_k_proj/add_v_proj`` + RMS norm (no RoPE). The stock processor loops over
  the batch and, per sample, attends over ``[video | that sample's valid text tokens]`` only (the
  padded text tokens are dropped, not masked); the text output holds the valid tokens' outputs
  first, in order, then zeros. The last block is ``context_pre_only``: it has no ``to_add_out``
  and its text output is discarded;
* ``MochiTransformer3DModel`` has no ``attn_processors``/``set_attn_processor`` (no diffusers
  ``AttentionMixin``): this adapter lists and sets the ``processor`` attribute of its
  ``MochiAttention`` modules itself (:func:`attn_processors`, :func:`set_attn_processor`);
* the grid is ``(F, H // patch, W // patch)`` of the ``(B, C, F, H, W)`` input: 28 x 30 x 53 =
  44,520 tokens at 163 x 480 x 848. The text is T5, padded to 256 tokens.

fastdit runs all samples at once over ``[video | text]`` with the text sorted valid-first per sample
(a stable sort) and one valid key count per sample (the kernel's ``key_padding``): each sample sees
exactly its video and its valid text, as stock. Text rows past the valid count are zeroed, so the
text output is stock's (valid outputs first, then zeros) whatever the mask. Methods that reorder
tokens (GNA) reorder the video per call, the text in place.
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
    zero_padded_rows,
)

__all__ = ["MochiSparseAttnProcessor"]

FAMILY = "Mochi"
MODEL = "MochiTransformer3DModel"


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Mochi's RoPE on (even, odd) pairs, as diffusers' MochiAttnProcessor2_0 computes it.
    x_even, x_odd = x[..., 0::2].float(), x[..., 1::2].float()
    cos = (x_even * freqs_cos - x_odd * freqs_sin).to(x.dtype)
    sin = (x_even * freqs_sin + x_odd * freqs_cos).to(x.dtype)
    return torch.stack([cos, sin], dim=-1).flatten(-2)


class MochiSparseAttnProcessor(JointAttnProcessor):
    """Attention processor for ``MochiAttention`` that runs the joint attention through a fastdit method.

    Install with ``fastdit.apply(pipe, method)``; or set it as the ``processor`` of every
    ``transformer_blocks[i].attn1`` and call ``fastdit.attach(pipe)``.
    """

    MODEL = MODEL

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.attention_processor import MochiAttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = MochiAttnProcessor2_0()


    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not self._is_bound(attn):
            return self._stock(*stock_args)
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._stock(*stock_args)
        num_video, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if attention_mask is None or tuple(attention_mask.shape) != (hidden_states.shape[0], num_text):
            raise ValueError(
                f"{MODEL}: expected the [B, L] text mask, got "
                f"{None if attention_mask is None else tuple(attention_mask.shape)}"
            )
        heads = attn.heads
        query = attn.to_q(hidden_states).unflatten(2, (heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        text_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        text_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (heads, -1))
        if attn.norm_added_q is not None:
            text_query = attn.norm_added_q(text_query)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        if image_rotary_emb is not None:
            query = _apply_rotary_emb(query, *image_rotary_emb)
            key = _apply_rotary_emb(key, *image_rotary_emb)

        order, lengths = self._valid_first(attention_mask)
        query = torch.cat([query, gather_tokens(text_query, order)], dim=1)
        key = torch.cat([key, gather_tokens(text_key, order)], dim=1)
        value = torch.cat([value, gather_tokens(text_value, order)], dim=1)
        out = self._sparse_attention(attn, layer, query, key, value, key_lengths=lengths + num_video)
        out = out.flatten(2, 3)
        hidden_states = attn.to_out[1](attn.to_out[0](out[:, :num_video]))
        # Stock's text output: the valid tokens' outputs first, then zeros (it drops the padding).
        text = zero_padded_rows(out[:, num_video:], lengths)
        if hasattr(attn, "to_add_out"):
            text = attn.to_add_out(text)
        return hidden_states, text


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.transformer_blocks]


def _attention_modules(model) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import MochiAttention

    return {name: module for name, module in model.named_modules() if isinstance(module, MochiAttention)}


def attn_processors(model) -> dict:
    """``{"<module>.processor": processor}`` of every ``MochiAttention`` (diffusers' naming)."""
    return {f"{name}.processor": module.processor for name, module in _attention_modules(model).items()}


def set_attn_processor(model, processors) -> None:
    """Set one processor everywhere, or ``{"<module>.processor": processor}`` for every module."""
    modules = _attention_modules(model)
    if isinstance(processors, dict):
        if set(processors) != {f"{name}.processor" for name in modules}:
            raise ValueError(f"{MODEL}: expected a processor for each of its {len(modules)} attention modules")
        for name, module in modules.items():
            module.processor = processors[f"{name}.processor"]
    else:
        for module in modules.values():
            module.processor = processors


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return argument(args, kwargs, "hidden_states", 0, MODEL), argument(args, kwargs, "timestep", 2, MODEL)


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """``[video | text]``: the patchified grid, then the text (padded length)."""
    hidden_states, _ = forward_inputs(args, kwargs)
    text = argument(args, kwargs, "encoder_hidden_states", 1, MODEL)
    patch = transformer.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    return SequenceLayout(LatentGrid(frames, height // patch, width // patch), TextSegment(text.shape[1], "after"))



def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """Mochi's rule: frames ``6k + 1`` (VAE 6x temporal), sides multiples of 16."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=6, spatial=16)


class MochiAdapter(ModelAdapter):
    """``MochiTransformer3DModel``: see the module docstring."""

    model_classes = ("MochiTransformer3DModel",)
    family = FAMILY
    processor_class = MochiSparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    attn_processors = staticmethod(attn_processors)
    set_attn_processor = staticmethod(set_attn_processor)
    check_sizes = staticmethod(check_sizes)
