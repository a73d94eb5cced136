"""One timed run of a diffusers pipeline, what ``fastdit generate`` and ``fastdit compare`` share.

:class:`SpeedProbe` instruments a pipeline once (hooks stay while methods are applied and
removed); :func:`run_generation` installs a method with :func:`fastdit.apply` (or none: the stock
pipeline), runs the pipeline, removes the method and returns the frames with what was measured.

How each time is measured (``SpeedRecord``):

* ``run_s``: wall clock of the whole pipeline call (prompt encoding, denoising loop, VAE decode),
  synchronised with the GPU at the end.
* ``step_s``: one entry per denoising step, from the pipeline's ``callback_on_step_end`` (the
  device is synchronised there); the first step starts at the first transformer call.
  ``denoise_s`` is their sum.
* ``transformer_s``: every transformer forward (CFG passes and both Wan2.2 experts included),
  timed by a diffusers ``ModelHook`` on each transformer, outside every other hook (fastdit's
  included, re-registered at each :meth:`SpeedProbe.begin`), that synchronises the device and
  reads the wall clock before and after: two host syncs per forward, at its boundaries only.
* ``attention_s`` / ``self_attention_s``: time inside the attention modules, by a ``ModelHook``
  on every diffusers attention module (the modules whose forward is a
  thin call of their processor: QKV/out projections, norms and RoPE are included). On CUDA the
  hooks record CUDA events, read once after the run, so nothing synchronises inside the forward;
  on the CPU they read the wall clock. ``self_attention_s`` counts the modules fastdit replaces
  (the adapter's ``self_attention_modules``: Wan ``attn1``, HunyuanVideo's joint attention),
  ``attention_s`` all of them (cross-attention, token refiner too). The shares reported are these
  over ``transformer_s``. Not measured under ``torch.compile`` (hooks inside a compiled block
  would be traced into its graph).
* ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` over the run (reset before it);
  ``None`` off CUDA.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..hooks import HookSet, function_hook
from ..pipelines.base import adapter_for

__all__ = [
    "FiniteWatch",
    "GenerationResult",
    "NonFiniteError",
    "SpeedProbe",
    "SpeedRecord",
    "frames_to_uint8",
    "pipeline_call_kwargs",
    "run_generation",
    "transformer_models",
]

PROBE_HOOK = "fastdit.probe"


@dataclass
class SpeedRecord:
    """What one pipeline call took (seconds); see the module docstring for how it is measured."""

    run_s: float
    step_s: list[float]
    transformer_s: float
    transformer_step_s: list[float]
    self_attention_s: float | None
    attention_s: float | None
    peak_memory_bytes: int | None
    transformer_calls: int
    attention_note: str | None = None

    @property
    def denoise_s(self) -> float | None:
        return sum(self.step_s) if self.step_s else None

    @property
    def self_attention_share(self) -> float | None:
        if self.self_attention_s is None or not self.transformer_s:
            return None
        return self.self_attention_s / self.transformer_s

    @property
    def attention_share(self) -> float | None:
        if self.attention_s is None or not self.transformer_s:
            return None
        return self.attention_s / self.transformer_s

    def as_json(self) -> dict:
        return {
            "run_s": self.run_s,
            "denoise_s": self.denoise_s,
            "step_s": list(self.step_s),
            "transformer_s": self.transformer_s,
            "transformer_step_s": list(self.transformer_step_s),
            "transformer_calls": self.transformer_calls,
            "self_attention_s": self.self_attention_s,
            "attention_s": self.attention_s,
            "self_attention_share": self.self_attention_share,
            "attention_share": self.attention_share,
            "peak_memory_bytes": self.peak_memory_bytes,
            "attention_note": self.attention_note,
        }


def transformer_models(pipe) -> list[torch.nn.Module]:
    """The pipeline's ``transformer`` and ``transformer_2`` (or ``pipe`` itself, a model)."""
    if isinstance(pipe, torch.nn.Module):
        return [pipe]
    models = [getattr(pipe, name, None) for name in ("transformer", "transformer_2")]
    return [model for model in models if isinstance(model, torch.nn.Module)]


