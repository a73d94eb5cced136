"""GPU speed of every quality-table configuration on a full-size Wan2.1-T2V-1.3B at 480p.

``benchmarks/quality_table.py`` measures the quality of each configuration (every method at its
defaults and at two or three densities, PARO, Agent, INT8, step caches, random-block controls) on
the small trained model on the CPU. This script times the same configurations (the table's
:func:`~benchmarks.quality_table.build_rows`: one definition of each row) where speed means
something: the full-size Wan2.1-1.3B transformer (30 layers, 12 heads x 128, random bf16 weights
built in-process by ``e2e_bench.build_transformer``; transformer only: no VAE, text encoder or
scheduler) at 480p x 81 frames: latent ``[1, 16, 21, 60, 104]``, grid 21 x 30 x 52 = 32,760
tokens, text ``[1, 512, 4096]``. One step is classifier-free guidance: a cond and an uncond
forward (guidance 5.0), each inside the ``cache_context`` the Wan pipeline's loop sets (fastdit
and the caches read the step from it), as the table's generations run.

How each row runs here
----------------------
Installed as the table installs it: ``fastdit.apply(model, method, cache=..., quantize=...)``,
or the stock model with ``fastdit.compose.enable_cache`` for a cache without a method, nothing
for the stock rows; SDPA is forced to cuDNN (``sdpa_kernel(CUDNN_ATTENTION)``) for whatever
takes the stock path. ``dense`` (diffusers' stock attention, cuDNN, bf16) is the 1.00x baseline.
Where the table's setting has no meaning at this size, it is mapped, and the ``config`` column
says how:

* GNA windows are given in tokens of the table's 9 x 16 x 16 grid: they become the same fraction
  of each axis of 21 x 30 x 52 (``quality_table.scale_window``): ``gna-1x5x5`` runs
  ``window=(2, 9, 16)``, ``gna-3x9x9`` ``(7, 17, 29)``, ``gna-5x11x11`` ``(12, 21, 36)``;
* ``random@<row>`` controls keep random blocks at the density ``<row>`` ran at *here* (its mean
  over layers and computed steps), as the table takes it from its own run;
* ``dense-bf16`` is ``dense``: on the GPU every row runs bf16 (the table's fp32/bf16 split is a
  CPU matter), so it reuses that row's time;
* PARO runs only from a plan calibrated on the model at that grid (it has no uncalibrated
  mode), and the table's plans are for the tiny model's grid. So each PARO row's plan is
  calibrated here, in process, on this random-weight transformer (``fastdit.methods.paro.
  calibrate.calibrate_model``: the cond forward of ``PARO_CALIBRATION_STEPS`` spread steps
  collected, 4 timestep buckets, the row's density; ``paro_d<d>_random_weights.safetensors`` in
  ``--out``). Its blocks are not a trained model's, but the kernel's cost follows the density and
  the per-head reordering, which are PARO's; the ``config`` column says so. ``--paro-plan
  LABEL=FILE`` times a plan calibrated on the real model instead; ``--no-paro-calibration``
  leaves rows without one "not timed".

Time per 20-step generation: phases, and whole loops
-----------------------------------------------------
A row's 20 steps (the table's step count) are of a few kinds, each with its own cost, decided by
fastdit's and diffusers' rules (:func:`step_kinds`): ``stock`` (no fastdit), ``dense-step`` (every
layer dense: the method's ``Schedule``, e.g. VMoBA's first 25%, Agent's last 60%, Radial preset's
scaled dense steps), ``sparse-step``, AdaSpa's ``search-step`` (dense + LSE and the selection) and
``cached-search-step`` (one block-mass pass on the cached LSE) with the deferral to the next
computed step that fastdit applies after a cache skip, and ``skip`` (a step TaylorSeer skips:
its rule on the cache's own forward counter). Each kind is timed once, in step order on one
installation (so AdaSpa's sparse step runs on the masks its search chose), at the first step of
that kind: ``--warmup`` forwards, then ``--repeat`` CFG steps, CUDA events around each, the
median; the generation is ``sum(count x median)`` and the ``recipe`` column lists it. TaylorSeer
rows run their computed kinds with the same cache config made to compute every step (its
bookkeeping included), and ``skip`` with one made to skip every step after its warm-up (as
``compose_bench`` times it). FirstBlockCache decides each step from the first block's residual,
so its rows run the whole 20-step loop for real (a flow-matching Euler update of the latent with
the guided output, CUDA events per step, after one untimed step on a separate installation);
their ``computed_steps`` is what the cache chose **on random weights**, where its decisions are
not a trained model's. ``--check-loop`` runs that whole loop for other rows too, next to their
phase estimate (``loop_ms``, ``loop_vs_estimate``): the check of the extrapolation. ``--smoke``
runs every row both ways and requires the loop's computed steps and AdaSpa's searches to be the
ones :func:`step_kinds` counted (an error row otherwise).

Outputs
-------
``quality_speed_<gpu-slug>_<date>.{csv,json,png}`` in ``--out`` (default
``benchmarks/results/<gpu>_<date>/``), rewritten after every row (atomically) so a run cut short
keeps what it measured. CSV, one line per table row: ``label``, ``status`` (``ok``, ``not
timed``, ``error``), ``ms_generation`` (ms per 20-step generation), ``speedup_vs_cudnn``,
``computed_steps``, ``recipe``, ``density`` (mean over layers and computed steps), ``source``
(``phases``, ``loop``, ``reused: dense``), ``loop_ms``, ``loop_vs_estimate``, ``config``,
``reason``, ``gpu``, ``date``, model and grid. The JSON adds every kind's timing. Merge into
the quality table with ``python -m benchmarks.quality_table --speed <csv> --out <table folder>``.

How to run
----------
    python -m benchmarks.quality_speed                      # every row, one H200 call (~5-6 min)
    python -m benchmarks.quality_speed --rows radial,gna-3x9x9,adaspa
    python -m benchmarks.quality_speed --smoke --out /tmp/qs  # tiny transformer on the CPU, seconds
    bash benchmarks/gpu_session.sh $OUT/s qspeed            # the GPU session step (560 s limit)

Runtime (H200, measured 2026-12-02, run 6): every row in 254 s (31 rows, model build 6 s,
``--budget-s`` not reached); the PARO rows alone, with their two in-process calibrations (15 s
and 9 s), in 49 s. ``--budget-s`` (default 480 s) stops starting rows after that many seconds
(they read "not timed: time budget spent"), so a run ends inside the session step's 560 s with
its outputs written.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gc
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

import fastdit  # noqa: E402
from benchmarks.e2e_bench import MODELS, SMOKE_MODELS, build_transformer, make_inputs, sdpa_context  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    add_out_argument, collect_metadata, describe_error, pyplot, stem, synchronize,
)
from benchmarks.quality_table import PARO_DENSITIES, Row, build_rows  # noqa: E402
from fastdit import AdaSpa, Schedule  # noqa: E402
from fastdit.compose import build_cache_config, cache_name, enable_cache, parse_cache_spec  # noqa: E402
from fastdit.files import atomic_path, atomic_write_text  # noqa: E402
from fastdit.kernels import explain_backends  # noqa: E402
from fastdit.quality.controls import RandomBlocks  # noqa: E402
from fastdit.testing.embedded import trained_settings  # noqa: E402

MODEL, SMOKE_MODEL = "wan13b-480p", "smoke-tiny"
STEPS = trained_settings()["num_inference_steps"]  # the table's step count (20)
GUIDANCE = trained_settings()["guidance_scale"]
BASELINE = "dense"  # stock attention: cuDNN SDPA in bf16 on the GPU
SAME_AS_BASELINE = {"dense-bf16": "on the GPU every row runs bf16, so the table's bf16 stock "
                                  "row is the dense row"}
DEFAULT_CHECK_LOOP = "radial-14b+taylorseer,adaspa"
PARO_CALIBRATION_STEPS = 4  # spread steps collected per in-process PARO calibration (one per bucket)
PARO_RANDOM_WEIGHTS = ("plan calibrated in process on this random-weight model (speed only: its "
                       "blocks are not a trained model's; density and reordering are PARO's)")

SPEED_FIELDS = (
    "label", "group", "status", "ms_generation", "speedup_vs_cudnn", "steps", "computed_steps",
    "recipe", "density", "source", "loop_ms", "loop_vs_estimate", "config", "reason", "gpu",
    "date", "model", "grid", "tokens", "dtype", "wall_s",
)


# --------------------------------------------------------------------------- step kinds
def taylorseer_computes(config, step: int) -> bool:
    """Whether diffusers' TaylorSeer hook computes the ``step``-th forward of a CFG context
    (``TaylorSeerCacheHook._measure_should_compute``; its counter starts at 0)."""
    if step < config.disable_cache_before_step:
        return True
    after = config.disable_cache_after_step
    if after is not None and step >= after:
        return True
    return (step - config.disable_cache_before_step - 1) % config.cache_interval == 0


def step_kinds(method, cache, steps: int, num_layers: int) -> list[str] | None:
    """The kind of each of ``steps`` steps (module docstring), or ``None`` when a cache decides
    from the data (FirstBlockCache and the other adaptive caches): that row runs its whole loop."""
    skips = None
    if cache is not None:
        if cache_name(cache) != "taylorseer":
            return None
        skips = [not taylorseer_computes(cache, step) for step in range(steps)]
    schedule = Schedule.from_method(method) if method is not None else None
    searches = method.resolve_search_steps(steps) if isinstance(method, AdaSpa) else ()
    searched_at = None  # AdaSpa: the step of the search whose masks are in force
    kinds = []
    for step in range(steps):
        if skips is not None and skips[step]:
            kind = "skip"
        elif method is None:
            kind = "stock"
        elif all(schedule.is_dense(step, steps, layer, num_layers) for layer in range(num_layers)):
            kind = "dense-step"
        elif isinstance(method, AdaSpa) and searched_at is None:
            kind, searched_at = "search-step", step  # dense + LSE (scheduled or deferred)
        elif any(searched_at is not None and searched_at < s <= step for s in searches):
            kind, searched_at = "cached-search-step", step  # one mass pass on the cached LSE
        else:
            kind = "sparse-step"
        kinds.append(kind)
    return kinds


def recipe(kinds: list[str]) -> dict[str, int]:
    """``{kind: count}`` in the order the kinds first occur."""
    return {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}


# --------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on the GPU (read after one synchronisation), the wall clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start, stop) -> float:
        return start.elapsed_time(stop) if self.cuda else (stop - start) * 1e3

    def sync(self) -> None:
        synchronize(self.device)


def sigma(step: int, steps: int) -> float:
    """The flow-matching noise level before ``step`` (linear from 1 to 0)."""
    return 1.0 - step / steps


def cfg_step(model, inputs, latent, step: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One CFG step's two forwards (cond, uncond), in the pipeline's ``cache_context``."""
    timestep = torch.full((latent.shape[0],), sigma(step, steps) * 1000, device=latent.device)
    outputs = []
    for name, text in (("cond", inputs.text_cond), ("uncond", inputs.text_uncond)):
        with model.cache_context(name, step_index=step, num_inference_steps=steps):
            outputs.append(model(hidden_states=latent, timestep=timestep,
                                 encoder_hidden_states=text, return_dict=False)[0])
    return outputs[0], outputs[1]


