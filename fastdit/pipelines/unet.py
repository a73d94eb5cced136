"""Stable Diffusion UNets (``UNet2DConditionModel``: SD 1.x/2.x, SDXL) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' UNet (checked against diffusers 0.42):

* attention lives in ``Transformer2DModel`` modules inside the cross-attention down, mid and up
  blocks (``down_blocks[i].attentions[j]``, ``mid_block.attentions[0]``, ``up_blocks[i].attentions[j]``).
  Each flattens its ``[B, C, H, W]`` input to ``H * W`` tokens in raster order (``h * W + w``,
  one latent frame: ``LatentGrid(1, H, W)``) and runs ``BasicTransformerBlock``s whose ``attn1`` is
  self-attention (``encoder_hidden_states is None``) and ``attn2`` cross-attention to the text.
  Both are run by diffusers' ``AttnProcessor2_0``;
* each resolution has its own grid. Down block ``i`` works at ``2**i`` times the latent's
  downsampling, the mid block at the lowest resolution, up block ``j`` at ``2**(n - 1 - j)``
  (``n`` down blocks; every down block but the last halves the grid, every up block but the last
  doubles it). fastdit numbers the self-attention layers in forward order (down, mid, up) and
  gives each its downsampling *relative to the highest-resolution self-attention of the UNet*:
  SD 1.5 has attention in ``down_blocks.0``, so its 64 x 64 layers (512 px) are factor 1;
  SDXL's ``down_blocks.0`` has none, so its 64 x 64 layers of ``down_blocks.1``/``up_blocks.1``
  (1024 px; 128 x 128 latent) are factor 1. Methods may restrict themselves to the layers of
  factor ``<= max_downsample`` (:meth:`fastdit.Agent.runs_on`);
* the exact ``H x W`` of every layer is read, not computed: a forward pre-hook on each
  ``Transformer2DModel`` (a diffusers ``ModelHook``) records the grid of its input for the
  self-attention layers inside it (a few dictionary writes per forward), so odd latent sizes and either downsampling padding work;
* the UNet's forward takes ``sample`` ``[B, C, H, W]`` and ``timestep``; the Stable Diffusion
  pipelines set no ``cache_context``, so the step comes from the timestep value (one host read per
  UNet forward; the classifier-free-guidance batch is one forward) and the step count from the
  pipeline scheduler's ``num_inference_steps`` (see ``fastdit.integration``).

Self-attention layers the method and its schedule select run through the method on fastdit's
kernels, with the layer's own grid as its sequence layout (a static method's plan is built per
resolution and cached; methods with ``attend`` compose kernel calls per call). Every other call,
cross-attention, self-attention with a mask, and self-attention on dense steps and unselected
layers, is handed to diffusers' stock ``AttnProcessor2_0``, so it is exactly the stock computation.
"""

from __future__ import annotations

import torch

from ..hooks import function_hook
from ..layout import LatentGrid, SequenceLayout
from ..schedule import Schedule
from .base import FastditAttnProcessor, ModelAdapter

__all__ = ["UNetAdapter", "UNetSparseAttnProcessor"]