def _attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    # diffusers attention modules (Attention, WanAttention, ...) hold a processor they call.
    return [
        module for module in model.modules()
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None))
    ]


def _self_attention_ids(model: torch.nn.Module) -> set[int]:
    try:
        adapter = adapter_for(model)
    except ValueError:  # a model fastdit does not adapt: no self-attention split
        return set()
    return {id(module) for module in adapter.self_attention_modules(model)}


class SpeedProbe:
    """Hooks that time a pipeline's transformers and attention modules, one run at a time.

    Usage::

        probe = SpeedProbe(pipe, device)          # installs the hooks
        probe.begin(); out = pipe(..., callback_on_step_end=probe.on_step_end)
        record = probe.end(run_s)
        probe.remove()
    """

    def __init__(self, pipe, device: torch.device, time_attention: bool = True,
                 attention_note: str | None = None) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.time_attention = time_attention
        self.attention_note = attention_note
        self._models = transformer_models(pipe)
        self._attention_hooks = HookSet()
        self._transformer_hooks = HookSet()
        self._self_ids: set[int] = set()
        if time_attention:
            for model in self._models:
                self._self_ids |= _self_attention_ids(model)
                for module in _attention_modules(model):
                    hook = function_hook(self._attention_start, self._attention_stop)
                    self._attention_hooks.add(module, PROBE_HOOK, hook)
            self._attention_hooks.refresh_caches()
        self.begin()

    # ---- hooks
    def _synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _transformer_start(self, module, args, kwargs):
        self._synchronize()
        now = time.perf_counter()
        if self._first_call is None:
            self._first_call = now
        self._open_transformer.append(now)
        return args, kwargs

    def _transformer_stop(self, module, output):
        self._synchronize()
        elapsed = time.perf_counter() - self._open_transformer.pop()
        self._transformer.append((len(self._step_ends), elapsed))
        return output

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _attention_start(self, module, args, kwargs):
        self._open_attention.append(self._mark())
        return args, kwargs

    def _attention_stop(self, module, output):
        start = self._open_attention.pop()
        self._attention.append((id(module) in self._self_ids, start, self._mark()))
        return output

    def on_step_end(self, _pipe, _step, _timestep, callback_kwargs):
        """The pipeline's ``callback_on_step_end``."""
        self._synchronize()
        self._step_ends.append(time.perf_counter())
        return callback_kwargs

    # ---- runs
    def begin(self) -> None:
        """Start a run: clear the records; the transformer hooks go (back) on the outside, so
        they time whatever fastdit installed since (its per-forward hook included)."""
        self._transformer_hooks.remove()
        for model in self._models:
            hook = function_hook(self._transformer_start, self._transformer_stop)
            self._transformer_hooks.add(model, PROBE_HOOK, hook)
        self._transformer_hooks.refresh_caches()
        self._first_call: float | None = None
        self._step_ends: list[float] = []
        self._transformer: list[tuple[int, float]] = []
        self._attention: list[tuple[bool, Any, Any]] = []
        self._open_transformer: list[float] = []
        self._open_attention: list = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def end(self, run_s: float) -> SpeedRecord:
        self._synchronize()
        step_s = []
        if self._first_call is not None:
            starts = [self._first_call, *self._step_ends[:-1]]
            step_s = [end - start for start, end in zip(starts, self._step_ends)]
        per_step = [0.0] * max(len(step_s), 1)
        for step, elapsed in self._transformer:
            per_step[min(step, len(per_step) - 1)] += elapsed
        self_attention = attention = None
        if self.time_attention:
            self_attention = attention = 0.0
            for is_self, start, stop in self._attention:
                seconds = start.elapsed_time(stop) / 1e3 if self.cuda else stop - start
                attention += seconds
                if is_self:
                    self_attention += seconds
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else None
        return SpeedRecord(
            run_s=run_s,
            step_s=step_s,
            transformer_s=sum(elapsed for _, elapsed in self._transformer),
            transformer_step_s=per_step if step_s else [],
            self_attention_s=self_attention,
            attention_s=attention,
            peak_memory_bytes=peak,
            transformer_calls=len(self._transformer),
            attention_note=None if self.time_attention else self.attention_note,
        )

    def remove(self) -> None:
        self._transformer_hooks.remove()
        self._attention_hooks.remove()


