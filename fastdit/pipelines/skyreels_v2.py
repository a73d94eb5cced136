"""SkyReels-V2 (``SkyReelsV2Transformer3DModel``, T2V, I2V and diffusion forcing) on fastdit's line.

Where things are in diffusers' SkyReels-V2 (checked against diffusers 0.42): a copy of Wan.
``blocks[i].attn1`` is self-attention over the patchified latent grid (frame-major, Wan's RoPE on
interleaved pairs, QK RMS norm across heads), ``attn2`` cross-attention to the text (and the image
context of I2V), both run by ``SkyReelsV2AttnProcessor``. Diffusion forcing adds two things:

* per-frame timesteps: ``timestep`` is ``[B, F]`` and the per-token modulation ``timestep_proj``
  is ``[B, 6, S, C]`` (the grid is still read from ``hidden_states``; the step from the largest
  timestep, as for any per-token timesteps);
* with ``causal_block_size`` (``config.num_frame_per_block = n > 1``, set by the diffusion-forcing
  pipelines), a **block-causal** mask on the self-attention: the frames are cut into blocks of
  ``n`` latent frames, and a query of frame block ``i`` sees the keys of frame blocks ``0 .. i``.
  The transformer builds it as an ``[S, S]`` boolean mask and passes it to every ``attn1``.

fastdit folds the block-causal mask into the method's plan (:func:`block_causal_plan`): kernel
blocks whose keys all lie in earlier or equal frame blocks stay whole, blocks entirely in the
future are dropped, and blocks that straddle a frame-block boundary run under a
:class:`~fastdit.kernels.WindowMask` that encodes the causal rule per (query, key) pair (time
coordinates shifted so that one window per query covers exactly the allowed frames). The result
is exactly the method's plan AND the model's mask, with no ``S x S`` mask. This holds for the
static methods (Dense, Radial; GNA when its tiles do not straddle frame blocks: then the fold is
block-level and GNA's own window mask stays as it is). Methods that plan per call (VMoBA, AdaSpa,
Agent, PARO) build their plans inside the call and cannot take the mask: with the block-causal
mask they raise a clear error; without it (``causal_block_size=None``, the default, and every
non-diffusion-forcing pipeline) every method runs. Dense steps and layers take the stock
processor, which applies the mask itself. Tile-major reordering (GNA) is per attention call.

Steps. The diffusion-forcing pipelines set a ``cache_context`` without a step index, so the step
comes from the largest per-frame timestep. In the asynchronous mode (``ar_step > 0``) the window
of frames moves and that maximum can stay or rise between iterations; a rise counts as a new
generation (the dense schedule and per-generation state restart). Outputs stay exact; only which
iterations a dense schedule covers is affected. The synchronous mode (``ar_step=0``) counts steps
as any pipeline does.
"""

from __future__ import annotations

import weakref

import torch

from ..kernels import BlockSparsity, WindowMask
from ..methods.base import MethodPlan
from ..schedule import Schedule
from .base import ModelAdapter
from .joint import check_video_sizes
from .wan import WanSparseAttnProcessor, apply_wan_rotary_emb, forward_inputs, sequence_layout  # noqa: F401

__all__ = ["SkyReelsV2SparseAttnProcessor", "block_causal_plan"]

FAMILY = "SkyReels-V2"
MODEL = "SkyReelsV2Transformer3DModel"