def time_kind(model, inputs, step: int, steps: int, warmup: int, repeat: int, clock: Clock,
              sdpa) -> list[float]:
    """``warmup`` untimed forwards (cond, uncond, ...) at ``step``, then ``repeat`` timed CFG
    steps at ``step``: ms of each."""
    timestep = torch.tensor([sigma(step, steps) * 1000], device=inputs.latent.device)
    with torch.inference_mode(), sdpa():
        for i in range(warmup):
            name = "cond" if i % 2 == 0 else "uncond"
            text = inputs.text_cond if name == "cond" else inputs.text_uncond
            with model.cache_context(name, step_index=step, num_inference_steps=steps):
                model(hidden_states=inputs.latent, timestep=timestep, encoder_hidden_states=text,
                      return_dict=False)
        marks = []
        for _ in range(repeat):
            start = clock.mark()
            cfg_step(model, inputs, inputs.latent, step, steps)
            marks.append((start, clock.mark()))
        clock.sync()
    return [clock.ms(start, stop) for start, stop in marks]


@dataclass
class Loop:
    step_ms: list[float]
    computed_steps: list[int]  # steps whose last block's self-attention ran

    @property
    def ms(self) -> float:
        return sum(self.step_ms)


def run_loop(model, inputs, steps: int, clock: Clock, sdpa) -> Loop:
    """The whole denoising loop: ``steps`` CFG steps with a flow-matching Euler update of the
    latent by the guided output, CUDA events around each step."""
    computed: list[int] = []
    current = [0]
    hook = model.blocks[-1].attn1.register_forward_pre_hook(
        lambda module, args: computed.append(current[0]))
    marks = []
    try:
        latent = inputs.latent.clone()
        with torch.inference_mode(), sdpa():
            for step in range(steps):
                current[0] = step
                start = clock.mark()
                cond, uncond = cfg_step(model, inputs, latent, step, steps)
                guided = uncond + GUIDANCE * (cond - uncond)
                latent = latent + (sigma(step + 1, steps) - sigma(step, steps)) * guided
                marks.append((start, clock.mark()))
            clock.sync()
    finally:
        hook.remove()
    return Loop([clock.ms(start, stop) for start, stop in marks], sorted(set(computed)))


