"""HunyuanVideo (``HunyuanVideoTransformer3DModel``, T2V and I2V) on fastdit's layout -> method -> kernels.

Where things are in diffusers' HunyuanVideo (checked against diffusers 0.42):

* joint self-attention is ``transformer_blocks[i].attn`` (dual-stream: video through
  ``to_q/to_k/to_v`` + ``norm_q/norm_k``, text through ``add_q_proj/add_k_proj/add_v_proj`` +
  ``norm_added_q/norm_added_k``) and ``single_transformer_blocks[i].attn`` (single-stream: one set of
  projections over the concatenation). Both build the sequence ``[video | text]`` (the dual-stream
  processor concatenates ``[query, encoder_query]``; the single-stream one concatenates
  ``[hidden_states, encoder_hidden_states]`` before projecting) and apply RoPE to the video tokens
  only. Both are run by ``HunyuanVideoAttnProcessor2_0``;
* the text is right-padded to a fixed length; the transformer turns ``encoder_attention_mask`` into
  ``attention_mask = arange(N + L) < N + encoder_attention_mask.sum(1)``, shaped ``[B, 1, 1, N + L]``:
  a **key** mask only. Every query row, padded text rows included, attends to all valid keys (the
  padded rows' outputs are ordinary attention outputs that flow on through the blocks and are
  dropped at the end). One valid key length per batch element reproduces it exactly, so fastdit
  passes ``key_padding = attention_mask.sum(-1)`` to the kernel and matches stock on every row;
* the token refiner (``context_embedder.token_refiner``) has its own self-attention over the text
  with a ``[B, 1, L, L]`` mask, run by diffusers' default ``AttnProcessor2_0``: always computed by
  that stock processor, untouched;
* the latent grid is ``(F // patch_size_t, H // patch_size, W // patch_size)`` at the transformer's
  input, tokens frame-major; the step comes from the pipeline's ``cache_context`` (see
  ``fastdit.integration``).

Layers are numbered dual-stream blocks first (``0 .. num_layers - 1``), then single-stream blocks.
On sparse steps and layers the joint attention runs on :func:`fastdit.kernels.block_sparse_attention`
with the method's plan over ``[video | text]`` (the methods keep text rows and columns dense). Dense
steps and layers of a sparse method's schedule are handed to the stock processor; the ``Dense``
method always runs fastdit's own kernel (it is the kernel baseline).

Methods whose plan carries a token permutation (GNA) get Q/K/V in tile-major order per attention
call (video permuted, text left in place: ``permute_sequence``/``unpermute_sequence``); unlike Wan
there are no block hooks that permute once per forward (future work: HunyuanVideo's blocks carry
text next to the video and the single-stream blocks concatenate them, so a once-per-forward
permutation has to wrap the concatenation and the ``token_replace`` first-frame modulation).

Several GPUs: diffusers 0.42.1 has no HunyuanVideo ``_cp_plan``; :func:`context_parallel_plan`
is one for fastdit's processor (video sharded, text whole on every rank), passed through
``enable_parallelism(..., cp_plan=...)``. Under it the processor computes every joint attention,
dense layers included (diffusers' stock Ulysses cannot: the text is replicated), and
``fastdit.remove`` leaves a transformer whose stock processors fail on the next forward (their
key mask no longer matches), never one that computes something else. See :mod:`fastdit.parallel`.
"""

from __future__ import annotations

import torch

from ..layout import LatentGrid, SequenceLayout, TextSegment
from ..schedule import Schedule
from .base import FastditAttnProcessor, ModelAdapter

__all__ = ["HunyuanVideoAdapter", "HunyuanVideoSparseAttnProcessor"]


def _rotate_video(x: torch.Tensor, num_text: int | None, rotary_emb) -> torch.Tensor:
    """RoPE on the video tokens of ``x`` ([B, S, H, D]); the last ``num_text`` tokens are left as they are."""
    from diffusers.models.embeddings import apply_rotary_emb

    if not num_text:
        return apply_rotary_emb(x, rotary_emb, sequence_dim=1)
    video = apply_rotary_emb(x[:, :-num_text], rotary_emb, sequence_dim=1)
    return torch.cat([video, x[:, -num_text:]], dim=1)


