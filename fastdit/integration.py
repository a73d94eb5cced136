"""Installing fastdit on diffusers models: ``apply``, ``attach``, ``remove``, and the shared state.

Architecture line: ``layout`` -> ``methods/<name>.py`` -> ``kernels/``; ``pipelines/<model>.py``
adapts one diffusers model family to it, and this module installs those adapters.

Nothing is patched. fastdit installs

* attention processors (``transformer.set_attn_processor``), one instance shared by every
  attention module; it computes self-attention sparsely and hands every other call
  (cross-attention, image context) to the stock processor, untouched;
* one stateful diffusers ``ModelHook`` per transformer or UNet (``HookRegistry``) that reads,
  before each forward, the latent grid (from ``hidden_states``/``sample``) and the pipeline-level
  denoising step (from the pipeline's ``cache_context``, which diffusers >= 0.42 Wan/HunyuanVideo
  pipelines fill with ``step_index`` and ``num_inference_steps``; without it, as in the Stable
  Diffusion pipelines, from the timestep value, one host read per forward, and the step count from
  the pipeline scheduler's ``num_inference_steps``);
* the further ``ModelHook`` objects a model family's adapter asks for: for methods that reorder
  tokens (GNA), Wan's hooks on its blocks that permute the sequence and RoPE once per forward and
  restore the order; for UNets, a hook on each ``Transformer2DModel`` that records the ``H x W``
  grid its self-attention layers see (one per resolution).

Under diffusers' context parallelism (``enable_parallelism``, before or after ``apply``) the hook
also reads the transformer's parallel config before each forward (``state.parallel``), so the
processors all-to-all into Ulysses head shards (:mod:`fastdit.parallel`); configurations fastdit
cannot run exactly raise at ``apply`` or, when parallelism comes later, at the first forward.

The adapters are the :class:`~fastdit.pipelines.ModelAdapter` subclasses registered for the
model's class (:func:`supported_models` lists them). All of it is recorded in a
:class:`FastditHandle`; ``handle.remove()`` (or ``fastdit.remove``) restores the original
processor objects and removes every hook (all diffusers ``ModelHook`` objects, one removal path).
``apply(..., cache=config)`` also enables a diffusers step cache after fastdit's hooks and
disables it first on removal (:mod:`fastdit.compose` documents the order and what a skipped step
means for each method).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch

from .hooks import HookSet, has_hook
from .layout import LatentGrid, SequenceLayout
from .methods.base import Method, MethodPlan, as_method
from .parallel import check_model as check_parallel, context_parallel_config, ulysses_for
from .pipelines.base import ModelAdapter, adapter_for, adapters, denoising_models
from .schedule import Schedule

logger = logging.getLogger("fastdit")

__all__ = [
    "DenoisingState",
    "FastditHandle",
    "apply",
    "attach",
    "denoising_models",
    "remove",
    "supported_models",
]

HOOK_NAME = "fastdit"


@dataclass
class DenoisingState:
    """What processors need and cannot see: latent grid, denoising step, CFG context, layer.

    One state serves every transformer of one ``apply`` (Wan2.2's two experts share the step
    counter). Reset by itself when a new generation starts (the step index goes back, or without a
    pipeline loop the timestep goes up).
    """

    method: Method | None
    schedule: Schedule | None
    grid: LatentGrid | None = None
    layout: SequenceLayout | None = None
    step: int | None = None
    num_steps: int | None = None
    context: str | None = None
    generation: int = 0
    active_plan: MethodPlan | None = None
    permuted: bool = False
    layer_index: dict[int, int] = field(default_factory=dict)  # id(attention module) -> block
    transformer_index: dict[int, int] = field(default_factory=dict)  # id(attention module) -> model
    num_layers: dict[int, int] = field(default_factory=dict)  # id(attention module) -> blocks
    # id(attention module) -> its own sequence when layers differ (UNet resolutions; set per forward)
    layer_layouts: dict[int, SequenceLayout] = field(default_factory=dict)
    # id(attention module) -> downsampling relative to the model's highest-resolution self-attention
    layer_downsample: dict[int, int] = field(default_factory=dict)
    # (layer, step) -> density as recorded: a float, or a 0-d device tensor read only when
    # ``densities`` is (a per-call method's density costs no host sync inside the step).
    _density_records: dict[tuple[int, int | None], float | torch.Tensor] = field(default_factory=dict)
    runtime: object | None = None  # the method's per-generation state (methods that plan per call)
    pipeline: weakref.ref | None = None  # the pipeline installed on, for its scheduler's step count
    repeated_timestep_is_new_generation: bool = False  # set by adapters whose CFG is batched
    quantize: str | None = None  # kernel quantization of the sparse attention (apply's quantize=)
    # The transformer's Ulysses group (fastdit.parallel.Ulysses) for this forward; None in one process.
    parallel: object | None = None
    _last_timestep: float | None = None
    _contexts_at_step: set = field(default_factory=set)

    def begin_forward(self, layout: SequenceLayout, device: torch.device, cache_context, timestep) -> None:
        if cache_context is not None and cache_context.step_index is not None:
            step = int(cache_context.step_index)
            if self.step is None or step < self.step:
                self._start_generation()
            self.step = step
            self.num_steps = cache_context.num_inference_steps
            self.context = cache_context.name
        else:
            # Outside a pipeline loop: a new step is a new timestep value; CFG passes share one.
            # The maximum, not the first entry: Wan2.2 TI2V passes per-token timesteps whose
            # first-frame (conditioning) tokens are 0 at every step.
            value = float(timestep.max()) if isinstance(timestep, torch.Tensor) else float(timestep)
            context = getattr(cache_context, "name", None)
            # Models whose pipelines batch the CFG passes into one forward and never reset
            # stateful hooks (Stable Diffusion's UNet): the same timestep again in a context
            # already seen at this step is a new generation (a repeated 1-step turbo call).
            repeated = (
                self.repeated_timestep_is_new_generation
                and value == self._last_timestep
                and context in self._contexts_at_step
            )
            if self._last_timestep is None or value > self._last_timestep or repeated:
                self._start_generation()
                self.step = 0
            elif value < self._last_timestep:
                self.step += 1
                self._contexts_at_step.clear()
            self._last_timestep = value
            self._contexts_at_step.add(context)
            self.context = context
            self.num_steps = self._scheduler_num_steps()
        if self.layout is not None and layout != self.layout:
            self._new_runtime()  # a shape change invalidates whatever the method learnt
        self.layout, self.grid = layout, layout.grid
        # Static plans are cached by the method; this is a dictionary look-up after the first call.
        self.active_plan = self.method.plan(self.layout, device)

    def _scheduler_num_steps(self) -> int | None:
        """Steps of the running generation from the pipeline's scheduler (set by its
        ``set_timesteps`` before the loop), for pipelines that set no ``cache_context``."""
        pipe = self.pipeline() if self.pipeline is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        steps = getattr(scheduler, "num_inference_steps", None)
        if not isinstance(steps, int) or steps <= 0:
            return None
        # img2img (strength < 1) starts the loop at the scheduler's begin index.
        begin = getattr(scheduler, "begin_index", None) or 0
        order = getattr(scheduler, "order", 1) or 1
        return max(1, steps - begin // order)

    def _start_generation(self) -> None:
        self.generation += 1
        self.num_steps, self._last_timestep = None, None
        self._contexts_at_step.clear()
        self._density_records.clear()
        self._new_runtime()

    def _new_runtime(self) -> None:
        self.runtime = self.method.new_runtime() if self.method is not None else None

    def record_density(self, layer: int, density: float | torch.Tensor) -> None:
        """The density ``layer`` ran at in the current step (a float or a 0-d tensor)."""
        self._density_records[(layer, self.step)] = density

    @property
    def densities(self) -> dict[tuple[int, int | None], float]:
        """(layer, step) -> attention density of the latest generation, as floats."""
        return {key: float(value) for key, value in self._density_records.items()}

    def reset(self) -> None:
        """The next forward starts a new generation (diffusers resets stateful hooks after each
        pipeline call); what the finished generation recorded stays readable until then."""
        self.step, self._last_timestep = None, None
        self._contexts_at_step.clear()

    def summary(self, densities: dict | None = None) -> str:
        """Per-layer attention density of the latest generation ('dense' for dense steps);
        ``densities`` overrides this state's (e.g. averaged over Ulysses ranks)."""
        densities = self.densities if densities is None else densities
        if not densities:
            return "fastdit: no attention call recorded yet"
        lines = [f"fastdit {type(self.method).__name__}: grid {self.grid.shape if self.grid else '?'}"]
        by_layer: dict[int, list[float]] = {}
        for (layer, _step), density in sorted(densities.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
            by_layer.setdefault(layer, []).append(density)
        for layer, values in sorted(by_layer.items()):
            mean = sum(values) / len(values)
            lines.append(f"  layer {layer:3d}: mean density {mean:.3f} over {len(values)} step(s)")
        overall = sum(sum(v) for v in by_layer.values()) / sum(len(v) for v in by_layer.values())
        lines.append(f"  overall mean density {overall:.3f}")
        return "\n".join(lines)


def _transformer_hook(state: DenoisingState, adapter: ModelAdapter):
    """The stateful ``ModelHook`` that reads grid and step before each transformer forward (it
    receives the pipeline's ``cache_context``)."""
    from diffusers.hooks.hooks import BaseState, ModelHook, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs) -> None:
            pass

    class FastditTransformerHook(ModelHook):
        _is_stateful = True

        def __init__(self) -> None:
            super().__init__()
            self.cache_context = StateManager(_NoState)

        def pre_forward(self, module, *args, **kwargs):
            # Read every forward: enable_parallelism may come after fastdit was installed.
            state.parallel = ulysses_for(module, adapter, state.method, state.parallel)
            hidden_states, timestep = adapter.forward_inputs(args, kwargs)
            layout = adapter.sequence_layout(module, args, kwargs)
            state.begin_forward(layout, hidden_states.device, self.cache_context._context, timestep)
            return args, kwargs

        def reset_state(self, module):
            state.reset()
            return module

    return FastditTransformerHook()