# --------------------------------------------------------------------------- one row
@dataclass
class Config:
    """One table row as it runs at this size."""

    row: Row
    method: object = None
    cache: object = None  # a diffusers cache config
    description: str = ""
    kinds: list[str] | None = None
    timings: dict = field(default_factory=dict)  # kind -> {"step", "ms", "density", ...}


class SpeedRun:
    """The full-size (or smoke) transformer and every row on it, in the table's order."""

    def __init__(self, args, device: torch.device, dtype: torch.dtype, metadata: dict) -> None:
        self.args, self.device, self.dtype, self.metadata = args, device, dtype, metadata
        self.spec = (SMOKE_MODELS if args.smoke else MODELS)[args.model]
        self.grid = self.spec.grid
        self.layers = self.spec.config["num_layers"]
        self.clock = Clock(device)
        self.sdpa = sdpa_context("CUDNN_ATTENTION", device)
        self.start = time.perf_counter()
        self.results: list[dict] = []
        self.details: dict[str, dict] = {}
        self.model = self.inputs = None

    # -- bookkeeping
    def new_result(self, row: Row, config: str = "") -> dict:
        result = dict.fromkeys(SPEED_FIELDS)
        result.update(label=row.label, group=row.group, steps=self.args.steps, config=config,
                      gpu=self.metadata["device_name"], date=self.metadata["date"],
                      model=self.spec.label, grid="x".join(map(str, self.grid.shape)),
                      tokens=self.grid.num_tokens, dtype=str(self.dtype).removeprefix("torch."))
        self.results.append(result)
        return result

    def over_budget(self) -> str | None:
        budget = self.args.budget_s
        if budget is not None and time.perf_counter() - self.start > budget:
            return f"time budget spent (--budget-s {budget:g})"
        return None

    def fastdit_unavailable(self) -> str | None:
        """On the GPU fastdit must run its Triton kernel (a fall-back to the PyTorch reference
        would time the wrong thing)."""
        if self.device.type != "cuda":
            return None
        reason = explain_backends(self.device, self.dtype,
                                  self.spec.config["attention_head_dim"]).get("triton")
        return f"fastdit's Triton kernel cannot run here: {reason}" if reason else None

    def find(self, label: str) -> dict | None:
        return next((r for r in self.results if r["label"] == label), None)

    # -- configuration
    def configure(self, row: Row) -> Config:
        """The row's method (controls built from their target's density here) and cache."""
        method = row.method
        if row.control_of is not None:
            target = self.find(row.control_of)
            if target is None or target["status"] != "ok" or target["density"] is None:
                raise LookupError(f"needs {row.control_of}'s density at this size, which did not run")
            target_row = self.details[row.control_of]["method_row"]
            method = RandomBlocks(density=float(target["density"]),
                                  block_size=int(getattr(target_row.method, "block_size", 128)),
                                  seed=self.args.seed)
        if method is not None and hasattr(method, "check_grid"):
            method.check_grid(self.grid)
        cache = (build_cache_config(*parse_cache_spec(row.cache), num_inference_steps=self.args.steps)
                 if row.cache else None)
        stock = "SDPA cuDNN" if self.device.type == "cuda" else "default SDPA"
        parts = [repr(method) if method is not None else f"diffusers stock attention ({stock})"]
        if row.quantize:
            parts.append(f"quantize={row.quantize!r}")
        if row.cache:
            parts.append(f"cache {row.cache}")
        if row.scaled:
            parts.append(row.scaled)
        if row.control_of is not None:
            parts.append(f"random blocks at {row.control_of}'s density here")
        return Config(row, method, cache, "; ".join(parts),
                      step_kinds(method, cache, self.args.steps, self.layers))

    @contextlib.contextmanager
    def installed(self, config: Config, cache=None):
        """``config`` installed as the table installs it, with ``cache`` in place of its own."""
        handle = None
        if config.method is not None:
            handle = fastdit.apply(self.model, config.method, cache=cache,
                                   quantize=config.row.quantize)
        elif cache is not None:
            handle = enable_cache(self.model, cache)
        try:
            yield handle
        finally:
            if handle is not None:
                handle.remove()

    # -- measurement
    def time_phases(self, config: Config) -> None:
        """Every kind of ``config.kinds`` once, in step order (module docstring)."""
        steps = self.args.steps
        first = {kind: config.kinds.index(kind) for kind in recipe(config.kinds)}
        computed = [k for k in first if k != "skip"]
        compute_all = skip_all = config.cache
        if config.cache is not None:  # TaylorSeer: the same config, made to compute / skip all
            compute_all = dataclasses.replace(config.cache, disable_cache_before_step=10**9)
            skip_all = dataclasses.replace(config.cache, cache_interval=10**9,
                                           disable_cache_before_step=1)
        with self.installed(config, compute_all) as handle:
            for kind in computed:
                self.time_one(config, kind, first[kind], handle, self.args.warmup)
        if "skip" in first:
            with self.installed(config, skip_all) as handle:
                # forwards 0 and 2 of each context compute, the ones after skip
                self.time_one(config, "skip", first["skip"], None, max(self.args.warmup, 6))

    def time_one(self, config: Config, kind: str, step: int, handle, warmup: int) -> None:
        ms = time_kind(self.model, self.inputs, step, self.args.steps, warmup, self.args.repeat,
                       self.clock, self.sdpa)
        density = None
        if kind == "stock":
            density = 1.0
        elif handle is not None and kind != "skip":
            recorded = [d for (_, s), d in handle.state.densities.items() if s == step]
            density = sum(recorded) / len(recorded) if recorded else None
        config.timings[kind] = dict(step=step, ms=statistics.median(ms), ms_all=ms, density=density,
                                    count=config.kinds.count(kind))
        print(f"  {config.row.label:<24}{kind:<20} step {step:>2}: {statistics.median(ms):9.1f} "
              f"ms/step" + ("" if density is None else f"  density {density:.3f}"), flush=True)

    def time_loop(self, config: Config) -> tuple[Loop, object]:
        """The whole loop on a fresh installation, after one untimed step on another; returns it
        and the handle's state (densities, AdaSpa's records)."""
        with self.installed(config, config.cache):
            time_kind(self.model, self.inputs, 0, self.args.steps, 2, 0, self.clock, self.sdpa)
        with self.installed(config, config.cache) as handle:
            loop = run_loop(self.model, self.inputs, self.args.steps, self.clock, self.sdpa)
            state = handle.state if handle is not None and hasattr(handle, "state") else None
        return loop, state

    def check_loop(self, config: Config, loop: Loop, state) -> None:
        """The loop's computed steps and AdaSpa's searches must be the ones counted."""
        expected = [s for s, kind in enumerate(config.kinds) if kind != "skip"]
        if loop.computed_steps != expected:
            raise AssertionError(f"the loop computed steps {loop.computed_steps}, the step kinds "
                                 f"count {expected}")
        if isinstance(config.method, AdaSpa) and state is not None:
            searches = sorted({(r["step"], r["kind"]) for r in state.runtime.records})
            counted = [(s, "dense-lse" if k == "search-step" else "cached-lse")
                       for s, k in enumerate(config.kinds) if k.endswith("search-step")]
            if searches != counted:
                raise AssertionError(f"AdaSpa searched at {searches}, the step kinds count {counted}")

    def run_row(self, row: Row, check_loop: bool) -> dict:
        wall = time.perf_counter()
        result = self.new_result(row)
        self.details[row.label] = dict(method_row=row)
        try:
            reason = row.unavailable or self.over_budget()
            if reason:
                result.update(status="not timed", reason=f"not timed: {reason}")
                return result
            if row.label in SAME_AS_BASELINE:
                base = self.find(BASELINE)
                result.update({k: base[k] for k in ("status", "ms_generation", "computed_steps",
                                                    "recipe", "density", "config", "reason")})
                result.update(source=f"reused: {BASELINE} ({SAME_AS_BASELINE[row.label]})")
                return result
            config = self.configure(row)
            result["config"] = config.description
            if config.method is not None and (why := self.fastdit_unavailable()):
                result.update(status="error", reason=why)
                return result
            loop = state = None
            if config.kinds is not None:
                self.time_phases(config)
                counts = recipe(config.kinds)
                total = sum(n * config.timings[k]["ms"] for k, n in counts.items())
                weighted = [(n, config.timings[k]["density"]) for k, n in counts.items()
                            if k != "skip" and config.timings[k]["density"] is not None]
                result.update(
                    status="ok", source="phases", ms_generation=total,
                    computed_steps=sum(n for k, n in counts.items() if k != "skip"),
                    recipe=" + ".join(f"{n} x {k} ({config.timings[k]['ms']:.0f} ms)"
                                      for k, n in counts.items()),
                    density=(sum(n * d for n, d in weighted) / sum(n for n, _ in weighted))
                    if weighted else None,
                    reason="PARO plan calibrated on this random-weight model"
                    if row.scaled == PARO_RANDOM_WEIGHTS else None)
                if check_loop:
                    loop, state = self.time_loop(config)
                    self.check_loop(config, loop, state)
                    result.update(loop_ms=loop.ms, loop_vs_estimate=loop.ms / total)
            else:  # an adaptive cache: the whole loop decides
                loop, state = self.time_loop(config)
                densities = list(state.densities.values()) if state is not None else []
                result.update(status="ok", source="loop", ms_generation=loop.ms, loop_ms=loop.ms,
                              computed_steps=len(loop.computed_steps),
                              recipe=f"whole loop: computed steps {loop.computed_steps}",
                              density=(sum(densities) / len(densities)) if densities
                              else (1.0 if config.method is None else None),
                              reason=f"{cache_name(config.cache)}: {len(loop.computed_steps)} of "
                              f"{self.args.steps} steps computed, decided on random weights")
            self.details[row.label].update(kinds=config.kinds, timings=config.timings,
                                           loop_step_ms=loop.step_ms if loop else None,
                                           loop_computed_steps=loop.computed_steps if loop else None)
        except Exception as exc:  # one failing row must not end the run
            result.update(status="error", reason=describe_error(exc))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            result["wall_s"] = round(time.perf_counter() - wall, 1)
        return result

    def run(self, rows: list[Row], check: set[str], write) -> list[dict]:
        build = time.perf_counter()
        self.model = build_transformer(self.spec, self.device, self.dtype, self.args.seed)
        self.inputs = make_inputs(self.spec, self.device, self.dtype, self.args.seed)
        print(f"built {self.spec.label}: grid {self.grid.shape} = {self.grid.num_tokens} tokens, "
              f"{self.dtype} on {self.device} ({time.perf_counter() - build:.1f} s); "
              f"{self.args.steps} steps, warm-up {self.args.warmup} forwards, "
              f"{self.args.repeat} timed steps per kind", flush=True)
        rows = self.calibrate_paro(rows)
        for row in rows:
            result = self.run_row(row, check_loop=row.label in check)
            add_speedups(self.results)
            log(result)
            write(self.results, self.details)
        return self.results

    def calibrate_paro(self, rows: list[Row]) -> list[Row]:
        """``rows`` with each PARO row that has no plan given a plan calibrated here (module
        docstring), unless ``--no-paro-calibration``; a failed calibration leaves its rows "not
        timed" with the error."""
        plans: dict[str, str | None] = dict(self.args.paro_plans)
        wanted = {label for label, path in plans.items() if path is None
                  and any(row.label in (label, f"{label}+int8") for row in rows)}
        if not wanted or not self.args.paro_calibration:
            return rows
        from fastdit.methods.paro.calibrate import calibrate_model, spread_steps

        steps = self.args.steps
        collected = spread_steps(steps, min(PARO_CALIBRATION_STEPS, steps))

        def run() -> None:
            for step in collected:
                timestep = torch.tensor([sigma(step, steps) * 1000], device=self.device)
                with self.model.cache_context("cond", step_index=step, num_inference_steps=steps):
                    self.model(hidden_states=self.inputs.latent, timestep=timestep,
                               encoder_hidden_states=self.inputs.text_cond, return_dict=False)

        failed: dict[str, str] = {}
        for label in sorted(wanted):
            density = float(label.removeprefix("paro-d"))
            path = Path(self.args.out) / f"paro_d{density:g}_random_weights.safetensors"
            start = time.perf_counter()
            try:
                calibrate_model(self.model, run, steps, density=density, num_buckets=len(collected),
                                output=path, calibration={"in_process": PARO_RANDOM_WEIGHTS,
                                                          "seed": self.args.seed})
                synchronize(self.device)
            except Exception as exc:  # the other rows still run
                failed[label] = f"PARO calibration failed: {describe_error(exc)}"
                print(f"{label}: {failed[label]}", flush=True)
                continue
            plans[label] = str(path)
            print(f"{label}: calibrated in process at density {density:g} on steps {collected} "
                  f"({time.perf_counter() - start:.1f} s) -> {path}", flush=True)
        rebuilt = {row.label: row for row in build_rows(plans, smoke=False, steps=steps,
                                                        grid=self.grid)}
        out = []
        for row in rows:
            base = row.label.removesuffix("+int8")
            if base in failed:
                row = dataclasses.replace(row, unavailable=failed[base])
            elif base in wanted:
                row = dataclasses.replace(rebuilt[row.label], scaled=PARO_RANDOM_WEIGHTS)
            out.append(row)
        return out

    def close(self) -> None:
        self.model = self.inputs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def add_speedups(results: list[dict]) -> None:
    base = next((r for r in results if r["label"] == BASELINE and r["status"] == "ok"), None)
    for result in results:
        if base is not None and result["status"] == "ok":
            result["speedup_vs_cudnn"] = base["ms_generation"] / result["ms_generation"]