# --------------------------------------------------------------------------- non-finite values
class NonFiniteError(ValueError):
    """A generation produced NaN or inf: in the latents after a denoising step, or in the frames."""


class FiniteWatch:
    """Fails a generation at the first denoising step whose latents hold NaN or inf, naming the
    step and the first attention module whose output was not finite in it.

    Checked once per step, in the pipeline's ``callback_on_step_end`` (one host read of a flag,
    where :class:`SpeedProbe` synchronises anyway). With ``layers``, a hook on every attention
    module (a diffusers ``ModelHook``) records, on the device, whether its output was finite (a
    reduction per call, no synchronisation; one extra read of the output, a small fraction of the
    attention's own time); the flags of a step are read only when its latents are not finite. Leave ``layers`` off
    under ``torch.compile`` (hooks inside compiled blocks would be traced).
    """

    def __init__(self, pipe, layers: bool = True) -> None:
        self._pipe = pipe
        self._handles = HookSet()
        self._names: dict[int, str] = {}
        self._flags: list[tuple[int, torch.Tensor]] = []
        if layers:
            for model_name, model in _named_transformer_models(pipe):
                modules = {id(m) for m in _attention_modules(model)}
                for name, module in model.named_modules():
                    if id(module) in modules:
                        self._names[id(module)] = f"{model_name}.{name}" if model_name else name
                        self._handles.add(module, "fastdit.finite", function_hook(post_forward=self._record))
            self._handles.refresh_caches()

    def _record(self, module, output):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            self._flags.append((id(module), torch.isfinite(out).all()))
        return output

    def on_step_end(self, step: int, callback_kwargs: dict) -> None:
        flags, self._flags = self._flags, []
        latents = callback_kwargs.get("latents")
        if not isinstance(latents, torch.Tensor) or bool(torch.isfinite(latents).all()):
            return
        total = getattr(self._pipe, "num_timesteps", None)
        where = f"denoising step {step} (0-based) of {total}" if total else f"denoising step {step} (0-based)"
        first = next((self._names[i] for i, ok in flags if not bool(ok)), None)
        if first is not None:
            origin = f"; the first attention output with NaN/inf in that step: {first}"
        elif len(self._handles):
            origin = ("; every attention output of that step was finite: the values arose outside "
                      "the attention modules (feed-forward, norms, the scheduler step)")
        else:
            origin = ""
        raise NonFiniteError(f"the latents became non-finite (NaN/inf) at {where}{origin}")

    def remove(self) -> None:
        self._handles.remove()
        self._flags.clear()


def _named_transformer_models(pipe) -> list[tuple[str, torch.nn.Module]]:
    if isinstance(pipe, torch.nn.Module):
        return [("", pipe)]
    named = [(name, getattr(pipe, name, None)) for name in ("transformer", "transformer_2", "unet")]
    return [(name, model) for name, model in named if isinstance(model, torch.nn.Module)]


