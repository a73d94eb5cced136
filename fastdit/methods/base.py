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

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

import torch

from ..kernels import BlockSparsity, WindowMask
from ..layout import SequenceLayout, TilePermutation, _device_key


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
        quantize: the kernel quantization ``fastdit.apply(..., quantize=...)`` asked for
            (``"int8"``) or ``None``; a method that accepts it (``accepts_quantize = True``)
            passes it to the kernel calls of its sparse attention.
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
    quantize: str | None = None
    heads: object | None = None

    @property
    def layout(self) -> SequenceLayout:
        return self.plan.layout

    @property
    def cache_key(self) -> tuple:
        """Where per-layer state of this call lives: (CFG context, transformer, layer)."""
        return (self.context, self.transformer, self.layer)


# --------------------------------------------------------------------------- plan cache
class PlanCache:
    """A bounded least-recently-used cache of plans and what they are built from.

    Every method's plan cache and ``fastdit.natten``'s per-shape methods use one of these, so a
    long-running process that sees changing shapes keeps at most :attr:`max_size` entries per
    cache (default :data:`PLAN_CACHE_SIZE`): the least recently used entry goes first; a plan
    that is evicted is simply rebuilt when its shape comes back.

    Keys are canonical: every ``torch.device`` inside a key tuple (at any depth) is replaced by
    its canonical form (``cuda`` -> ``cuda:<current>``, as the kernels see it), so one plan is
    never built twice under two spellings of its device. Pass devices as ``torch.device`` (or
    through :func:`PlanCache.device`); ``None`` means the CPU.

    Thread-safe for look-ups and inserts; two threads that miss the same key at once may both
    build (plans are deterministic, the second insert wins). A copy or a pickle of a cache is an
    empty cache of the same size (a method config that is copied rebuilds its plans).
    """

    def __init__(self, max_size: int | None = None) -> None:
        max_size = PLAN_CACHE_SIZE if max_size is None else max_size
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be an int >= 1, got max_size={max_size!r}")
        self.max_size = max_size
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def device(device) -> torch.device:
        """The canonical device of a key: ``None`` -> cpu, ``"cuda"`` -> ``cuda:<current>``."""
        return _device_key(device)

    @classmethod
    def canonical(cls, key: Hashable) -> Hashable:
        if isinstance(key, torch.device):
            return _device_key(key)
        if type(key) is tuple:
            return tuple(cls.canonical(part) for part in key)
        return key

    def get(self, key: Hashable, default: Any = None) -> Any:
        key = self.canonical(key)
        with self._lock:
            if key not in self._entries:
                return default
            self._entries.move_to_end(key)
            return self._entries[key]

    def put(self, key: Hashable, value: Any) -> Any:
        key = self.canonical(key)
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
        return value

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The entry of ``key``, built by ``build()`` and stored on a miss."""
        sentinel = _MISSING
        value = self.get(key, sentinel)
        if value is sentinel:
            value = self.put(key, build())
        return value

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return self.canonical(key) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list:
        """The keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __reduce__(self):
        return (type(self), (self.max_size,))

    def __repr__(self) -> str:
        return f"PlanCache({len(self)}/{self.max_size} entries)"


# Entries per cache. A plan is at most a few MB (GNA at Wan2.1 480p: about 1.3 MB with its window
# mask and permutation; a dense plan of Wan2.1-14B 720p: 1.4 MB); 32 shapes x devices per method
# instance bound the memory a long-running service spends on plans.
PLAN_CACHE_SIZE = 32
_MISSING = object()
