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
"""

from __future__ import annotations

from typing import ClassVar

import torch

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
    "register_adapter",
]

ENTRY_POINT_GROUP = "fastdit.pipelines"


class FastditAttnProcessor:
    """Base of the per-model processors in ``fastdit.pipelines``."""

    _attention_backend = None
    _parallel_config = None

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

    def _call_stock(self, stock, *args):
        """Run a stock diffusers processor with this processor's backend and parallel config."""
        stock._attention_backend = self._attention_backend
        stock._parallel_config = self._parallel_config
        return stock(*args)

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
    ) -> torch.Tensor:
        """Sparse self-attention of one layer, Q/K/V ``[B, S, H, D]`` in the plan's token order,
        computed by the method's ``attend`` (static methods: their plan on the kernel). ``plan``
        is the forward's active plan unless the layer has its own sequence (UNet resolutions).
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
    """

    model_classes: ClassVar[tuple[str, ...]] = ()
    processor_class: ClassVar[type[FastditAttnProcessor]]
    cfg_batched_without_reset: ClassVar[bool] = False

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