class HunyuanVideoSparseAttnProcessor(FastditAttnProcessor):
    """Attention processor for HunyuanVideo that runs the joint video+text attention through a fastdit method.

    Usable both ways::

        fastdit.apply(pipe, fastdit.Radial.preset("hunyuanvideo"))       # installs everything

        pipe.transformer.set_attn_processor(HunyuanVideoSparseAttnProcessor(fastdit.Radial()))
        fastdit.attach(pipe)                                             # the hooks it needs

    One instance can be installed on every attention module: the joint attention of the dual- and
    single-stream blocks (the modules ``fastdit.attach``/``apply`` registered as layers) is computed
    here; any other call (the token refiner's self-attention) goes to the stock processor it had.
    """

    def __init__(self, method, schedule: Schedule | None = None) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        super().__init__(method, schedule)
        self._stock = HunyuanVideoAttnProcessor2_0()  # the dual- and single-stream blocks'
        self._stock_default = AttnProcessor2_0()  # diffusers' default `Attention` one (token refiner)
        self._key_lengths: tuple[torch.Tensor, torch.Tensor] | None = None  # (attention_mask, lengths)

    def _stock_call(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        return self._call_stock(
            self._stock, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
        )

    def _valid_key_lengths(
        self, attention_mask: torch.Tensor | None, batch: int, seq: int
    ) -> torch.Tensor | None:
        """Valid keys per batch element, int32 ``[B]``, from the transformer's ``[B, 1, 1, S]`` key mask.

        The transformer builds one mask per forward and hands the same tensor to every block, so the
        lengths are computed once per forward (no host sync).
        """
        if attention_mask is None:
            return None
        cached = self._key_lengths
        if cached is not None and cached[0] is attention_mask:
            return cached[1]
        if attention_mask.dtype != torch.bool or tuple(attention_mask.shape) != (batch, 1, 1, seq):
            raise ValueError(
                "HunyuanVideoSparseAttnProcessor expects the boolean key mask [B, 1, 1, S] that "
                f"HunyuanVideoTransformer3DModel builds (valid keys first), got {attention_mask.dtype} "
                f"{tuple(attention_mask.shape)} for B={batch}, S={seq}"
            )
        lengths = attention_mask.reshape(batch, seq).sum(-1, dtype=torch.int32)
        self._key_lengths = (attention_mask, lengths)
        return lengths

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        state = self.state
        if state is None or id(attn) not in state.layer_index:
            # Not a registered joint-attention layer. HunyuanVideo's joint modules have added
            # projections (dual-stream) or no output projection (single-stream, pre_only); any other
            # module (the token refiner's self-attention) had diffusers' default processor.
            added = getattr(attn, "add_q_proj", None) is not None
            joint_module = added or getattr(attn, "pre_only", False)
            if not joint_module:
                return self._stock_default(attn, hidden_states, encoder_hidden_states, attention_mask)
            if state is None or state.active_plan is None:
                raise self._unbound_error()
            if state.parallel is not None:
                raise ValueError(
                    "a HunyuanVideo joint attention module fastdit did not register runs under "
                    "context parallelism, where only fastdit's processor is exact; install fastdit "
                    "with fastdit.apply(pipe, method) on the whole transformer"
                )
            return self._stock_call(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )
        if encoder_hidden_states is None:
            raise ValueError("HunyuanVideo's joint attention is called with the text (encoder_hidden_states)")

        layer, sparse = self._layer_runs_sparse(attn)
        ulysses = self._ulysses
        if ulysses is not None:
            return self._ulysses_call(
                attn, ulysses, layer, sparse, hidden_states, encoder_hidden_states, attention_mask,
                image_rotary_emb,
            )
        if not sparse:
            return self._stock_call(
                attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
            )

        plan = state.active_plan
        layout = plan.layout
        num_video, num_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        if num_video != layout.grid.num_tokens or num_text != layout.text_length:
            raise ValueError(
                f"attention sequence has {num_video} video + {num_text} text tokens, but the plan's "
                f"layout (read from the transformer's inputs) has {layout.grid.num_tokens} + "
                f"{layout.text_length}"
            )
        query, key, value = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        batch, seq = query.shape[0], query.shape[1]
        key_lengths = self._valid_key_lengths(attention_mask, batch, seq)
        out = self._sparse_attend(attn, layer, query, key, value, key_lengths)
        return self._project_out(attn, out.flatten(2, 3).to(query.dtype), num_text)

    def _joint_qkv(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """Steps 1-4 of the stock processor: projections, QK norm, RoPE on the video tokens,
        ``[video | text]``. Q/K/V ``[B, S, H, D]``."""
        num_text = encoder_hidden_states.shape[1]
        single_stream = attn.add_q_proj is None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))
        key = attn.to_k(hidden_states).unflatten(2, (attn.heads, -1))
        value = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            text_in_qk = num_text if single_stream else None
            query = _rotate_video(query, text_in_qk, image_rotary_emb)
            key = _rotate_video(key, text_in_qk, image_rotary_emb)
        if not single_stream:
            encoder_query = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_key = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)
        return query, key, value

    def _sparse_attend(self, attn, layer, query, key, value, key_lengths, heads=None):
        """Step 5: block-sparse attention over ``[video | text]``, padded text keys masked by one
        valid length per batch element; GNA's tile-major video order applied around it."""
        plan = self.state.active_plan
        layout, permutation = plan.layout, plan.permutation
        seq = query.shape[1]
        if permutation is not None:
            # Tile-major video, text in place. GNA's tiles divide the grid, so no padding enters
            # the sequence and the valid key lengths only shift by the (zero) padding count.
            query, key, value = (
                permutation.permute_sequence(x, layout, dim=1) for x in (query, key, value)
            )
            if key_lengths is not None:
                key_lengths = key_lengths + (query.shape[1] - seq)
        out = self._attend(attn, layer, query, key, value, key_padding=key_lengths, heads=heads)
        if permutation is not None:
            out = permutation.unpermute_sequence(out, layout, dim=1)
        return out

    @staticmethod
    def _project_out(attn, out: torch.Tensor, num_text: int):
        """Step 6 of the stock processor: split video and text, output projections."""
        hidden_states, encoder_hidden_states = out[:, :-num_text], out[:, -num_text:]
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states

    def _ulysses_call(
        self, attn, ulysses, layer, sparse, hidden_states, encoder_hidden_states, attention_mask,
        image_rotary_emb,
    ):
        """Joint attention under Ulysses with :func:`context_parallel_plan`: the video tokens
        arrive sharded (and RoPE with them), the text whole on every rank. Video Q/K/V go through
        the all-to-all (the full video of this rank's heads), the text is sliced to the same heads,
        and ``[video | text]`` is exactly one process's sequence for them: the plan (sparse) or
        diffusers' attention backend with the key mask (dense, no parallel config). Back: the
        video all-to-all, the text outputs of all heads gathered, so every rank keeps the same text.
        """
        layout = self.state.active_plan.layout
        num_video, num_text = layout.grid.num_tokens, encoder_hidden_states.shape[1]
        if num_text != layout.text_length:
            raise ValueError(
                f"under context parallelism HunyuanVideo's text must be whole on every rank, got "
                f"{num_text} of {layout.text_length} text tokens: enable parallelism with fastdit's "
                "plan, transformer.enable_parallelism(config=..., "
                "cp_plan=fastdit.pipelines.hunyuan_video.context_parallel_plan(transformer))"
            )
        local_video = hidden_states.shape[1]
        query, key, value = self._joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        heads = ulysses.heads(attn.heads)
        video = ulysses.to_heads([x[:, :local_video] for x in (query, key, value)], num_video)
        query, key, value = (
            torch.cat([part, heads.local(x[:, local_video:], 2)], dim=1)
            for part, x in zip(video, (query, key, value))
        )
        batch, seq = query.shape[0], query.shape[1]
        if sparse:
            key_lengths = self._valid_key_lengths(attention_mask, batch, seq)
            out = self._sparse_attend(attn, layer, query, key, value, key_lengths, heads)
        else:
            from diffusers.models.attention_dispatch import dispatch_attention_fn

            out = dispatch_attention_fn(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )
        video_out = ulysses.to_sequence(out[:, :num_video], attn.heads)
        text_out = heads.gather(out[:, num_video:].contiguous(), 2)
        out = torch.cat([video_out, text_out], dim=1).flatten(2, 3).to(query.dtype)
        return self._project_out(attn, out, num_text)