def log(result: dict) -> None:
    head = f"[{result['label']}]"
    if result["status"] != "ok":
        prefix = "" if result["status"] == "not timed" else f"{result['status'].upper()}: "
        print(f"{head} {prefix}{result['reason']}", flush=True)
        return
    speedup = result["speedup_vs_cudnn"]
    loop = "" if result["loop_ms"] is None or result["source"] == "loop" else (
        f"; whole loop {result['loop_ms']:,.0f} ms ({result['loop_vs_estimate']:.3f} of the estimate)")
    density = "" if result["density"] is None else f", density {result['density']:.3f}"
    print(f"{head} {result['ms_generation']:,.0f} ms / {result['steps']} steps"
          f"{'' if speedup is None else f' = {speedup:.2f}x'} ({result['source']}: "
          f"{result['recipe']}{density}){loop}  [{result['wall_s']} s]", flush=True)


# --------------------------------------------------------------------------- outputs
def write_outputs(results: list[dict], details: dict, metadata: dict, out: Path) -> Path:
    """CSV, JSON and PNG (atomic writes); returns the CSV's path."""
    base = out / stem("quality_speed", metadata)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=SPEED_FIELDS)
    writer.writeheader()
    writer.writerows(results)
    atomic_write_text(f"{base}.csv", buffer.getvalue())
    kinds = {label: {k: v for k, v in d.items() if k != "method_row"} for label, d in details.items()}
    atomic_write_text(f"{base}.json", json.dumps(dict(metadata=metadata, results=results,
                                                      kinds=kinds), indent=1, default=str))
    return Path(f"{base}.csv")