def _block_frame_range(frame_block: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) frame-block id of the tokens of each kernel block."""
    num_blocks = -(-frame_block.shape[0] // block_size)
    padded = torch.full((num_blocks * block_size,), -1, dtype=torch.long)
    padded[: frame_block.shape[0]] = frame_block
    rows = padded.view(num_blocks, block_size)
    high = rows.max(dim=1).values
    low = torch.where(rows >= 0, rows, torch.iinfo(torch.long).max).min(dim=1).values
    return low, high


def block_causal_plan(plan: MethodPlan, frames_per_block: int) -> MethodPlan:
    """``plan`` restricted to SkyReels-V2's block-causal mask with ``frames_per_block`` frames per block.

    Works in the plan's token order (tile-major after a permutation). Raises ValueError when the
    plan already has partial blocks (GNA's window mask) that a frame-block boundary crosses: one
    window rule per kernel call cannot express both; a GNA tile whose frame extent divides
    ``frames_per_block`` (and a video starting on a tile boundary) avoids it.
    """
    layout = plan.layout
    grid = layout.grid
    if layout.text is not None:
        raise ValueError(f"{MODEL}'s self-attention holds video tokens only, got {layout}")
    if grid.frames % frames_per_block:
        raise ValueError(
            f"{MODEL}: {grid.frames} latent frames do not split into causal blocks of "
            f"{frames_per_block} frames"
        )
    sparsity = plan.sparsity
    if sparsity.q_block_size != sparsity.kv_block_size:
        raise ValueError("block_causal_plan needs equal query and key block sizes")
    block = sparsity.q_block_size
    device = sparsity.device
    coords = layout.token_coords()
    if plan.permutation is not None:
        if plan.permutation.num_padding:
            raise ValueError("block_causal_plan: the permutation pads the grid")
        coords = plan.permutation.permute_sequence(coords, layout, dim=0)
    frame_block = coords[:, 0] // frames_per_block
    low, high = _block_frame_range(frame_block, block)
    before = high[None, :] <= low[:, None]  # every key frame block <= every query frame block
    future = low[None, :] > high[:, None]  # every key frame block > every query frame block
    straddle = (~before & ~future).to(device)
    before = before.to(device)

    full_map = sparsity.to_block_map()
    if plan.window_mask is None:
        partial_map = full_map & straddle
        query_start = torch.zeros_like(coords)
        query_start[:, 0] = (frame_block + 1) * frames_per_block
        key_coords = coords.clone()
        key_coords[:, 0] += grid.frames
        rule = (query_start.to(torch.int32).to(device), key_coords.to(torch.int32).to(device), grid.shape, (1, 1, 1))
    else:
        partial_map = plan.window_mask.partial.to_block_map()
        if bool(((full_map | partial_map) & straddle).any()):
            raise ValueError(
                f"{MODEL}: the plan's window-masked blocks straddle causal frame blocks of "
                f"{frames_per_block} frames; give GNA a tile whose frame extent divides "
                f"{frames_per_block} (tile=(t, h, w) with {frames_per_block} % t == 0)"
            )
        partial_map = partial_map & before
        mask = plan.window_mask
        rule = (mask.query_start, mask.key_coords, mask.window, mask.dilation)
    full = BlockSparsity.from_block_map(full_map & before, (block, block))
    window = None
    if bool(partial_map.any()):
        window = WindowMask(BlockSparsity.from_block_map(partial_map, (block, block)), *rule)
    return MethodPlan(full, layout, plan.permutation, window)


class SkyReelsV2SparseAttnProcessor(WanSparseAttnProcessor):
    """Attention processor for ``SkyReelsV2Attention`` that runs self-attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial.preset("wan2.1-14b"))

        pipe.transformer.set_attn_processor(SkyReelsV2SparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)

    Cross-attention goes to the stock ``SkyReelsV2AttnProcessor``; with diffusion forcing's
    block-causal mask the method's plan is folded with it (see the module docstring).
    """

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.transformers.transformer_skyreels_v2 import SkyReelsV2AttnProcessor

        super().__init__(method, schedule)
        self._stock = SkyReelsV2AttnProcessor()
        self._transformer: weakref.ref | None = None  # set by the adapter's model_hooks
        self._folded: dict = {}  # (plan id, frames per block) -> (plan, folded plan)

    def _frames_per_block(self) -> int:
        transformer = self._transformer() if self._transformer is not None else None
        if transformer is None:
            raise self._unbound_error()
        return int(transformer.config.num_frame_per_block)

    def _causal_plan(self, plan: MethodPlan, frames_per_block: int) -> MethodPlan:
        key = (id(plan), frames_per_block)
        cached = self._folded.get(key)
        if cached is None or cached[0] is not plan:
            if len(self._folded) > 16:
                self._folded.clear()
            cached = (plan, block_causal_plan(plan, frames_per_block))
            self._folded[key] = cached
        return cached[1]

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        stock_args = (attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if encoder_hidden_states is not None:
            return self._call_stock(self._stock, *stock_args)
        state = self.state
        if state is None or id(attn) not in state.layer_index or state.active_plan is None:
            raise self._unbound_error()
        layer, sparse = self._layer_runs_sparse(attn)
        if not sparse:
            return self._call_stock(self._stock, *stock_args)

        plan = state.active_plan
        frames_per_block = self._frames_per_block()
        causal = frames_per_block > 1
        if causal != (attention_mask is not None):
            raise ValueError(
                f"{MODEL}: config.num_frame_per_block={frames_per_block} but the self-attention "
                f"{'got no' if causal else 'got a'} mask; fastdit reproduces only the block-causal "
                "mask the transformer builds"
            )
        if causal:
            if self.method.plans_per_call:
                raise ValueError(
                    f"{type(self.method).__name__} does not apply to {MODEL} with diffusion forcing's "
                    f"block-causal attention (causal_block_size={frames_per_block}): it plans its blocks "
                    "inside each call and cannot fold the causal mask in; use Dense, Radial or GNA, or "
                    "run without causal_block_size"
                )
            plan = self._causal_plan(plan, frames_per_block)

        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = apply_wan_rotary_emb(query, *rotary_emb)
            key = apply_wan_rotary_emb(key, *rotary_emb)
        if query.shape[1] != plan.layout.num_tokens:
            raise ValueError(
                f"{MODEL}: self-attention over {query.shape[1]} tokens, but the grid read from the "
                f"transformer's input has {plan.layout.num_tokens}"
            )
        permutation = plan.permutation
        if permutation is not None:
            query, key, value = (permutation.permute(x, dim=1) for x in (query, key, value))
        out = self._attend(attn, layer, query, key, value, plan=plan)
        if permutation is not None:
            out = permutation.unpermute(out, dim=1)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


# ---------------------------------------------------------------------- the adapter interface
def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.blocks]


def model_hooks(transformer, state) -> list:
    """No block hooks (tile-major reordering is per call: the block-causal mask and the
    ``[B, 6, S, C]`` modulation stay in diffusers' order); tells the processors their transformer,
    whose ``num_frame_per_block`` the diffusion-forcing pipelines set per call."""
    for processor in transformer.attn_processors.values():
        if isinstance(processor, SkyReelsV2SparseAttnProcessor):
            processor._transformer = weakref.ref(transformer)
    return []


def check_sizes(pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
    """Wan's rule: frames ``4k + 1``, sides multiples of 16."""
    check_video_sizes(FAMILY, height, width, num_frames, temporal=4, spatial=16)


class SkyReelsV2Adapter(ModelAdapter):
    """``SkyReelsV2Transformer3DModel``: see the module docstring."""

    model_classes = ("SkyReelsV2Transformer3DModel",)
    family = FAMILY
    processor_class = SkyReelsV2SparseAttnProcessor
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    model_hooks = staticmethod(model_hooks)
    check_sizes = staticmethod(check_sizes)