# ---------------------------------------------------------------------- the adapter interface
FAMILY = "HunyuanVideo"

# With fastdit's processor and :func:`context_parallel_plan` (diffusers 0.42.1 ships none).
SUPPORTS_CONTEXT_PARALLEL = True


def context_parallel_plan(transformer) -> dict:
    """A ``_cp_plan`` for ``HunyuanVideoTransformer3DModel`` that fastdit's processor runs exactly.

    Pass it to diffusers' public API: ``transformer.enable_parallelism(config=
    ContextParallelConfig(ulysses_degree=N), cp_plan=context_parallel_plan(transformer))``
    (``fastdit.parallel.enable`` and ``--ulysses`` do). The video tokens are sharded at the first
    block (and RoPE's tables with them) and gathered at ``proj_out``; the text, its key mask and
    the token refiner stay whole on every rank. The stock processor cannot run this (diffusers'
    Ulysses template would all-to-all the replicated text and count it once per rank, and its key
    mask would not match), so the plan is for fastdit's processor only: with it installed, every
    joint attention all-to-alls the video, slices the text to the rank's heads and gathers the
    text outputs back (see ``HunyuanVideoSparseAttnProcessor._ulysses_call``).
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    first = "transformer_blocks.0" if len(transformer.transformer_blocks) else "single_transformer_blocks.0"
    split_rope = ContextParallelInput(split_dim=0, expected_dims=2, split_output=True)
    return {
        "rope": {0: split_rope, 1: split_rope},
        first: {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)},
        "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }


def check_context_parallel(model, cp_config) -> None:
    """Refuse what the plan above does not cover exactly."""
    if getattr(model.config, "image_condition_type", None) == "token_replace":
        raise ValueError(
            "HunyuanVideo I2V with image_condition_type='token_replace' modulates the first frame's "
            "tokens by position, which a sequence shard does not see; run it in one process"
        )


def self_attention_modules(transformer) -> list[torch.nn.Module]:
    """The joint attention modules in layer order: dual-stream blocks, then single-stream blocks."""
    return [block.attn for block in transformer.transformer_blocks] + [
        block.attn for block in transformer.single_transformer_blocks
    ]


def _argument(args: tuple, kwargs: dict, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    if len(args) > position:
        return args[position]
    raise TypeError(f"HunyuanVideoTransformer3DModel.forward called without {name}")


def forward_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return _argument(args, kwargs, "hidden_states", 0), _argument(args, kwargs, "timestep", 1)


def sequence_layout(transformer, args: tuple, kwargs: dict) -> SequenceLayout:
    """HunyuanVideo's joint sequence: the patchified latent grid (frame-major), then the text.

    The text segment has the padded length; the valid length differs per batch element and reaches
    the kernel as ``key_padding`` (read from the transformer's attention mask), not through the layout.
    """
    hidden_states, _ = forward_inputs(args, kwargs)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 2)
    patch, patch_t = transformer.config.patch_size, transformer.config.patch_size_t
    _, _, frames, height, width = hidden_states.shape
    grid = LatentGrid(frames // patch_t, height // patch, width // patch)
    return SequenceLayout(grid, TextSegment(length=encoder_hidden_states.shape[1], position="after"))


class HunyuanVideoAdapter(ModelAdapter):
    """``HunyuanVideoTransformer3DModel`` (T2V and I2V). No block hooks: tile-major reordering (GNA)
    is applied per attention call by the processor (video part of Q/K/V permuted, text in place),
    which is exact; a once-per-forward permutation of the block stack is future work (see the
    module docstring)."""

    model_classes = ("HunyuanVideoTransformer3DModel",)
    family = FAMILY
    processor_class = HunyuanVideoSparseAttnProcessor
    supports_context_parallel = SUPPORTS_CONTEXT_PARALLEL
    self_attention_modules = staticmethod(self_attention_modules)
    forward_inputs = staticmethod(forward_inputs)
    sequence_layout = staticmethod(sequence_layout)
    context_parallel_plan = staticmethod(context_parallel_plan)
    check_context_parallel = staticmethod(check_context_parallel)