class UNetSparseAttnProcessor(FastditAttnProcessor):
    """Attention processor for ``UNet2DConditionModel`` that runs self-attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Agent())                              # installs everything

        pipe.unet.set_attn_processor(UNetSparseAttnProcessor(fastdit.Agent()))
        fastdit.attach(pipe)                                              # the hooks it needs

    One instance can be installed on every attention module: cross-attention and any call the
    method does not take go to diffusers' stock ``AttnProcessor2_0``, unchanged.
    """

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = AttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        def stock():
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

        if encoder_hidden_states is not None or attention_mask is not None:
            return stock()
        state = self.state
        if state is None or state.active_plan is None:
            raise self._unbound_error()
        if id(attn) not in state.layer_index:  # not a self-attention layer fastdit registered
            return stock()
        layout = state.layer_layouts.get(id(attn))
        if hidden_states.ndim == 4:  # an attention called on the [B, C, H, W] map itself
            layout = SequenceLayout(LatentGrid(1, *hidden_states.shape[2:]))
        if layout is None:
            raise RuntimeError(
                "UNetSparseAttnProcessor did not see the grid of this self-attention: it is read "
                "by a pre-hook on its Transformer2DModel, which fastdit.apply/attach installs"
            )
        layer, sparse = self._layer_runs_sparse(attn, layout)
        if not sparse:
            return stock()

        # As AttnProcessor2_0, with the attention itself through the method.
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if hidden_states.shape[1] != layout.num_tokens:
            raise ValueError(
                f"self-attention has {hidden_states.shape[1]} tokens, but its Transformer2DModel's "
                f"input grid {layout.grid.shape[1:]} has {layout.num_tokens}"
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        if attn.norm_q is not None:  # per-head norms act on the last dim: same in [B, S, H, D]
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        plan = self.method.plan(layout, query.device)
        if plan.permutation is not None:
            query, key, value = (plan.permutation.permute_sequence(x, layout, dim=1) for x in (query, key, value))
        out = self._attend(attn, layer, query, key, value, plan=plan)
        if plan.permutation is not None:
            out = plan.permutation.unpermute_sequence(out, layout, dim=1)
        out = out.flatten(2, 3).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# ---------------------------------------------------------------------- the adapter interface
FAMILY = "Stable Diffusion / SDXL (UNet)"


def _resolution_blocks(unet) -> list[tuple[int, torch.nn.Module]]:
    """(resolution level, block) in forward order: down blocks, mid block, up blocks.

    Level ``k`` means the latent grid halved ``k`` times (see the module docstring)."""
    num_down = len(unet.down_blocks)
    blocks = [(level, block) for level, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append((num_down - 1, unet.mid_block))
    blocks += [(len(unet.up_blocks) - 1 - index, block) for index, block in enumerate(unet.up_blocks)]
    return blocks


def _transformers_and_self_attention(unet) -> list[tuple[int, torch.nn.Module, list[torch.nn.Module]]]:
    """(level, Transformer2DModel, its ``attn1`` modules) in forward order."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    found = []
    for level, block in _resolution_blocks(unet):
        for module in block.modules():
            if isinstance(module, Transformer2DModel):
                attentions = [b.attn1 for b in module.transformer_blocks if getattr(b, "attn1", None) is not None]
                if attentions:
                    found.append((level, module, attentions))
    return found


def self_attention_modules(unet) -> list[torch.nn.Module]:
    """Every ``attn1`` of the UNet's transformer blocks, in forward order (down, mid, up)."""
    return [attn for _, _, attentions in _transformers_and_self_attention(unet) for attn in attentions]


def self_attention_downsampling(unet) -> list[int]:
    """Per self-attention layer (order of :func:`self_attention_modules`): its spatial downsampling
    relative to the UNet's highest-resolution self-attention (1, 2, 4, ...)."""
    found = _transformers_and_self_attention(unet)
    if not found:
        return []
    highest = min(level for level, _, _ in found)
    return [2 ** (level - highest) for level, _, attentions in found for _ in attentions]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    sample = kwargs["sample"] if "sample" in kwargs else args[0]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return sample, timestep


def sequence_layout(unet, args: tuple, kwargs: dict) -> SequenceLayout:
    """The latent grid at the UNet's input (``LatentGrid(1, H, W)``); every self-attention layer
    has its own, read by the hooks of :func:`grid_hooks`."""
    sample, _ = forward_inputs(args, kwargs)
    if sample.ndim != 4:
        raise ValueError(f"UNet2DConditionModel expects a [B, C, H, W] sample, got shape {tuple(sample.shape)}")
    return SequenceLayout(LatentGrid(1, sample.shape[2], sample.shape[3]))


def grid_hooks(unet, state) -> list[tuple[torch.nn.Module, str, object]]:
    """No token permutation for UNets (a method's permutation is applied per call); instead one
    hook per ``Transformer2DModel`` records the grid of its input for the self-attention layers
    inside it (``state.layer_layouts``)."""
    hooks = []
    layouts: dict[tuple[int, int], SequenceLayout] = {}  # one object per resolution

    for _, transformer, attentions in _transformers_and_self_attention(unet):
        keys = [id(attn) for attn in attentions]

        def record_grid(module, args, kwargs, keys=keys):
            hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            if hidden_states.ndim != 4:
                raise ValueError(
                    "fastdit expects the UNet's Transformer2DModel input as a [B, C, H, W] map, got "
                    f"shape {tuple(hidden_states.shape)}"
                )
            size = (hidden_states.shape[2], hidden_states.shape[3])
            layout = layouts.get(size)
            if layout is None:
                layout = layouts[size] = SequenceLayout(LatentGrid(1, *size))
            for key in keys:
                state.layer_layouts[key] = layout
            return args, kwargs

        hooks.append((transformer, "fastdit.grid", function_hook(record_grid)))
    return hooks


class UNetAdapter(ModelAdapter):
    """``UNet2DConditionModel`` (Stable Diffusion 1.x/2.x, SDXL)."""

    model_classes = ("UNet2DConditionModel",)
    family = FAMILY
    processor_class = UNetSparseAttnProcessor
    # The Stable Diffusion pipelines run cond and uncond in one batched UNet forward and never
    # reset stateful hooks (UNet2DConditionModel has no CacheMixin): a repeated timestep is a new
    # generation.
    cfg_batched_without_reset = True
    self_attention_modules = staticmethod(self_attention_modules)
    self_attention_downsampling = staticmethod(self_attention_downsampling)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    model_hooks = staticmethod(grid_hooks)
