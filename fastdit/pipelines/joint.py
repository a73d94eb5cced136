"""What the adapters of joint-attention families share: the kernel sequence, text padding, checks.

A joint self-attention holds the latent grid and other tokens (text, image or conditioning tokens)
in one sequence. fastdit's methods see it as a :class:`~fastdit.layout.SequenceLayout`: the video
tokens frame-major, and one :class:`~fastdit.layout.TextSegment` of "other" tokens before or after
them whose rows and columns every method keeps dense. Attention is equivariant under a reordering
of the sequence (RoPE is applied per token before it), so an adapter may build Q/K/V in whatever
order serves the kernel, and put the output rows back where the model expects them.

Padded text. The kernel's key-padding contract is one valid key count per batch element (keys at
or past it are ignored), so padding must come last. Adapters with padded text put the text after
the video and sort each sample's text valid-first with :func:`valid_first_order` (a stable sort:
valid tokens keep their order, which is the identity when the model already puts them first).
Whether padded *query* rows attend (a key-only mask: HunyuanVideo, QwenImage) or produce zeros (a
query-and-key mask: HunyuanVideo 1.5; Mochi drops them) is the adapter's business, see
:func:`zero_padded_rows`.
"""

from __future__ import annotations

import torch

from ..layout import SequenceLayout
from .base import FastditAttnProcessor

__all__ = [
    "JointAttnProcessor",
    "argument",
    "check_video_sizes",
    "gather_tokens",
    "refuse_frame_rules",
    "scatter_tokens",
    "valid_first_order",
    "zero_padded_rows",
]


def argument(args: tuple, kwargs: dict, name: str, position: int, model: str, default=...):
    """A forward argument by keyword or position; ``default`` when absent (else a TypeError)."""
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    if default is not ...:
        return default
    raise TypeError(f"{model}.forward called without {name}")


def valid_first_order(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order, lengths)`` for a ``[B, L]`` token mask (True or nonzero = a real token).

    ``order`` (int64 ``[B, L]``) lists each sample's valid positions first, then its padded ones,
    both in their original order; ``lengths`` (int32 ``[B]``) counts the valid ones. No host sync.
    """
    if mask.dim() != 2:
        raise ValueError(f"a text mask must be [B, L], got shape {tuple(mask.shape)}")
    valid = mask.bool()
    order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)
    return order, valid.sum(dim=1, dtype=torch.int32)


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x[b, order[b, i]]`` along dim 1 of a ``[B, L, ...]`` tensor."""
    index = order.reshape(*order.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, index)


def scatter_tokens(y: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`gather_tokens`: ``out[b, order[b, i]] = y[b, i]``."""
    index = order.reshape(*order.shape, *([1] * (y.dim() - 2))).expand_as(y)
    return torch.empty_like(y).scatter_(1, index, y)


def zero_padded_rows(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Rows ``i >= lengths[b]`` of a valid-first ``[B, L, ...]`` tensor set to zero."""
    keep = torch.arange(y.shape[1], device=y.device)[None, :] < lengths[:, None]
    return y * keep.reshape(*keep.shape, *([1] * (y.dim() - 2))).to(y.dtype)


class JointAttnProcessor(FastditAttnProcessor):
    """A fastdit processor of a model whose self-attention is one sequence laid out by the adapter.

    ``MODEL`` names the diffusers class in messages. :meth:`_sparse_attention` runs the method on
    Q/K/V given in the layout's order (video frame-major, the segment where the layout puts it),
    through the plan's token permutation when it has one (applied per call, text in place).
    """

    MODEL = "this model"
    _text_order: tuple | None = None  # (mask, order, lengths) of the current forward

    def _valid_first(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`valid_first_order` of ``mask``, once per forward: the transformer hands every
        block the same mask tensor, so later layers reuse the first one's order (no host sync)."""
        cached = self._text_order
        if cached is None or cached[0] is not mask:
            cached = (mask, *valid_first_order(mask))
            self._text_order = cached
        return cached[1], cached[2]

    def _is_bound(self, attn) -> bool:
        """Whether ``attn`` is a layer fastdit registered; raises when the hooks are missing."""
        state = self.state
        if state is None or state.active_plan is None:
            raise self._unbound_error()
        return id(attn) in state.layer_index

    def _check_sequence(self, num_tokens: int) -> SequenceLayout:
        layout = self.state.active_plan.layout
        if num_tokens != layout.num_tokens:
            raise ValueError(
                f"{self.MODEL}: the attention sequence has {num_tokens} tokens, but the layout read "
                f"from the transformer's inputs has {layout.num_tokens} (grid {layout.grid.shape} = "
                f"{layout.grid.num_tokens} video tokens + {layout.text_length} other tokens)"
            )
        return layout

    def _sparse_attention(
        self,
        attn,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The method's attention over ``[B, S, H, D]`` inputs in the layout's order; same order out.

        ``key_lengths`` (int32 ``[B]``) counts the valid keys of each sample: padding must be last
        (text after the video, sorted valid-first).
        """
        layout = self._check_sequence(query.shape[1])
        permutation = self.state.active_plan.permutation
        if permutation is not None:
            if key_lengths is not None and layout.text is not None and layout.text.position == "before":
                raise ValueError(f"{self.MODEL}: key padding needs the text after the video")
            seq = query.shape[1]
            query, key, value = (permutation.permute_sequence(x, layout, dim=1) for x in (query, key, value))
            if key_lengths is not None:
                key_lengths = key_lengths + (query.shape[1] - seq)
        out = self._attend(attn, layer, query, key, value, key_padding=key_lengths)
        if permutation is not None:
            out = permutation.unpermute_sequence(out, layout, dim=1)
        return out


def refuse_frame_rules(method, model: str) -> None:
    """For image models (one latent frame): Radial's rule is over latent-frame distance, so on one
    frame it keeps every block; refuse it with the reason rather than run dense silently."""
    from ..methods.radial import Radial

    if isinstance(method, Radial):
        raise ValueError(
            f"Radial does not apply to {model}: its rule decays with the distance between latent "
            "frames, and an image is one frame, where Radial keeps every block (dense attention "
            "at sparse-kernel cost); use GNA (a 2-D window such as window=(1, 16, 16)), Agent, "
            "VMoBA or AdaSpa"
        )


def check_video_sizes(
    family: str,
    height: int | None,
    width: int | None,
    num_frames: int | None,
    *,
    temporal: int | None,
    spatial: int,
) -> None:
    """Raise ValueError unless the sides are multiples of ``spatial`` and the frame count is
    ``temporal * k + 1`` (a causal video VAE); ``None`` sizes are the pipeline's defaults."""
    for name, value in (("height", height), ("width", width)):
        if value is not None and (value <= 0 or value % spatial):
            raise ValueError(f"{family}: {name} must be a positive multiple of {spatial}, got {name}={value}")
    if num_frames is not None and temporal is not None and (num_frames < 1 or (num_frames - 1) % temporal):
        down = (num_frames - 1) // temporal * temporal + 1
        near = f"{down} or {down + temporal}" if down >= 1 else f"{temporal + 1}"
        raise ValueError(
            f"{family}: num_frames must be of the form {temporal}k+1 (the VAE compresses time "
            f"{temporal}x after the first frame), got num_frames={num_frames}; try {near}"
        )