# --------------------------------------------------------------------------- one run
def _call_parameters(pipe) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def pipeline_call_kwargs(
    pipe, prompt: str, settings: dict[str, Any], negative_prompt: str | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Keyword arguments of ``pipe(...)`` for these settings (``None`` values left out), and the
    names the pipeline does not take (dropped; the caller says so)."""
    accepted = _call_parameters(pipe)
    kwargs: dict[str, Any] = {"prompt": prompt, "output_type": "np"}
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    kwargs.update({k: v for k, v in settings.items() if v is not None})
    dropped = []
    if accepted:
        for name in sorted(k for k in kwargs if k not in accepted):
            if name != "output_type":
                dropped.append(name)
            del kwargs[name]
    return kwargs, dropped


def frames_to_uint8(frames) -> np.ndarray:
    """Pipeline frames (``(F, H, W, C)``, a batch of them, or one image; float in [0, 1] or
    uint8) -> ``(F, H, W, 3)`` uint8 of the first video."""
    frames = np.asarray(frames)
    if frames.ndim == 5:  # (batch, frames, H, W, C): the first video
        frames = frames[0]
    if frames.ndim == 3:  # a single image
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected frames shaped (F, H, W, C), got shape {tuple(frames.shape)}")
    if frames.dtype != np.uint8:
        frames = frames.astype(np.float32)
        finite = np.isfinite(frames)
        if not finite.all():
            bad = np.flatnonzero(~finite.reshape(frames.shape[0], -1).all(axis=1))
            raise NonFiniteError(
                f"the frames hold {int((~finite).sum())} non-finite values (NaN/inf) in {len(bad)} "
                f"of {frames.shape[0]} frame(s), first in frame {int(bad[0])}: the generation "
                "failed numerically"
            )
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3])


@dataclass
class GenerationResult:
    """One pipeline call: the video, its timings and, with a method, what fastdit recorded."""

    frames: np.ndarray  # (F, H, W, 3) uint8
    speed: SpeedRecord
    densities: dict[tuple[int, int | None], float] = field(default_factory=dict)
    density_summary: str | None = None
    records: object | None = None  # the method runtime's ``records``, if it keeps any


def run_generation(pipe, call_kwargs: dict[str, Any], probe: SpeedProbe, seed: int,
                   method=None, schedule=None, *, cache=None, quantize=None) -> GenerationResult:
    """Run ``pipe(**call_kwargs)`` once with a fresh CPU generator seeded ``seed``; with
    ``method`` (and ``cache``, ``quantize``), installed by :func:`fastdit.apply` for this call
    only; a ``cache`` without a method runs the stock pipeline with that cache."""
    import fastdit
    from ..compose import enable_cache

    kwargs = dict(call_kwargs)
    kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
    accepted = _call_parameters(pipe)
    watch = FiniteWatch(pipe, layers=probe.time_attention)  # no hooks in compiled blocks

    def on_step_end(pipe_, step, timestep, callback_kwargs):
        callback_kwargs = probe.on_step_end(pipe_, step, timestep, callback_kwargs)
        watch.on_step_end(step, callback_kwargs)
        return callback_kwargs

    if not accepted or "callback_on_step_end" in accepted:
        kwargs["callback_on_step_end"] = on_step_end
    handle = stock_cache = None
    try:
        if method is not None:
            handle = fastdit.apply(pipe, method, schedule=schedule, cache=cache, quantize=quantize)
        elif cache is not None:
            stock_cache = enable_cache(pipe, cache)
    except BaseException:
        watch.remove()
        raise
    densities: dict = {}
    summary = records = None
    try:
        probe.begin()
        start = time.perf_counter()
        with torch.inference_mode():
            output = pipe(**kwargs)
        probe._synchronize()
        run_s = time.perf_counter() - start
        if handle is not None:
            densities = dict(handle.state.densities)
            ulysses = handle.state.parallel
            if ulysses is not None:  # each rank recorded its heads: the mean over all heads
                densities = ulysses.mean_over_ranks(densities)
            summary = handle.state.summary(densities)
            records = getattr(handle.state.runtime, "records", None)
    finally:
        watch.remove()
        if handle is not None:
            handle.remove()
        if stock_cache is not None:
            stock_cache.remove()
    speed = probe.end(run_s)
    frames = getattr(output, "frames", None)
    if frames is None:
        frames = getattr(output, "images", None)
    if frames is None:
        raise ValueError(f"{type(pipe).__name__} returned no frames or images")
    return GenerationResult(
        frames=frames_to_uint8(frames), speed=speed, densities=densities,
        density_summary=summary, records=records,
    )