def plot(results: list[dict], metadata: dict, path: Path) -> None:
    plt = pyplot()
    timed = [r for r in results if r["status"] == "ok" and r["speedup_vs_cudnn"] is not None]
    if plt is None or not timed:
        return
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(timed) + 1.2))
    labels = [r["label"] for r in timed][::-1]
    values = [r["speedup_vs_cudnn"] for r in timed][::-1]
    ax.barh(labels, values, color=["tab:gray" if v <= 1.0 else "tab:blue" for v in values])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel(f"speedup over stock cuDNN, {metadata['num_steps']}-step generation")
    ax.set_title(f"quality-table configurations, {metadata['model']}, {metadata['device_name']}",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as temporary:
        fig.savefig(temporary, dpi=120, format="png")
    plt.close(fig)


def format_table(results: list[dict]) -> str:
    lines = [f"{'label':<24}{'ms / gen':>12}{'x cuDNN':>9}{'density':>9}  source / reason"]
    for r in results:
        if r["status"] == "ok":
            speedup = "-" if r["speedup_vs_cudnn"] is None else f"{r['speedup_vs_cudnn']:.2f}"
            density = "-" if r["density"] is None else f"{r['density']:.3f}"
            lines.append(f"{r['label']:<24}{r['ms_generation']:>12,.0f}{speedup:>9}{density:>9}  "
                         f"{r['source']}")
        else:
            lines.append(f"{r['label']:<24}{'—':>12}{'':>9}{'':>9}  {r['reason']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=None,
                        help="comma list of quality-table row labels (default: all; dense, the "
                             "baseline, always runs)")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"steps per generation (default: the table's {STEPS})")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forwards per kind (default: 2)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed CFG steps per kind (default: 2; 1 with --smoke)")
    parser.add_argument("--check-loop", default=None,
                        help=f"rows also timed as a whole loop (default: {DEFAULT_CHECK_LOOP}; "
                             "every row with --smoke; 'none')")
    parser.add_argument("--paro-plan", action="append", default=[], metavar="LABEL=FILE",
                        help="a PARO plan calibrated for this model and grid, for the row LABEL "
                             "(paro-d0.3, ...)")
    parser.add_argument("--no-paro-calibration", dest="paro_calibration", action="store_false",
                        help="do not calibrate PARO rows without --paro-plan on this random-weight "
                             "model (they are then not timed)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="rows that would start after this many seconds are not timed "
                             "(default: 480)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a 2-layer transformer on a 7x8x12 grid, bf16 on the CPU: the plumbing")
    add_out_argument(parser)
    args = parser.parse_args(argv)
    args.model = SMOKE_MODEL if args.smoke else MODEL
    if args.repeat is None:
        args.repeat = 1 if args.smoke else 2
    if args.steps < 1 or args.warmup < 0 or args.repeat < 1:
        parser.error(f"--steps and --repeat must be >= 1 and --warmup >= 0, got "
                     f"{args.steps=}, {args.warmup=}, {args.repeat=}")
    return args