def supported_models() -> list[str]:
    """The diffusers model classes a registered :class:`~fastdit.pipelines.ModelAdapter` takes."""
    return sorted(adapters())


@dataclass
class FastditHandle:
    """What one ``apply``/``attach`` installed; ``remove()`` undoes it exactly (so does leaving a
    ``with fastdit.apply(...):`` block)."""

    state: DenoisingState
    _processors: list[tuple[torch.nn.Module, dict]] = field(default_factory=list)
    _hooks: HookSet = field(default_factory=HookSet)
    _models: list[torch.nn.Module] = field(default_factory=list)
    _bound: list = field(default_factory=list)
    _cache: object | None = None  # a fastdit.compose.CacheHandle (apply's cache=)
    removed: bool = False

    def summary(self) -> str:
        return self.state.summary()

    def __enter__(self) -> FastditHandle:
        return self

    def __exit__(self, *exc_info) -> None:
        remove(self)

    def remove(self) -> None:
        if self.removed:
            return
        if self._cache is not None:  # installed last, removed first
            self._cache.remove()
        self._hooks.remove()
        for model, saved in self._processors:
            adapter_for(model).set_attn_processor(model, dict(saved))  # diffusers pops the dict's entries
            _restore_parallel_config(model, saved.values())
        for processor in self._bound:
            processor.state = None
        self.removed = True


