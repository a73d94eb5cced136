"""The method interface: :class:`Method` (the base every method subclasses), what a method
produces (:class:`MethodPlan`), what a method that plans per call is told (:class:`AttentionCall`),
and the registry of methods by name.

A method is one class, usually a frozen dataclass of its options with the paper's defaults::

    @dataclass(frozen=True)
    class Banded(fastdit.methods.Method):
        name = "banded"            # registers it: fastdit.apply(pipe, "banded"), --attention banded
        width: int = 2

        def plan(self, layout, device=None) -> MethodPlan: ...

Static methods (Dense, Radial, GNA) implement only ``plan(layout, device) -> MethodPlan``: one block
sparsity per sequence layout, cached, executed by the kernel for every sparse layer and step (the
default :meth:`Method.attend`).

Methods that choose blocks from the data (VMoBA, AdaSpa), reorder per head (PARO) or compose
several kernel calls (Agent) also implement ``plan`` (its ``permutation``, if any, still drives the
once-per-forward token reordering, and its ``sparsity`` describes the static part, usually dense),
and override::

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

Any method may also override ``runs_on(layout, downsample) -> bool``, asked by the processor
before a layer the schedule leaves sparse computes anything: ``False`` sends the call to the
stock (exact) processor. ``downsample`` is the layer's spatial downsampling relative to the
model's highest-resolution self-attention (UNets: 1, 2, 4, ...; 1 for DiTs). Agent uses it for
its resolution restriction and its fallback guard.

Registry: a subclass that sets ``name`` registers itself when its class is defined; a third-party
package adds methods through the entry-point group ``fastdit.methods`` (``name = "module:Class"``
in its ``[project.entry-points."fastdit.methods"]``), loaded the first time the registry is read.
:func:`available` lists them, :func:`create` builds one from options, :func:`as_method` is what
``fastdit.apply`` and the processors accept (a method or a registered name).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..kernels import BlockSparsity, WindowMask, block_sparse_attention
from ..layout import LatentGrid, SequenceLayout, TilePermutation, device_key
from ..plugins import load_entry_points, same_class

__all__ = [
    "AttentionCall",
    "Method",
    "MethodOptionError",
    "MethodPlan",
    "PLAN_CACHE_SIZE",
    "PlanCache",
    "ENTRY_POINT_GROUP",
    "as_method",
    "available",
    "create",
    "get",
    "register",
    "unregister",
]


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


# --------------------------------------------------------------------------- the base
class Method:
    """Base of every attention method: plans which key blocks each query block visits.

    Subclasses implement :meth:`plan`; every other hook has a default that a static method keeps.
    Setting the class attribute ``name`` registers the subclass (see :func:`available`), which
    makes it usable as ``fastdit.apply(pipe, name)``, ``fastdit generate --attention name``,
    ``fastdit compare --methods name`` and listed by ``fastdit info`` with its options (the
    constructor's parameters). A subclass without ``name`` (a test double, an intermediate
    base) is not registered.

    Class attributes:
        name: the registry name (letters, digits, ``.``, ``_``, ``-``), or ``None``.
        follows_schedule: whether the dense steps and layers of a :class:`~fastdit.Schedule` send
            calls to the stock processor. ``Dense`` sets it ``False``: it is fastdit's own kernel
            baseline and runs on every step and layer.
        dense_steps, dense_last_steps, dense_layers: the dense schedule the method carries
            (:meth:`fastdit.Schedule.from_method`); 0 unless a method's options or presets say.
        accepts_quantize: whether a method that overrides :meth:`attend` honours
            ``call.quantize`` (``fastdit.apply(..., quantize="int8")``). Static methods (the
            default :meth:`attend`) always do; a per-call method that leaves this ``False`` is
            refused with ``quantize=`` set.
        head_parallel: whether a method that overrides :meth:`attend` runs under Ulysses context
            parallelism, attending over the rank's heads (``call.heads``) with a result equal to
            one process's. Static methods (the default :meth:`attend`) always do: their per-head
            plans are sliced to the rank's heads.
    """

    name: ClassVar[str | None] = None
    follows_schedule: ClassVar[bool] = True
    accepts_quantize: ClassVar[bool] = False
    head_parallel: ClassVar[bool] = False
    dense_steps: int | float = 0
    dense_last_steps: int | float = 0
    dense_layers: int | float = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name") is not None:
            register(cls)

    # ------------------------------------------------------------------ per-call hooks
    def plan(self, layout: SequenceLayout, device: torch.device | str | None = None) -> MethodPlan:
        """The block sparsity for ``layout`` on ``device`` (cached by the method: it is asked
        before every transformer forward)."""
        raise NotImplementedError(f"{type(self).__name__} must implement plan(layout, device)")

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: AttentionCall
    ) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Self-attention of one call (Q/K/V ``[B, S, H, D]`` in ``call.plan``'s token order):
        ``(output, density)``. The default runs the static plan on the kernel, quantized as
        ``call.quantize`` asks, sliced to the rank's heads under Ulysses (``call.heads``)."""
        plan = call.plan
        sparsity, window_mask = plan.sparsity, plan.window_mask
        heads = call.heads
        if heads is not None:
            sparsity, window_mask = heads.slice_plan(sparsity), heads.ulysses.slice_window(window_mask, heads)
        out = block_sparse_attention(
            query, key, value, sparsity, key_padding=call.key_padding, window_mask=window_mask,
            quantize=call.quantize,
        )
        return out, plan.density

    @property
    def plans_per_call(self) -> bool:
        """Whether this method overrides :meth:`attend` (plans per call from Q and K, the step and
        its runtime) instead of running its static plan: only such methods must declare
        :attr:`accepts_quantize` and :attr:`head_parallel`."""
        return type(self).attend is not Method.attend

    def new_runtime(self) -> object | None:
        """Fresh per-generation state, passed to :meth:`attend` as ``call.runtime`` (made at every
        new generation and every change of the sequence layout); ``None`` by default."""
        return None

    def runs_on(self, layout: SequenceLayout, downsample: int = 1) -> bool:
        """Whether a self-attention over ``layout`` at spatial ``downsample`` (UNets; 1 for DiTs)
        runs this method; ``False`` sends it to the stock processor. ``True`` by default."""
        return True

    def check_models(self, models: list[torch.nn.Module], layers: list[int]) -> None:
        """Called by ``fastdit.apply`` with the models it installs on and their self-attention
        layer counts; raise ``ValueError`` for models the method cannot serve (PARO's calibrated
        plans). Accepts any by default."""

    def check_grid(self, grid: LatentGrid) -> None:
        """Called by the command line before generating with the latent grid the run will have;
        raise ``ValueError`` for a grid the method cannot serve (GNA's window larger than the
        grid, PARO's calibrated size). Accepts any by default."""

    # ------------------------------------------------------------------ options and presets
    @classmethod
    def options(cls) -> tuple[list[str], list[str]]:
        """(option names, required option names): the constructor's keyword parameters (dataclass
        fields and init-only variables such as PARO's ``plan``), private ones left out."""
        params = [
            p
            for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("_")
        ]
        return [p.name for p in params], [p.name for p in params if p.default is p.empty]

    @classmethod
    def presets(cls) -> tuple[str, ...]:
        """Names of the published configurations :meth:`preset` builds; none by default."""
        return ()

    @classmethod
    def preset(cls, name: str, **overrides) -> Method:
        """The published configuration ``name`` with option overrides."""
        raise ValueError(f"{cls.__name__} has no presets, got preset {name!r}")

    def config(self) -> dict[str, Any]:
        """The options this method holds, by name (a dataclass's init fields)."""
        if dataclasses.is_dataclass(self):
            return {
                f.name: getattr(self, f.name)
                for f in dataclasses.fields(self)
                if f.init and not f.name.startswith("_")
            }
        names, _ = self.options()
        return {name: vars(self)[name] for name in names if name in vars(self)}


