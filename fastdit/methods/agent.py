"""Agent attention (Han et al., 2024, "Agent Attention: On the Integration of Softmax and Linear Attention").

The rule (fastdit's ``METHODS.md``, section 6). ``n`` agent tokens ``A`` (``n << N``) stand between
the ``N`` queries and the ``N`` keys of a self-attention::

    O = softmax(Q A^T * a) . (softmax(A K^T / sqrt(d)) . V) + shortcut * V

Stage 1 (agent aggregation): the agents attend to every key with the ordinary scale ``d**-0.5``,
giving one value per agent, ``V_A = softmax(A K^T / sqrt(d)) V``. Stage 2 (agent broadcast): every
query attends to the ``n`` agents with the softer scale ``a = d**-query_scale_exponent`` and reads
their values. The training-free Stable Diffusion variant (AgentSD, the reference's ``agentsd``)
uses ``a = d**-0.15`` (its ``k_scale2 = 0.3`` applied as a power of ``d**-0.5``) and adds the
shortcut ``0.075 * V``. Cost ``O(N n d)`` instead of ``O(N**2 d)``; no ``N x N`` tensor exists.

Both stages run on :func:`fastdit.kernels.block_sparse_attention` with dense plans (stage 1:
``n`` queries x ``N`` keys, stage 2: ``N`` queries x ``n`` keys; the kernel takes ``S_q != S_kv``
and a softmax ``scale``, so ``a`` is passed as stage 2's scale, nothing is pre-scaled).

Agents: pooled queries. The reference merges the hidden states with ToMe (bipartite soft matching;
``sx = sy = 4``, ``agent_ratio = 0.95``, which leaves one agent per 4 x 4 cell: ``N / 16``) and
projects them with ``W_q``. fastdit averages the queries over cells of the latent grid instead:
``cell`` (``(h, w)``, default ``(4, 4)``, the same ``N / 16`` agents) on image grids (one latent
frame: Stable Diffusion UNets, Wan at ``num_frames=1``), ``video_cell`` (``(t, h, w)``, default
``(2, 8, 8)``) on video grids. For a UNet the queries are ``W_q`` of the hidden states (no bias, no
norm), and a mean commutes with a linear map, so the agents are exactly ``W_q`` of the cell-pooled
hidden states. For DiTs they are the queries after QK norm and RoPE, as ``METHODS.md`` states.
Deviations from the reference, on purpose: (1) spatial cells replace ToMe's similarity-based
merging (no data-dependent matching, no random generator; the agents tile the image evenly);
(2) fastdit does not merge the queries and keys themselves (ToMe's ``ratio = 0.4`` token
reduction), so every query and key stays: the output is agent attention over all ``N`` tokens.
A cell larger than the grid is clamped to it; cells at the grid's far edges average only the real
tokens they cover (:class:`~fastdit.layout.TilePermutation` pads with zeros, the mean is
rescaled). Pooling is :func:`fastdit.kernels.block_mean_pool` over the tile-major order.

The guard of the reference: when the agents are not fewer than half the tokens (``2 n >= N``),
exact attention is cheaper and better, so the call takes the stock (exact) path; this is logged
once per (grid, cell), not per call.

Where it runs (:meth:`Agent.runs_on`, asked by the processor before any projection):

* UNets: self-attention only, in layers whose spatial downsampling relative to the
  highest-resolution self-attention of the UNet is ``<= max_downsample`` (default 1: only the
  highest-resolution attention blocks, the reference's ``max_downsample=1``; on SDXL, whose first
  down block has no attention, that is ``down_blocks.1`` and ``up_blocks.1``). Cross-attention
  is never touched;
* steps: the shared :class:`~fastdit.schedule.Schedule`, whose amounts count *dense* steps; the
  published use runs agents in the first 40% of the steps only, so the default is
  ``dense_last_steps=0.6`` (the last 60% run exact); the reference runs ToMe alone there, which
  fastdit does not implement;
* DiTs: every self-attention layer and step the schedule leaves sparse (``dense_layers``,
  ``dense_steps``, ``dense_last_steps``); no published training-free DiT configuration exists.

Joint attention with text (HunyuanVideo ``[video | text]``, text right-padded): the text stays
exact. Text queries attend to every valid key exactly (one kernel call over the whole sequence
with the key padding). Video queries attend, in one softmax, to the ``n`` agents (logits at scale
``a``) and to the valid text keys (logits at the exact ``d**-0.5``), with values ``[V_A | V_text]``;
the agents aggregate the video keys only (stage 1), so no key is counted twice. One kernel call
with one scale does this: the agent keys are multiplied by ``a * sqrt(d)`` and the call's scale
is ``d**-0.5``. The shortcut ``shortcut * V`` is added to the video rows only.

Density recorded per call: the (query, key) score pairs computed, relative to exact attention
over the same sequence: ``2 n / N`` without text, ``(n N + N (n + L) + L (N + L)) / (N + L)**2``
with ``L`` text tokens. No host synchronisation happens inside a call: agent counts, plans and the
pooling's rescale factors are cached per (grid, device).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass

import torch

from ..kernels import SUPPORTED_BLOCK_SIZES, BlockSparsity, block_mean_pool, block_sparse_attention
from ..layout import LatentGrid, SequenceLayout, TilePermutation, device_key, positive_int
from ..schedule import Schedule
from .base import AttentionCall, Method, MethodPlan, PlanCache

__all__ = ["Agent"]

logger = logging.getLogger("fastdit")

# (grid shape, cell) pairs whose guard fallback was already logged.
_logged_guards: set[tuple[tuple[int, int, int], tuple[int, int, int]]] = set()


def _cell(name: str, value, length: int) -> tuple[int, ...]:
    try:
        entries = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a tuple of {length} positive ints, got {name}={value!r}") from None
    if len(entries) != length:
        raise ValueError(f"{name} must have {length} entries, got {name}={value!r}")
    return tuple(positive_int(f"{name}[{i}]", v) for i, v in enumerate(entries))


def _finite(name: str, value, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {name}={value!r}")
    if minimum is not None and float(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={value!r}")
    return float(value)


@dataclass(frozen=True)
class Agent(Method):
    """Agent attention (Han et al., 2024) with the training-free Stable Diffusion defaults.

    ``O = softmax(Q A^T * d**-query_scale_exponent) . softmax(A K^T / sqrt(d)) . V + shortcut * V``
    with agents ``A`` the queries averaged over grid cells; see the module docstring for the rule,
    the deviations from the reference and the handling of text.

    Attributes:
        cell: ``(h, w)`` pooling cell on image grids (one latent frame); ``(4, 4)`` gives the
            reference's ``N / 16`` agents.
        video_cell: ``(t, h, w)`` pooling cell on video grids (more than one latent frame).
        query_scale_exponent: stage 2's softmax scale is ``d**-query_scale_exponent`` (0.15: the
            reference's ``k_scale2 = 0.3`` of ``d**-0.5``).
        shortcut: weight of the ``V`` shortcut added to the output (0.075).
        max_downsample: UNets: agents only in self-attention layers downsampled at most this much
            relative to the UNet's highest-resolution self-attention (1, 2, 4, ...); DiTs have
            one resolution (1).
        block_size: kernel block size of both stages (64 or 128).
        dense_steps, dense_last_steps, dense_layers: the dense schedule (ints count, floats are
            fractions); by default the last 60% of the steps run exact, i.e. agents in the first
            40%, as published for Stable Diffusion.
    """

    name = "agent"

    cell: tuple[int, int] = (4, 4)
    video_cell: tuple[int, int, int] = (2, 8, 8)
    query_scale_exponent: float = 0.15
    shortcut: float = 0.075
    max_downsample: int = 1
    block_size: int = 128
    dense_steps: int | float = 0
    dense_last_steps: int | float = 0.6
    dense_layers: int | float = 0

    # Heads are independent: runs on Ulysses head shards (fastdit.parallel).
    head_parallel = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", _cell("cell", self.cell, 2))
        object.__setattr__(self, "video_cell", _cell("video_cell", self.video_cell, 3))
        object.__setattr__(
            self, "query_scale_exponent", _finite("query_scale_exponent", self.query_scale_exponent, 0.0)
        )
        object.__setattr__(self, "shortcut", _finite("shortcut", self.shortcut))
        object.__setattr__(self, "max_downsample", positive_int("max_downsample", self.max_downsample))
        if isinstance(self.block_size, bool) or self.block_size not in SUPPORTED_BLOCK_SIZES:
            raise ValueError(
                f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got block_size={self.block_size!r}"
            )
        schedule = Schedule(self.dense_steps, self.dense_last_steps, self.dense_layers)  # validates
        for name in ("dense_steps", "dense_last_steps", "dense_layers"):
            object.__setattr__(self, name, getattr(schedule, name))

    # ------------------------------------------------------------------ agents
    def cell_for(self, grid: LatentGrid) -> tuple[int, int, int]:
        """The ``(t, h, w)`` pooling cell used on ``grid``, clamped to its extents."""
        base = (1, *self.cell) if grid.frames == 1 else self.video_cell
        return tuple(min(c, e) for c, e in zip(base, grid.shape))  # type: ignore[return-value]

    def num_agents(self, grid: LatentGrid) -> int:
        """``n = prod(ceil(extent / cell))`` over the three grid dimensions."""
        return math.prod(math.ceil(e / c) for e, c in zip(grid.shape, self.cell_for(grid)))

    def runs_on(self, layout: SequenceLayout, downsample: int = 1) -> bool:
        """Whether a self-attention over ``layout`` uses agents (else the stock, exact path).

        False for layers downsampled more than ``max_downsample``, and, by the reference's guard,
        when the agents are not fewer than half the video tokens (logged once per grid and cell).
        """
        if downsample > self.max_downsample:
            return False
        grid = layout.grid
        agents, tokens = self.num_agents(grid), grid.num_tokens
        if 2 * agents >= tokens:
            key = (grid.shape, self.cell_for(grid))
            if key not in _logged_guards:
                _logged_guards.add(key)
                logger.warning(
                    "fastdit Agent: %d agents (cell %s) are not fewer than half of the %d tokens of "
                    "grid %s; this attention runs exact (the reference's guard)",
                    agents, key[1], tokens, grid.shape,
                )
            return False
        return True

    def _caches(self) -> PlanCache:
        # Frozen dataclass: the cache lives in the instance dict, outside the fields (eq, repr).
        cache = self.__dict__.get("_caches_by_key")
        if cache is None:
            cache = self.__dict__.setdefault("_caches_by_key", PlanCache())
        return cache

    def _pooling(self, grid: LatentGrid, device) -> tuple[TilePermutation, torch.Tensor]:
        """The cell permutation and, per cell, ``cell volume / real tokens`` (fp32 ``[n, 1]``)."""
        device = device_key(device)

        def build() -> tuple[TilePermutation, torch.Tensor]:
            permutation = TilePermutation(grid, self.cell_for(grid))
            real = permutation.valid_mask().view(permutation.num_tiles, permutation.tile_volume).sum(-1)
            rescale = (permutation.tile_volume / real.to(torch.float32))[:, None]
            return permutation, rescale.to(device)

        return self._caches().get_or_build(("pool", grid, device), build)

    def agents(self, query: torch.Tensor, grid: LatentGrid) -> torch.Tensor:
        """Cell means of the video queries ``[B, N, H, D]`` (frame-major): ``[B, n, H, D]``,
        contiguous, in the queries' dtype (the mean is taken in fp32)."""
        permutation, rescale = self._pooling(grid, query.device)
        pooled = block_mean_pool(permutation.permute(query, dim=1), permutation.tile_volume)
        # Padding positions of edge cells are zeros inside the pooled block: rescale to real tokens.
        return (pooled * rescale).transpose(1, 2).to(query.dtype).contiguous()

    # ------------------------------------------------------------------ plans
    def _dense(self, seq_q: int, seq_kv: int, device) -> BlockSparsity:
        device = device_key(device)
        return self._caches().get_or_build(
            ("dense", seq_q, seq_kv, device),
            lambda: BlockSparsity.dense(seq_q, seq_kv, self.block_size, device=device),
        )

    def plan(self, layout: SequenceLayout | LatentGrid, device=None) -> MethodPlan:
        """The static part: a dense plan over ``layout`` in diffusers' order (no permutation).

        The agent computation itself is composed per call by :meth:`attend`.
        """
        if isinstance(layout, LatentGrid):
            layout = SequenceLayout(layout)
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"layout must be a SequenceLayout or LatentGrid, got layout={layout!r}")
        return self._caches().get_or_build(
            ("plan", layout, device_key(device)),
            lambda: MethodPlan(self._dense(layout.num_tokens, layout.num_tokens, device), layout),
        )

    def density(self, layout: SequenceLayout) -> float:
        """Score pairs computed relative to exact attention over ``layout`` (see module docstring)."""
        tokens, text = layout.grid.num_tokens, layout.text_length
        agents = self.num_agents(layout.grid)
        total = tokens + text
        pairs = agents * tokens + tokens * (agents + text) + text * total
        return pairs / total**2

    # ------------------------------------------------------------------ the rule
    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, float]:
        """Agent attention of one call; Q/K/V ``[B, S, H, D]`` over ``call.layout`` in diffusers'
        order (video frame-major, text where the layout puts it). Returns ``(out, density)``."""
        layout = call.layout
        if query.shape[1] != layout.num_tokens:
            raise ValueError(
                f"Agent got {query.shape[1]} tokens, but the call's layout has {layout.num_tokens} "
                f"(grid {layout.grid.shape}, {layout.text_length} text)"
            )
        device, head_dim = query.device, query.shape[-1]
        grid, video = layout.grid, layout.video_slice
        tokens = grid.num_tokens
        q_video, k_video, v_video = query[:, video], key[:, video], value[:, video]
        agents = self.agents(q_video, grid)
        num_agents = agents.shape[1]
        agent_scale = head_dim ** -self.query_scale_exponent

        # Stage 1: the agents aggregate the video keys (scale d**-0.5).
        agent_values = block_sparse_attention(agents, k_video, v_video, self._dense(num_agents, tokens, device))

        text = layout.text_slice
        if text is None:
            # Stage 2: every query reads the agents (scale a).
            out = block_sparse_attention(
                query, agents, agent_values, self._dense(tokens, num_agents, device), scale=agent_scale
            )
            return torch.add(out, value, alpha=self.shortcut), self.density(layout)

        # Joint attention: video rows see [agents | text keys] in one softmax, text rows are exact.
        exact_scale = head_dim**-0.5
        num_text = layout.text_length
        agent_keys = agents * (agent_scale / exact_scale)
        keys = torch.cat([agent_keys, key[:, text]], dim=1)
        values = torch.cat([agent_values, value[:, text]], dim=1)
        # call.key_padding counts valid keys of [video | text]; here they are [agents | text].
        padding = None if call.key_padding is None else call.key_padding - tokens + num_agents
        video_out = block_sparse_attention(
            q_video, keys, values, self._dense(tokens, num_agents + num_text, device),
            scale=exact_scale, key_padding=padding,
        )
        video_out = torch.add(video_out, v_video, alpha=self.shortcut)
        text_out = block_sparse_attention(
            query[:, text], key, value, self._dense(num_text, layout.num_tokens, device),
            key_padding=call.key_padding,
        )
        parts = (text_out, video_out) if layout.text.position == "before" else (video_out, text_out)
        return torch.cat(parts, dim=1), self.density(layout)
