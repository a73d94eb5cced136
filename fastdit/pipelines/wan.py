"""Wan 2.1 / 2.2 (``WanTransformer3DModel``, T2V and I2V) on fastdit's layout -> method -> kernel line.

Where things are in diffusers' Wan:

* self-attention is ``blocks[i].attn1`` (``encoder_hidden_states is None``): Q/K/V projections,
  RMS norm across heads, then RoPE (interleaved pairs), all in ``(B, S, H, D)``; no text inside it;
* cross-attention is ``blocks[i].attn2`` (text, plus the image context of I2V through
  ``add_k_proj``/``add_v_proj``): always computed by the stock ``WanAttnProcessor``;
* the latent grid is ``hidden_states.shape[2:] // patch_size`` at the transformer's input, tokens
  frame-major; the step comes from the pipeline's ``cache_context`` (see ``fastdit.integration``).

Self-attention runs on :func:`fastdit.kernels.block_sparse_attention` with the method's plan on
sparse steps and layers. Dense steps and layers of a sparse method's schedule run FA4's dense
kernel where fastdit can run it, else the stock path (``dispatch_attention_fn``, diffusers'
selected backend); the ``Dense`` method always runs fastdit's dense plan on the fastest backend.
Methods whose plan carries a token permutation (GNA) get Q/K/V in tile-major order: hooks on the
first and last block permute the hidden states once per forward; each block gets the permuted
RoPE and per-token modulation, computed once per forward.

Several GPUs (diffusers' Ulysses context parallelism, Wan's own ``_cp_plan``): the blocks see a
shard of the sequence and the rank's slice of RoPE. On sparse layers the processor all-to-alls
Q/K/V to the full sequence of the rank's heads, applies the plan (GNA's permutation per call, the
block hooks stay off), and all-to-alls back; dense layers go to diffusers' Ulysses attention
with the transformer's parallel config. See :mod:`fastdit.parallel`.
"""

from __future__ import annotations

import torch

from ..hooks import function_hook
from ..layout import LatentGrid, SequenceLayout
from ..schedule import Schedule
from .base import FastditAttnProcessor, ModelAdapter

__all__ = ["WanAdapter", "WanSparseAttnProcessor"]


def apply_wan_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # Wan's RoPE on interleaved (even, odd) pairs, as diffusers' WanAttnProcessor computes it.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSparseAttnProcessor(FastditAttnProcessor):
    """Attention processor for ``WanAttention`` that runs self-attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial.preset("wan2.1-14b"))          # installs everything

        pipe.transformer.set_attn_processor(WanSparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)                                              # the hooks it needs

    One instance can be installed on every attention module: cross-attention calls are passed to
    diffusers' stock ``WanAttnProcessor`` unchanged.
    """

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        super().__init__(method, schedule)
        self._stock = WanAttnProcessor()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            return self._call_stock(
                self._stock, attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb
            )
        state = self.state
        if state is None or id(attn) not in state.layer_index or state.active_plan is None:
            raise self._unbound_error()

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

        layer, sparse = self._layer_runs_sparse(attn)
        if sparse:
            plan = state.active_plan
            ulysses, heads = self._ulysses, None
            if ulysses is not None:  # sequence shards -> the full sequence of this rank's heads
                heads = ulysses.heads(attn.heads)
                query, key, value = ulysses.to_heads((query, key, value), plan.layout.num_tokens)
            # Without the block hooks (a processor installed by hand, or context parallelism,
            # where the blocks hold a shard of the sequence) the permutation happens per call.
            permute_here = plan.permutation is not None and not state.permuted
            if permute_here:
                query, key, value = (plan.permutation.permute(x, dim=1) for x in (query, key, value))
            out = self._attend(attn, layer, query, key, value, heads=heads)
            if permute_here:
                out = plan.permutation.unpermute(out, dim=1)
            if ulysses is not None:
                out = ulysses.to_sequence(out, attn.heads)
        else:
            out = self._dense_attention(query, key, value)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


# ---------------------------------------------------------------------- the adapter interface
FAMILY = "Wan 2.1 / 2.2 (incl. TI2V-5B)"

# diffusers' Wan ``_cp_plan`` shards the blocks' tokens and RoPE; the processor does the rest.
SUPPORTS_CONTEXT_PARALLEL = True


def self_attention_modules(transformer) -> list[torch.nn.Module]:
    return [block.attn1 for block in transformer.blocks]


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return hidden_states, timestep


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """Wan's self-attention sequence: the patchified latent grid, frame-major, no text."""
    hidden_states, _ = forward_inputs(args, kwargs)
    patch_t, patch_h, patch_w = transformer.config.patch_size
    _, _, frames, height, width = hidden_states.shape
    return SequenceLayout(LatentGrid(frames // patch_t, height // patch_h, width // patch_w))


def permutation_hooks(transformer, state) -> list[tuple[torch.nn.Module, str, object]]:
    """Hooks that put the token sequence in the plan's order for the whole block stack.

    Every op of a Wan block except attention is per token, so permuting the hidden states before
    block 0 and unpermuting after the last block is exact, provided every block also gets RoPE and
    per-token timestep modulation (Wan2.2 TI2V) in the same order: the transformer passes its own
    copies of those to each block, so each block's hook swaps in the permuted ones, computed
    once per forward by block 0's hook.
    """
    names = ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb")
    permuted_inputs: dict[str, object] = {}

    def before_block(module, args, kwargs):
        if module is transformer.blocks[0]:
            plan = state.active_plan
            # Under context parallelism the blocks hold a shard: the processor permutes per call.
            state.permuted = plan is not None and plan.permutation is not None and state.parallel is None
            permuted_inputs.clear()
            if state.permuted:
                permutation = plan.permutation
                values = dict(zip(names, args)) | kwargs
                if values["temb"].dim() == 4:  # per-token modulation: [B, S, 6, C]
                    permuted_inputs["temb"] = permutation.permute(values["temb"], dim=1)
                if values.get("rotary_emb") is not None:
                    permuted_inputs["rotary_emb"] = tuple(
                        permutation.permute(f, dim=1) for f in values["rotary_emb"]
                    )
                values["hidden_states"] = permutation.permute(values["hidden_states"], dim=1)
                return (), values | permuted_inputs
        if not state.permuted:
            return args, kwargs
        return (), dict(zip(names, args)) | kwargs | permuted_inputs

    def after_last_block(module, output):
        if not state.permuted:
            return output
        state.permuted = False
        permuted_inputs.clear()
        return state.active_plan.permutation.unpermute(output, dim=1)

    last = transformer.blocks[-1]
    return [
        (block, "fastdit.permute", function_hook(before_block, after_last_block if block is last else None))
        for block in transformer.blocks
    ]


class WanAdapter(ModelAdapter):
    """``WanTransformer3DModel`` (Wan 2.1 / 2.2, T2V and I2V)."""

    model_classes = ("WanTransformer3DModel",)
    family = FAMILY
    processor_class = WanSparseAttnProcessor
    supports_context_parallel = SUPPORTS_CONTEXT_PARALLEL
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    model_hooks = staticmethod(permutation_hooks)