# --------------------------------------------------------------------------- the registry
ENTRY_POINT_GROUP = "fastdit.methods"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_methods: dict[str, type[Method]] = {}


class MethodOptionError(ValueError):
    """An unknown method, option or preset, or a missing required option (see :func:`create`)."""


def register(cls: type[Method], name: str | None = None) -> type[Method]:
    """Register ``cls`` under ``name`` (default: ``cls.name``); subclassing :class:`Method` with a
    ``name`` calls this. A name taken by another class is an error; the same class defined again
    (a module reloaded) replaces its earlier definition."""
    name = cls.name if name is None else name
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"a method must be a subclass of fastdit.methods.Method, got {cls!r}")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"a method name starts with a letter or digit and holds only letters, digits, '.', "
            f"'_' and '-', got name={name!r} for {cls.__qualname__}"
        )
    taken = _methods.get(name)
    if taken is not None and not same_class(taken, cls):
        raise ValueError(
            f"method name {name!r} is taken by {taken.__module__}.{taken.__qualname__}; give "
            f"{cls.__module__}.{cls.__qualname__} another name"
        )
    _methods[name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove ``name`` from the registry (tests, interactive redefinition)."""
    if name not in _methods:
        raise KeyError(f"no method is registered as {name!r}")
    del _methods[name]


def _register_plugin(loaded: object, name: str) -> None:
    # An entry point names a Method subclass (registered here under the entry point's name unless
    # its definition registered it) or a module whose subclasses registered themselves.
    if isinstance(loaded, type) and loaded not in _methods.values():
        register(loaded, name)


def available() -> dict[str, type[Method]]:
    """Registered methods, name -> class, in registration order (fastdit's own first)."""
    load_entry_points(ENTRY_POINT_GROUP, _register_plugin, "method")
    return dict(_methods)


def get(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    methods = available()
    if name not in methods:
        raise MethodOptionError(f"unknown method {name!r}; valid methods: {', '.join(methods)}")
    return methods[name]


def create(
    name: str,
    options: dict[str, Any] | None = None,
    preset: str | None = None,
    *,
    method_flag: str = "method",
    option_flag: str = "option",
) -> Method:
    """The method registered as ``name``, built from ``options`` (or ``preset`` with ``options``
    overriding it).

    Raises :class:`MethodOptionError` for an unknown method, option or preset or a missing
    required option, naming the valid ones; ``method_flag``/``option_flag`` say how messages name
    the method and its options (the command line passes its flags). What the method's own
    constructor raises for a bad value (``ValueError``, ``TypeError``, ``OSError`` for a plan file)
    passes through.
    """
    options = dict(options or {})
    cls = get(name)
    if preset is not None and not cls.presets():
        with_presets = [n for n, c in available().items() if c.presets()]
        raise MethodOptionError(
            f"{method_flag} {name} has no presets, got preset {preset!r} (methods with presets: "
            f"{', '.join(with_presets) or 'none'})"
        )
    names, required = cls.options()
    unknown = [key for key in options if key not in names]
    if unknown:
        raise MethodOptionError(
            f"unknown option {unknown[0]!r} for {method_flag} {name}; valid options: "
            f"{', '.join(names) if names else '(none)'}"
        )
    if preset is not None:
        if preset not in cls.presets():
            raise MethodOptionError(
                f"unknown {name} preset {preset!r}; valid presets: {', '.join(cls.presets())}"
            )
        return cls.preset(preset, **options)
    missing = [option for option in required if option not in options]
    if missing:
        raise MethodOptionError(
            f"{method_flag} {name} requires {option_flag} "
            + " ".join(f"{option}=..." for option in missing)
            + (" (e.g. window=3,5,5)" if "window" in missing else "")
        )
    return cls(**options)


def as_method(method: Method | str, **options) -> Method:
    """``method`` itself, or the registered method named ``method`` built with ``options``."""
    if isinstance(method, str):
        return create(method, options)
    if options:
        raise TypeError(
            f"options {sorted(options)} are for a method given by name; {type(method).__name__} is "
            "already built"
        )
    if isinstance(method, Method):
        return method
    if isinstance(method, type) and issubclass(method, Method):
        raise TypeError(
            f"got the class {method.__name__}: call it, {method.__name__}(...), not the class itself, "
            "with its options"
        )
    raise TypeError(
        "a method must be a fastdit.methods.Method (subclass it and implement plan(layout, device)) "
        f"or a registered name ({', '.join(available())}), got {type(method).__name__} {method!r}"
    )
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
        return device_key(device)

    @classmethod
    def canonical(cls, key: Hashable) -> Hashable:
        if isinstance(key, torch.device):
            return device_key(key)
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
