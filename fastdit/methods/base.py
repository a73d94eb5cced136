"""What every method produces, and what a method that plans per call is told.

Static methods (Dense, Radial, GNA) implement ``plan(layout, device) -> MethodPlan``: one block
sparsity per sequence layout, cached, executed by the kernel for every sparse layer and step.

Methods that choose blocks from the data (VMoBA, AdaSpa), reorder per head (PARO) or compose
several kernel calls (Agent) also implement ``plan`` (its ``permutation``, if any, still drives the
once-per-forward token reordering, and its ``sparsity`` describes the static part, usually dense),
and in addition::

    new_runtime() -> object | None          # per-generation state (LSE cache, current plans)
    attend(query, key, value, call) -> (out, density)

``attend`` gets Q/K/V ``[B, S, H, D]`` after projections, norms and RoPE, in the token order of
``call.plan`` (the same order the static path would give the kernel) and returns the output in that
order, plus the attention density it ran at (fraction of (query block, key block) pairs computed,
averaged over heads), as a float or a 0-d tensor (read on the host only when someone asks). It computes attention with :mod:`fastdit.kernels` only: a method plans
block sparsities and composes kernel calls, it never carries an attention kernel of its own.

Under Ulysses context parallelism (:mod:`fastdit.parallel`) each rank attends over the full
sequence for a contiguous range of the heads. A static plan with per-head entries is sliced to
them by the processor. A method with ``attend`` runs there only if it declares
``head_parallel = True``: its ``attend`` then gets the rank's heads, ``call.heads`` (a
:class:`fastdit.parallel.HeadShard`: ``start``, ``count``, ``total``, ``gather``, ``local``; ``None``
in one process) says which, and any rule that spans heads (AdaSpa's budget tiers, PARO's per-head
plans) must use it so the result equals one process's.

Any method may also implement ``runs_on(layout, downsample) -> bool``, asked by the processor
before a layer the schedule leaves sparse computes anything: ``False`` sends the call to the
stock (exact) processor. ``downsample`` is the layer's spatial downsampling relative to the
model's highest-resolution self-attention (UNets: 1, 2, 4, ...; 1 for DiTs). Agent uses it for
its resolution restriction and its fallback guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import BlockSparsity, WindowMask
from ..layout import SequenceLayout, TilePermutation


@dataclass(frozen=True, eq=False)
class MethodPlan:
    """A method's plan for one sequence layout.

    Attributes:
        sparsity: which key blocks each query block visits, over the whole self-attention
            sequence (video and text tokens) in the order given by ``permutation``.
        layout: the sequence the plan was built for (grid and text segment).
        permutation: ``None`` when the plan is over diffusers' frame-major token order; otherwise
            the tile-major permutation of the video tokens (text kept in place) that Q, K and V
            must go through before the kernel, and the output after it, inverted.
        window_mask: further blocks the kernel computes under a token-level window rule (GNA
            configurations that are not perfectly block-sparse), or ``None``.
    """

    sparsity: BlockSparsity
    layout: SequenceLayout
    permutation: TilePermutation | None = None
    window_mask: WindowMask | None = None

    @property
    def density(self) -> float:
        """Share of (query block, key block) pairs computed, full and partial."""
        partial = self.window_mask.density if self.window_mask is not None else 0.0
        return self.sparsity.density + partial

    @property
    def sequence_length(self) -> int:
        """Tokens the kernel sees: the layout's, plus tile padding when permuted."""
        if self.permutation is None:
            return self.layout.num_tokens
        return self.permutation.permuted_sequence_length(self.layout)


@dataclass(frozen=True, eq=False)
class AttentionCall:
    """One self-attention call as a per-call method (``attend``) sees it.

    Attributes:
        plan: the method's static plan for this forward (layout, permutation).
        layer: block index of the attention module inside its transformer (0-based).
        num_layers: number of self-attention layers of that transformer.
        transformer: index of the transformer in the pipeline (Wan2.2: 0 high-noise, 1 low-noise).
        step: pipeline-level denoising step (CFG passes of one step share it), 0-based.
        num_steps: steps of this generation when the pipeline says (``None`` otherwise).
        context: the CFG context name diffusers gives the pass (``"cond"``, ``"uncond"``) or
            ``None`` outside a pipeline loop.
        generation: counter that grows with every new generation.
        runtime: the method's per-generation state (``method.new_runtime()``); a fresh one is made
            on every new generation and on every change of the sequence layout.
        key_padding: ``[B]`` int32 valid key counts (joint attention with padded text), or ``None``.
        heads: under Ulysses context parallelism, the heads Q/K/V hold (a
            :class:`fastdit.parallel.HeadShard`); ``None`` in one process (all heads).
    """

    plan: MethodPlan
    layer: int
    num_layers: int
    transformer: int
    step: int | None
    num_steps: int | None
    context: str | None
    generation: int
    runtime: object | None = None
    key_padding: torch.Tensor | None = None
    heads: object | None = None

    @property
    def layout(self) -> SequenceLayout:
        return self.plan.layout

    @property
    def cache_key(self) -> tuple:
        """Where per-layer state of this call lives: (CFG context, transformer, layer)."""
        return (self.context, self.transformer, self.layer)