def _restore_parallel_config(model: torch.nn.Module, processors) -> None:
    """Give restored processors the model's context-parallel config, as ``enable_parallelism``
    would have if they had been installed when it ran (otherwise they attend within a shard)."""
    if context_parallel_config(model) is None:
        return
    for processor in processors:
        if hasattr(processor, "_parallel_config") and processor._parallel_config is None:
            processor._parallel_config = model._parallel_config


def _install_hooks(
    model: torch.nn.Module, adapter: ModelAdapter, state: DenoisingState, handle: FastditHandle
) -> None:
    if has_hook(model, HOOK_NAME):
        raise RuntimeError(
            f"fastdit is already installed on this {type(model).__name__}; call remove() on its "
            "handle (or fastdit.remove(pipe)) before installing again"
        )
    handle._hooks.add(model, HOOK_NAME, _transformer_hook(state, adapter))
    for module, name, hook in adapter.model_hooks(model, state):
        handle._hooks.add(module, name, hook)
    handle._hooks.refresh_caches()
    transformer = len(handle._models)  # this model's position in the pipeline
    handle._models.append(model)
    if adapter.cfg_batched_without_reset:
        state.repeated_timestep_is_new_generation = True
    attentions = adapter.self_attention_modules(model)
    factors = adapter.self_attention_downsampling(model)  # UNets attend at several resolutions
    for layer, (attention, factor) in enumerate(zip(attentions, factors, strict=True)):
        state.layer_index[id(attention)] = layer
        state.transformer_index[id(attention)] = transformer
        state.num_layers[id(attention)] = len(attentions)
        state.layer_downsample[id(attention)] = factor


def _pipeline_reference(pipe_or_model) -> weakref.ref | None:
    """A weak reference to the pipeline (not to a bare model): the state reads its scheduler."""
    return None if isinstance(pipe_or_model, torch.nn.Module) else weakref.ref(pipe_or_model)


def _self_attention_processor_names(model: torch.nn.Module, adapter: ModelAdapter) -> set[str]:
    targets = {id(module) for module in adapter.self_attention_modules(model)}
    return {f"{name}.processor" for name, module in model.named_modules() if id(module) in targets}


