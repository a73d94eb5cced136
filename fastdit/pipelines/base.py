"""What every model family shares: the adapter interface (:class:`ModelAdapter`, registered by
subclassing) and the attention processor base (:class:`FastditAttnProcessor`).

A model family is one module here: its processor (a :class:`FastditAttnProcessor` subclass that
computes the family's Q/K/V, norms and RoPE and hands self-attention to the method) and a
:class:`ModelAdapter` subclass that says where the self-attention modules are, how the latent grid
and the denoising step are read from a transformer forward, and which extra diffusers hooks the
family needs. Defining the subclass registers it for the diffusers model classes it names::

    class MyDiTAdapter(ModelAdapter):
        model_classes = ("MyDiTTransformer3DModel",)
        processor_class = MyDiTSparseAttnProcessor

        def self_attention_modules(self, model): return [block.attn1 for block in model.blocks]
        def forward_inputs(self, args, kwargs): return kwargs["hidden_states"], kwargs["timestep"]
        def sequence_layout(self, model, args, kwargs): ...

A module written as functions (``processor_class``, ``self_attention_modules``, ``forward_inputs``,
``sequence_layout``, optional ``self_attention_downsampling``) converts by naming them in such a
class body with ``staticmethod(...)``, as ``WanAdapter`` in wan.py does. fastdit's own families are
imported by ``fastdit/pipelines/__init__.py`` (add a line there); a third-party package declares
its module or class in the entry-point group ``fastdit.pipelines``.

A processor holds a method (which plans the block sparsity), its dense schedule, and the
:class:`~fastdit.integration.DenoisingState` that fastdit's hooks fill in before each transformer
forward (latent grid, denoising step, layer indices, the active plan). It declares
``_attention_backend`` and ``_parallel_config`` like diffusers' own processors and passes them on
to the stock processors it delegates to.

Under diffusers' Ulysses context parallelism the parallel config that counts is the
transformer's (``transformer._parallel_config``, read by fastdit's hook before every forward into
``state.parallel``), not the processor's attribute: ``enable_parallelism`` sets the attribute only
on the processors installed at that time, so a processor installed later would otherwise attend
within its shard. See :mod:`fastdit.parallel`.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..kernels import dense_attention, fastest_dense_backend
from ..layout import SequenceLayout
from ..methods.base import AttentionCall, Method, MethodPlan, as_method
from ..plugins import load_entry_points, same_class
from ..schedule import Schedule

__all__ = [
    "ENTRY_POINT_GROUP",
    "FastditAttnProcessor",
    "ModelAdapter",
    "adapter_for",
    "adapters",
    "denoising_models",
    "register_adapter",
]

ENTRY_POINT_GROUP = "fastdit.pipelines"


class FastditAttnProcessor:
    """Base of the per-model processors in ``fastdit.pipelines``."""

    _attention_backend = None
    _parallel_config = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # Under torch.compile (regional: ``compile_repeated_blocks``, ``fastdit generate
        # --compile``) a processor call runs eagerly between the block's compiled graphs: its
        # bookkeeping (step, layer, schedule, density records, per-call plans) would otherwise be
        # guarded per step and per layer and recompile until dynamo's recompile limit, after
        # which the frame runs eagerly anyway, with every timing before it paying compilations.
        if "__call__" in cls.__dict__:
            cls.__call__ = torch.compiler.disable(cls.__call__)

    def __init__(self, method: Method | str, schedule: Schedule | None = None) -> None:
        self.method = as_method(method)
        self.schedule = schedule if schedule is not None else Schedule.from_method(self.method)
        self.state = None  # a fastdit.integration.DenoisingState, bound by apply/attach

    def _unbound_error(self) -> RuntimeError:
        name = type(self).__name__
        return RuntimeError(
            f"{name} needs the latent grid, layer index and denoising step, which fastdit learns "
            f"through hooks on the transformer: after set_attn_processor({name}(...)) call "
            "fastdit.attach(pipe) once, or install with fastdit.apply(pipe, method)"
        )

    @property
    def _ulysses(self):
        """The transformer's :class:`~fastdit.parallel.Ulysses` group for this forward, or ``None``."""
        return self.state.parallel if self.state is not None else None

    def _current_parallel_config(self):
        """The transformer's diffusers ``ParallelConfig`` (context parallel), else ``None``."""
        ulysses = self._ulysses
        return ulysses.config if ulysses is not None else None

    def _call_stock(self, stock, *args):
        """Run a stock diffusers processor with this processor's backend and the transformer's
        parallel config."""
        stock._attention_backend = self._attention_backend
        stock._parallel_config = self._current_parallel_config()
        return stock(*args)

    def _dense_attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Dense self-attention of a dense step or layer, ``[B, S, H, D]``.

        FA4's dense kernel when fastdit can run it and diffusers has no backend or context
        parallelism selected for this processor (it beats SDPA's cuDNN and FA2 kernels on
        Hopper); otherwise diffusers' own dispatch, as the stock processor would do.
        """
        parallel_config = self._current_parallel_config()
        if (
            self._attention_backend is None
            and parallel_config is None
            and fastest_dense_backend(query.device, query.dtype, query.shape[-1]) == "flash4"
        ):
            return dense_attention(query, key, value)
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        return dispatch_attention_fn(
            query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=parallel_config,
        )

    def _layer_runs_sparse(self, attn, layout: SequenceLayout | None = None) -> tuple[int, bool]:
        """(layer index, whether this layer runs the method at the current step).

        The method's schedule decides (``Dense``, which does not follow it, always runs), then
        the method's ``runs_on(layout, downsample)`` can still send a call to the stock path:
        ``layout`` is this layer's sequence (the forward's by default), ``downsample`` its spatial
        downsampling relative to the model's highest-resolution self-attention (UNets; 1 for
        DiTs). A layer that runs dense is recorded at density 1.
        """
        state, method = self.state, self.method
        layer = state.layer_index[id(attn)]
        sparse = not (
            method.follows_schedule
            and self.schedule.is_dense(state.step, state.num_steps, layer, state.num_layers[id(attn)])
        )
        if sparse:
            layout = layout if layout is not None else state.active_plan.layout
            sparse = method.runs_on(layout, state.layer_downsample.get(id(attn), 1))
        if not sparse:
            state.record_density(layer, 1.0)
        return layer, sparse

    def _attend(
        self,
        attn,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding: torch.Tensor | None = None,
        plan: MethodPlan | None = None,
        heads=None,
    ) -> torch.Tensor:
        """Sparse self-attention of one layer, Q/K/V ``[B, S, H, D]`` in the plan's token order,
        computed by the method's ``attend`` (static methods: their plan on the kernel). ``plan``
        is the forward's active plan unless the layer has its own sequence (UNet resolutions).
        ``heads``: under Ulysses, the :class:`~fastdit.parallel.HeadShard` Q/K/V hold (per-head
        plans are sliced to it; per-call methods get it as ``call.heads``).
        """
        state = self.state
        call = AttentionCall(
            plan=plan if plan is not None else state.active_plan,
            layer=layer,
            num_layers=state.num_layers[id(attn)],
            transformer=state.transformer_index.get(id(attn), 0),
            step=state.step,
            num_steps=state.num_steps,
            context=state.context,
            generation=state.generation,
            runtime=state.runtime,
            key_padding=key_padding,
            quantize=state.quantize,
            heads=heads,
        )
        out, density = self.method.attend(query, key, value, call)
        state.record_density(layer, density)  # a device tensor stays one: no sync here
        return out


# --------------------------------------------------------------------------- model adapters
class ModelAdapter:
    """How one diffusers model family maps onto fastdit's layout -> method -> kernel line.

    Subclasses set ``model_classes`` (the diffusers class names they adapt; defining the subclass
    registers it for them) and ``processor_class``, and implement the three required methods.
    Adapters hold no state: one instance serves every model of its family.

    Class attributes:
        model_classes: names of the diffusers model classes (``type(model).__name__``).
        processor_class: the family's :class:`FastditAttnProcessor` subclass.
        cfg_batched_without_reset: the family's pipelines batch the CFG passes into one forward
            and never reset stateful hooks (Stable Diffusion's UNet), so a repeated timestep in a
            context already seen is a new generation.
        family: the family's name as ``fastdit info`` lists it (default: the model class names).
        supports_context_parallel: fastdit's processor runs this family exactly under diffusers'
            Ulysses context parallelism (:mod:`fastdit.parallel`); ``False`` refuses it.
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    processor_class: ClassVar[type[FastditAttnProcessor]]
    cfg_batched_without_reset: ClassVar[bool] = False
    family: ClassVar[str | None] = None
    supports_context_parallel: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("model_classes"):
            register_adapter(cls)

    def self_attention_modules(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The attention modules whose self-attention fastdit computes, in layer order."""
        raise NotImplementedError(f"{type(self).__name__} must implement self_attention_modules(model)")

    def forward_inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden_states, timestep)`` of a model forward called with ``args``/``kwargs``."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward_inputs(args, kwargs)")

    def sequence_layout(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> SequenceLayout:
        """The self-attention sequence of this forward: latent grid and text segment."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement sequence_layout(model, args, kwargs)"
        )

    def self_attention_downsampling(self, model: torch.nn.Module) -> list[int]:
        """Per self-attention layer, its spatial downsampling relative to the model's
        highest-resolution self-attention (UNets: 1, 2, 4, ...); all 1 by default (DiTs)."""
        return [1] * len(self.self_attention_modules(model))

    def model_hooks(self, model: torch.nn.Module, state) -> list[tuple[torch.nn.Module, str, object]]:
        """Further diffusers ``ModelHook`` objects the family needs, as ``(module, hook name, hook)``:
        fastdit registers them with the transformer hook and removes them with it (Wan's
        once-per-forward token permutation, the UNet's per-resolution grids). None by default.
        ``state`` is the :class:`~fastdit.integration.DenoisingState` they read and fill."""
        return []

    # ------------------------------------------------------------------ optional checks
    def family_name(self) -> str:
        """:attr:`family`, or the model class names when the adapter sets none."""
        return self.family or " / ".join(self.model_classes)

    def check_method(self, method: Method) -> None:
        """Raise ``ValueError`` for a method that does not apply to this family (Radial's frame
        rules on one-frame image models); called by ``fastdit.apply``. Accepts any by default."""

    def check_sizes(self, pipe, height: int | None, width: int | None, num_frames: int | None) -> None:
        """Raise ``ValueError`` for output sizes the family's pipelines do not take (the command
        line asks before generating); ``None`` is a size the pipeline chooses. Accepts any by default."""

    def check_context_parallel(self, model: torch.nn.Module, cp_config) -> None:
        """Raise ``ValueError`` for a model configuration the family's context-parallel support
        does not cover exactly (asked only when :attr:`supports_context_parallel`)."""

    def context_parallel_plan(self, model: torch.nn.Module) -> dict | None:
        """A diffusers ``_cp_plan`` fastdit passes to ``enable_parallelism`` for models whose
        class ships none (HunyuanVideo); ``None`` keeps the model's own."""
        return None

    # ------------------------------------------------------------------ processors
    def attn_processors(self, model: torch.nn.Module) -> dict:
        """``{"<module>.processor": processor}`` of every attention module: diffusers'
        ``attn_processors`` by default (models without ``AttentionMixin``, Mochi, override)."""
        return dict(model.attn_processors)

    def set_attn_processor(self, model: torch.nn.Module, processors: dict) -> None:
        """Set the processors :meth:`attn_processors` names (diffusers' ``set_attn_processor``
        by default; it consumes the dict it gets)."""
        model.set_attn_processor(processors)


_adapters: dict[str, type[ModelAdapter]] = {}


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register ``cls`` for its ``model_classes``; subclassing :class:`ModelAdapter` calls this.
    A model class another adapter takes is an error; the same adapter defined again replaces it."""
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise TypeError(f"an adapter must be a subclass of fastdit.pipelines.ModelAdapter, got {cls!r}")
    if not isinstance(getattr(cls, "processor_class", None), type):
        raise TypeError(f"{cls.__qualname__} must set processor_class to its processor's class")
    names = cls.model_classes
    if isinstance(names, str) or not all(isinstance(name, str) and name for name in names):
        raise TypeError(f"{cls.__qualname__}.model_classes must be a tuple of class names, got {names!r}")
    for name in names:
        taken = _adapters.get(name)
        if taken is not None and not same_class(taken, cls):
            raise ValueError(
                f"{name} is adapted by {taken.__module__}.{taken.__qualname__} already; "
                f"{cls.__module__}.{cls.__qualname__} cannot take it too"
            )
    for name in names:
        _adapters[name] = cls
    return cls


def _register_plugin(loaded: object, name: str) -> None:
    # An entry point names a ModelAdapter subclass or a module whose subclasses registered themselves.
    if isinstance(loaded, type) and loaded not in _adapters.values():
        register_adapter(loaded)


def adapters() -> dict[str, type[ModelAdapter]]:
    """Registered adapters: diffusers model class name -> adapter class."""
    load_entry_points(ENTRY_POINT_GROUP, _register_plugin, "model adapter")
    return dict(_adapters)


def adapter_for(model: torch.nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s class; ``ValueError`` naming the supported classes otherwise."""
    registered = adapters()
    name = type(model).__name__
    if name not in registered:
        raise ValueError(
            f"fastdit does not support {name} yet; supported transformer classes: {sorted(registered)}"
        )
    return registered[name]()


def denoising_models(pipe_or_model) -> list[torch.nn.Module]:
    """The models fastdit installs on: the pipeline's ``transformer`` (and ``transformer_2``) or
    ``unet``, or the model itself."""
    if isinstance(pipe_or_model, torch.nn.Module):
        return [pipe_or_model]
    found = [getattr(pipe_or_model, name, None) for name in ("transformer", "transformer_2", "unet")]
    found = [model for model in found if model is not None]
    if not found:
        raise ValueError(
            f"{type(pipe_or_model).__name__} has no transformer or unet: pass a diffusers pipeline "
            f"with a `transformer` (and optional `transformer_2`) or a `unet`, or the model itself"
        )
    return found
