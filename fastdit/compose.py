"""Composing fastdit with diffusers' step caches, ``torch.compile`` and the quantized kernel.

Sparse attention cannot pass the attention share of a forward; what users add on top is a step
cache (diffusers' ``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``, ``MagCacheConfig``,
``FasterCacheConfig``, ``PyramidAttentionBroadcastConfig``, installed by the model's
``enable_cache``), regional ``torch.compile`` of the transformer blocks, and the INT8 kernel. This
module holds what fastdit needs for that:

* ``fastdit.apply(pipe, method, cache=config, quantize="int8")`` installs, in this order:

  1. fastdit's attention processors, its transformer hook (latent grid, denoising step, CFG
     context) and, for permuting methods, its block hooks;
  2. the cache: ``enable_cache(config)`` on every transformer of the pipeline (a copy of
     ``config``: diffusers fills defaults into the object it is given). At the transformer level
     the cache's hooks are registered after fastdit's, so they wrap it: FasterCache's denoiser hook
     drops the unconditional half of a batched CFG call before fastdit's hook and the blocks see
     it. Every diffusers cache skips blocks or attention modules *inside* a forward and never the
     transformer forward itself, so fastdit's hook still runs on every forward and the step index
     it reads (the pipeline's ``cache_context``, or the timestep) stays the pipeline's.

  ``handle.remove()`` undoes it in reverse: ``disable_cache()`` first, then fastdit's hooks and
  processors. ``torch.compile`` comes last (``fastdit generate --compile`` compiles the blocks
  with diffusers' ``compile_repeated_blocks``; the transformer's own forward, where fastdit's
  hook and the caches' transformer-level hooks run, stays eager).
* :func:`enable_cache` installs a cache alone (the stock pipeline with a cache, as ``fastdit
  compare`` runs it), with the same handle semantics.
* :func:`parse_cache_spec` and :func:`build_cache_config` turn the command line's
  ``--cache NAME[:key=value,...]`` into a diffusers config, with errors that name the cache, the
  option and the value.
* :func:`check_quantize` validates ``quantize=`` against the method and the model's dtype.

What a skipped step or layer means for each method: the dense schedule counts the pipeline's step
index, so a skipped step is simply not computed (a dense warm-up step a cache skips stays skipped;
the next computed step is dense or sparse by its own index). VMoBA plans from Q and K on every
call it gets, with the layer's own partition kind, so skipped calls change nothing. AdaSpa's
search steps are the one place where a skip matters: a layer that misses one searches at its next
computed step (:mod:`fastdit.methods.adaspa`, "Search steps a step cache skipped").

Caches that the diffusers version in use keys by CFG context (``cache_context("cond")``):
FirstBlockCache, TaylorSeer and MagCache. Pyramid Attention Broadcast and FasterCache keep one
state per attention module in diffusers 0.42, so on pipelines that run the CFG passes as two
forwards (Wan, HunyuanVideo) their broadcast alternates between the passes.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
import types
import typing
import weakref
from dataclasses import dataclass, field

import torch

__all__ = [
    "CACHES",
    "CacheHandle",
    "build_cache_config",
    "cache_name",
    "check_quantize",
    "check_quantize_method",
    "describe_cache",
    "enable_cache",
    "parse_cache_spec",
]

# --cache NAME -> the diffusers config class (``diffusers.hooks``). The class names themselves are
# accepted too (case-insensitive).
CACHES = {
    "fbc": "FirstBlockCacheConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "magcache": "MagCacheConfig",
    "fastercache": "FasterCacheConfig",
    "pab": "PyramidAttentionBroadcastConfig",
}
QUANTIZED_MODEL_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- cache configs
def _config_classes() -> dict[str, type]:
    import diffusers.hooks as hooks

    return {name: getattr(hooks, class_name) for name, class_name in CACHES.items()}


def _resolve_name(name: str) -> str:
    key = name.strip().lower()
    for short, class_name in CACHES.items():
        if key in (short, class_name.lower()):
            return short
    raise ValueError(
        f"unknown cache {name!r}; valid caches: {', '.join(CACHES)} (diffusers' "
        f"{', '.join(CACHES.values())})"
    )


def cache_name(config) -> str:
    """The short name (``fbc``, ``taylorseer``, ...) of a diffusers cache config."""
    for short, cls in _config_classes().items():
        if isinstance(config, cls):
            return short
    raise ValueError(
        f"cache must be one of diffusers' {', '.join(CACHES.values())}, got "
        f"{type(config).__name__}"
    )


def _settable_fields(cls: type) -> dict[str, dataclasses.Field]:
    """Options a command line can set: init fields that are not private or callbacks."""
    fields = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_") or _is_callable_type(f.type):
            continue
        fields[f.name] = f
    return fields


def _is_callable_type(annotation) -> bool:
    text = repr(annotation)
    return "Callable" in text


def parse_cache_spec(text: str) -> tuple[str, dict]:
    """``"fbc:threshold=0.1"`` -> ``("fbc", {"threshold": 0.1})``.

    Options are comma separated ``key=value``; a comma item without ``=`` continues the previous
    value as a tuple (``pab:spatial_attention_timestep_skip_range=100,800``). Values are parsed
    as on the rest of the command line (ints, floats, bools, ``none``, strings).
    """
    from .values import parse_value

    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ValueError(f"--cache expects NAME[:key=value,...] (e.g. fbc:threshold=0.05), got {text!r}")
    name = _resolve_name(name)
    options: dict[str, list[str]] = {}
    current = None
    for item in rest.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if sep:
            key = key.strip().replace("-", "_")
            if not key or not value.strip():
                raise ValueError(f"--cache {text!r}: expected key=value, got {item!r}")
            if key in options:
                raise ValueError(f"--cache {text!r}: option {key!r} is given more than once")
            options[key] = [value]
            current = key
        elif current is None:
            raise ValueError(f"--cache {text!r}: expected key=value after '{name}:', got {item!r}")
        else:
            options[current].append(item)
    parsed = {}
    for key, values in options.items():
        items = tuple(parse_value(v) for v in values)
        parsed[key] = items[0] if len(items) == 1 else items
    return name, parsed


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _convert(cache: str, key: str, annotation, value):
    """``value`` (parsed from text) as the field's annotated type, or a ValueError naming both."""
    def bad(expected: str) -> ValueError:
        return ValueError(f"cache {cache}: option {key} must be {expected}, got {key}={value!r}")

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return _convert(cache, key, options[0], value)
            except ValueError as exc:
                if type(None) not in args:
                    raise
                raise ValueError(str(exc).replace(", got ", " or none, got ", 1)) from None
        for option in options:
            try:
                return _convert(cache, key, option, value)
            except ValueError:
                continue
        raise bad(" or ".join(_type_text(a) for a in args))
    if annotation is torch.Tensor:
        raise bad("a list")  # tensors come from a list of numbers (the List[float] branch)
    if annotation is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise bad("an int")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise bad("a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if annotation is torch.dtype:
        if not isinstance(value, str) or value.lower() not in _DTYPES:
            raise bad(f"one of {', '.join(_DTYPES)}")
        return _DTYPES[value.lower()]
    if origin in (tuple, list):
        items = value if isinstance(value, tuple) else (value,)
        if origin is tuple and args and args[-1] is not Ellipsis and len(items) != len(args):
            raise bad(f"{len(args)} comma-separated values")
        item_types = [args[0]] * len(items) if (not args or args[-1] is Ellipsis or origin is list) \
            else list(args)
        converted = [_convert(cache, key, t, v) for t, v in zip(item_types, items)] \
            if args else list(items)
        return tuple(converted) if origin is tuple else converted
    raise bad(_type_text(annotation))


def _type_text(annotation) -> str:
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", None) or repr(annotation)


def build_cache_config(name: str, options: dict | None = None, *, num_inference_steps: int | None = None):
    """The diffusers cache config ``name`` (see :data:`CACHES`) with ``options`` checked and
    converted to its fields' types. ``num_inference_steps`` fills MagCache's option of that name
    when it is not given (MagCache interpolates its ratios to the run's step count).

    The callbacks some configs take (PAB's and FasterCache's ``current_timestep_callback``) are
    not options: :func:`enable_cache` and ``fastdit.apply`` set the pipeline's
    ``current_timestep`` when they are missing.
    """
    name = _resolve_name(name)
    cls = _config_classes()[name]
    fields = _settable_fields(cls)
    options = dict(options or {})
    unknown = [key for key in options if key not in fields]
    if unknown:
        raise ValueError(
            f"unknown option {unknown[0]!r} for cache {name} ({cls.__name__}); valid options: "
            f"{', '.join(fields)}"
        )
    kwargs = {key: _convert(name, key, fields[key].type, value) for key, value in options.items()}
    if name == "magcache":
        if "num_inference_steps" not in kwargs and num_inference_steps is not None:
            kwargs["num_inference_steps"] = int(num_inference_steps)
        if kwargs.get("mag_ratios") is None and not kwargs.get("calibrate", False):
            raise ValueError(
                "cache magcache needs mag_ratios=r0,r1,... (model-dependent magnitude ratios) or "
                "calibrate=true (a run that prints them); see diffusers' MagCacheConfig"
            )
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad options for cache {name} ({cls.__name__}): {exc}") from None


def describe_cache(config) -> str:
    """``fbc(threshold=0.1)``: the short name and the options that differ from the defaults."""
    if config is None:
        return "none"
    name = cache_name(config)
    changed = []
    for f in _settable_fields(type(config)).values():
        value = getattr(config, f.name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(value, torch.Tensor):
            changed.append(f"{f.name}=[{len(value)} values]")
        elif value != default:
            changed.append(f"{f.name}={value!r}")
    return f"{name}({', '.join(changed)})"


# --------------------------------------------------------------------------- install / remove
@dataclass(eq=False)
class CacheHandle:
    """What :func:`enable_cache` installed; ``remove()`` disables it on every model."""

    config: object
    models: list = field(default_factory=list)
    removed: bool = False

    def remove(self) -> None:
        if self.removed:
            return
        for model in reversed(self.models):
            if model.is_cache_enabled:
                model.disable_cache()
        self.removed = True


def _with_timestep_callback(config, pipe_or_model):
    """A copy of ``config``; PAB's and FasterCache's missing ``current_timestep_callback`` set to
    the pipeline's ``current_timestep`` (held weakly)."""
    config = copy.copy(config)
    if not hasattr(config, "current_timestep_callback") or config.current_timestep_callback is not None:
        return config
    if isinstance(pipe_or_model, torch.nn.Module) or not hasattr(type(pipe_or_model), "current_timestep"):
        raise ValueError(
            f"{type(config).__name__} needs current_timestep_callback (the denoising loop's current "
            f"timestep); {type(pipe_or_model).__name__} has no current_timestep: set the callback, or "
            "install on a pipeline that has one (Wan, HunyuanVideo)"
        )
    pipe = weakref.ref(pipe_or_model)
    config.current_timestep_callback = lambda: pipe().current_timestep
    return config


def enable_cache(pipe_or_model, config, models: list | None = None) -> CacheHandle:
    """``enable_cache(config)`` on every transformer of a pipeline (or on one model).

    ``config`` is one of diffusers' cache configs (see :data:`CACHES`); a copy is installed, with
    PAB's and FasterCache's timestep callback set from the pipeline when missing. Raises
    ``ValueError`` when a model has no ``enable_cache`` (diffusers' ``CacheMixin``: UNets have
    none) or already has a cache.
    """
    from .pipelines.base import denoising_models

    cache_name(config)  # a supported config, or a clear error
    models = list(models) if models is not None else denoising_models(pipe_or_model)
    for model in models:
        if not callable(getattr(model, "enable_cache", None)):
            raise ValueError(
                f"{type(model).__name__} has no enable_cache (diffusers' CacheMixin): step caches "
                "install on transformer models (Wan, HunyuanVideo), not on this model"
            )
        if model.is_cache_enabled:
            raise ValueError(
                f"{type(model).__name__} already has a cache enabled "
                f"({type(model._cache_config).__name__}): call disable_cache() first, or pass no cache"
            )
    config = _with_timestep_callback(config, pipe_or_model)
    handle = CacheHandle(config)
    try:
        for model in models:
            before = _hook_count(model)
            model.enable_cache(config)
            handle.models.append(model)
            if _hook_count(model) == before:
                # e.g. TaylorSeerCacheConfig()'s default patterns (``^blocks.*attn``, matched
                # against whole module names) match no module of a Wan transformer.
                raise ValueError(
                    f"{type(config).__name__} hooked no module of {type(model).__name__}: the cache "
                    "would do nothing; name the modules to cache (TaylorSeer: use_lite_mode=true or "
                    "cache_identifiers=...)"
                )
    except Exception:
        handle.remove()
        raise
    return handle


def _hook_count(model) -> int:
    return sum(len(module._diffusers_hook.hooks) for module in model.modules()
               if hasattr(module, "_diffusers_hook"))


# --------------------------------------------------------------------------- quantization
def check_quantize_method(method, quantize: str | None) -> None:
    """``quantize`` must be ``None`` or a supported mode, for a method that runs on the kernel
    with it: static plans (Dense, Radial, GNA) and methods declaring ``accepts_quantize``
    (AdaSpa, VMoBA). PARO carries its own ``quantize``; Agent composes small dense calls."""
    from .kernels.quantized import QUANTIZATIONS

    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be None or one of {QUANTIZATIONS}, got quantize={quantize!r}")
    name = type(method).__name__
    if dataclasses.is_dataclass(method) and "quantize" in {f.name for f in dataclasses.fields(method)}:
        raise ValueError(
            f"{name} carries its own quantize (now {method.quantize!r}): set "
            f"{name}(quantize={quantize!r}) instead of passing quantize= to fastdit.apply"
        )
    if method.plans_per_call and not method.accepts_quantize:
        raise ValueError(
            f"{name} composes its own kernel calls and does not run on the quantized kernel; "
            f"quantize={quantize!r} works with Dense, Radial, GNA (block-sparse windows), VMoBA "
            "and AdaSpa"
        )


def check_quantize(method, quantize: str | None, models: list, adapters: list) -> None:
    """:func:`check_quantize_method`, and every model's self-attention weights in fp16/bf16 (the
    quantized kernel runs P.V in V's 16-bit dtype)."""
    check_quantize_method(method, quantize)
    if quantize is None:
        return
    for model, adapter in zip(models, adapters):
        attention = adapter.self_attention_modules(model)[0]
        dtype = next(attention.parameters()).dtype
        if dtype not in QUANTIZED_MODEL_DTYPES:
            raise ValueError(
                f"quantize={quantize!r} needs a bf16 or fp16 pipeline (P.V runs in 16 bits), got "
                f"{str(dtype).removeprefix('torch.')} weights in {type(model).__name__}"
            )