def apply(
    pipe_or_model, method: Method | str, schedule: Schedule | None = None, *, cache=None,
    quantize: str | None = None, **options,
) -> FastditHandle:
    """Install ``method`` on every transformer (or the UNet) of a pipeline, or on one model.

    ``method`` is a :class:`~fastdit.methods.Method` or the name of a registered one, built with
    ``options`` (``fastdit.apply(pipe, "gna", window=(3, 5, 5))``). ``schedule`` defaults to the
    method's own (Radial presets carry one), else all steps sparse. ``cache``: a diffusers
    step-cache config (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig``,
    ``FasterCacheConfig``, ``PyramidAttentionBroadcastConfig``), enabled on every transformer
    after fastdit's hooks (:mod:`fastdit.compose`). ``quantize="int8"`` runs the sparse attention
    on the INT8 kernel (bf16/fp16 pipelines; Dense, Radial, GNA, VMoBA, AdaSpa: static methods and
    those declaring ``accepts_quantize``). Returns a handle; ``handle.remove()`` or
    ``fastdit.remove(handle)`` restores the pipeline, the cache included.
    """
    from . import compose

    if schedule is not None and not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a fastdit.Schedule or None, got {type(schedule).__name__} {schedule!r}")
    method = as_method(method, **options)
    models = denoising_models(pipe_or_model)
    model_adapters = [adapter_for(model) for model in models]  # validate all before changing any
    for adapter in model_adapters:  # a method that does not apply to a family says why
        adapter.check_method(method)
    compose.check_quantize(method, quantize, models, model_adapters)
    for model, adapter in zip(models, model_adapters):
        check_parallel(model, adapter, method)
    # Methods with calibrated data (PARO) refuse other models.
    layers = [len(adapter.self_attention_modules(model)) for model, adapter in zip(models, model_adapters)]
    method.check_models(models, layers)
    schedule = schedule if schedule is not None else Schedule.from_method(method)
    state = DenoisingState(method, schedule, pipeline=_pipeline_reference(pipe_or_model))
    state.quantize = quantize
    handle = FastditHandle(state)
    try:
        for model, adapter in zip(models, model_adapters):
            saved = adapter.attn_processors(model)
            processor = adapter.processor_class(method, schedule)
            processor.state = state
            handle._bound.append(processor)
            # Only self-attention changes hands; every other processor (cross-attention, or a
            # custom one the user installed there) stays the object it was.
            targets = _self_attention_processor_names(model, adapter)
            adapter.set_attn_processor(
                model, {name: processor if name in targets else saved[name] for name in saved}
            )
            handle._processors.append((model, saved))
            _install_hooks(model, adapter, state, handle)
        if cache is not None:
            handle._cache = compose.enable_cache(pipe_or_model, cache, models)
    except Exception:
        handle.remove()
        raise
    _handles[pipe_or_model] = handle
    return handle


def attach(pipe_or_model) -> FastditHandle:
    """For processors installed the diffusers way (``set_attn_processor(WanSparseAttnProcessor(...))``):
    install the hooks that tell them the latent grid, layer and denoising step."""
    models = denoising_models(pipe_or_model)
    handle = FastditHandle(DenoisingState(None, None, pipeline=_pipeline_reference(pipe_or_model)))
    try:
        _attach_models(models, handle)
    except Exception:
        handle.remove()  # a later model failed: undo what the earlier ones got
        raise
    _handles[pipe_or_model] = handle
    return handle


def _attach_models(models: list[torch.nn.Module], handle: FastditHandle) -> None:
    for model in models:
        adapter = adapter_for(model)
        processors = {
            id(p): p for p in adapter.attn_processors(model).values() if isinstance(p, adapter.processor_class)
        }
        if not processors:
            raise ValueError(
                f"no fastdit processor is installed on this {type(model).__name__}: call "
                f"set_attn_processor({adapter.processor_class.__name__}(method)) first, or use "
                "fastdit.apply(pipe, method)"
            )
        first = next(iter(processors.values()))
        methods = {repr(p.method) for p in processors.values()}
        if handle.state.method is not None:
            methods.add(repr(handle.state.method))
        if len(methods) > 1:
            raise ValueError(
                "fastdit.attach needs one method per pipeline (the processors share the latent "
                f"grid, step and plan), found {sorted(methods)}; use fastdit.apply for one method"
            )
        if handle.state.method is None:
            handle.state.method, handle.state.schedule = first.method, first.schedule
        check_parallel(model, adapter, handle.state.method)
        for processor in processors.values():
            processor.state = handle.state
            handle._bound.append(processor)
        _install_hooks(model, adapter, handle.state, handle)


# Which handle was installed on which pipeline or model, for fastdit.remove(pipe).
_handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def remove(handle_or_pipe) -> None:
    """Undo ``apply``/``attach``: pass the handle, or the pipeline/model it was applied to."""
    if isinstance(handle_or_pipe, FastditHandle):
        handle = handle_or_pipe
    else:
        handle = _handles.get(handle_or_pipe)
        if handle is None:
            raise ValueError(f"fastdit is not installed on this {type(handle_or_pipe).__name__}")
    handle.remove()
    for key, value in list(_handles.items()):
        if value is handle:
            del _handles[key]