def select_rows(args, grid) -> tuple[list[Row], set[str]]:
    plans: dict[str, str | None] = {f"paro-d{float(d):g}": None for d in PARO_DENSITIES.split(",")}
    for item in args.paro_plan:
        label, _, path = item.partition("=")
        if label not in plans or not path:
            raise SystemExit(f"--paro-plan: expected LABEL=FILE with LABEL one of {sorted(plans)}, "
                             f"got {item!r}")
        plans[label] = path
    args.paro_plans = plans
    rows = build_rows(plans, smoke=False, steps=args.steps, grid=grid)
    labels = [row.label for row in rows]
    if args.rows is not None:
        wanted = set(args.rows.split(","))
        if wanted - set(labels):
            raise SystemExit(f"--rows: unknown label(s) {sorted(wanted - set(labels))}; valid: {labels}")
        for row in rows:
            if row.label in wanted and row.control_of and row.control_of not in wanted:
                raise SystemExit(f"--rows: {row.label} needs {row.control_of}")
        rows = [row for row in rows if row.label in wanted or row.label == BASELINE]
    if args.check_loop is None:
        check = set(labels) if args.smoke else set(DEFAULT_CHECK_LOOP.split(","))
    else:
        check = set() if args.check_loop == "none" else set(args.check_loop.split(","))
    return rows, check


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("quality_speed times full-size Wan on a CUDA device; on the CPU run --smoke",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    torch.manual_seed(args.seed)
    metadata = collect_metadata(args, device, dtype)
    import diffusers

    spec = (SMOKE_MODELS if args.smoke else MODELS)[args.model]
    metadata.update(diffusers=diffusers.__version__, fastdit=fastdit.__version__,
                    model=spec.label, grid=list(spec.grid.shape), tokens=spec.grid.num_tokens,
                    num_steps=args.steps, guidance_scale=GUIDANCE, baseline=BASELINE,
                    args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()})
    rows, check = select_rows(args, spec.grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"quality_speed: {len(rows)} rows on {metadata['device_name']} ({device}), {dtype}; "
          f"whole-loop check: {sorted(check & {r.label for r in rows}) or 'none'}", flush=True)
    run = SpeedRun(args, device, dtype, metadata)
    threads = torch.get_num_threads()
    if args.smoke:  # OpenMP threads spin on a busy CPU: one thread times the tiny model steadily
        torch.set_num_threads(1)
    try:
        results = run.run(rows, check, lambda res, det: write_outputs(res, det, metadata, out))
    finally:
        torch.set_num_threads(threads)
        run.close()
    csv_path = write_outputs(results, run.details, metadata, out)
    plot(results, metadata, csv_path.with_suffix(".png"))
    print(format_table(results))
    print(f"wrote {csv_path.with_suffix('')}.{{csv,json,png}} "
          f"({time.perf_counter() - run.start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
