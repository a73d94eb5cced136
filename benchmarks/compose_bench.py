"""Past the attention ceiling: sparse attention composed with a step cache, torch.compile and INT8.

What it measures
----------------
The same full-size Wan2.1 transformers as ``e2e_bench.py`` (its ``MODELS``: Wan2.1-14B 720p x 81,
75,600 tokens, 40 layers; Wan2.1-1.3B 480p x 81, 32,760 tokens, 30 layers; random bf16 weights,
built in-process), but built with only a few of their blocks (``DEPTH``: 3 of 40, 4 of 30) so
that every combination fits one short GPU call. Every block of a Wan transformer has the same
shapes, so a forward is ``F + sum of its blocks``; hooks on ``condition_embedder`` (after) and
``norm_out`` (before), which ``compile_repeated_blocks`` leaves eager, time the block span ``B``
of each forward (CUDA events; no synchronisation inside it) and ``F = forward - B`` is the rest
(patch embedding, time/text embedding, output norm and projection). The full-depth step is

    full = F + B + (layers - depth) * steady_layer,   steady_layer = B / depth,

except for Radial's preset, whose first layer runs dense on the stock path:
``steady_layer = (B - stock_layer) / (depth - 1)`` with ``stock_layer`` the stock row's
``B / depth`` at the same compile setting. One step is classifier-free guidance: two forwards
(cond, uncond) inside the Wan pipeline's ``cache_context``, as in ``e2e_bench.py``.

Attention: ``stock-cudnn`` (diffusers' processors, SDPA forced to cuDNN); ``best-dense`` (dense
attention on FlashAttention-4's dense kernel through fastdit's ``Dense`` processor, as in
``e2e_bench.py``); ``radial`` (``Radial.preset("wan2.1-14b")``: 12 of 50 steps and layer 0 dense);
``adaspa`` (``AdaSpa()``: steps 0-9 dense, searches at 10 and 30, sparsity 0.8). The dense steps
of Radial and AdaSpa are one row, Radial's ``dense-step`` (the stock computation through
fastdit's processor, which runs eagerly under compile, so it is timed, not taken from the stock
row); Radial's sparse step separates its dense layer 0 with that row's layer time. AdaSpa's phases
(search step, sparse step, cached-LSE search step, late sparse step) run in step order on one
installation, as in ``e2e_bench.py``. Each fastdit row also runs with ``quantize="int8"`` (the
INT8 kernel for the sparse attention; AdaSpa's first search is a 16-bit dense pass either way, so
its int8 chain reuses that row), and everything runs again after
``transformer.compile_repeated_blocks()`` (regional torch.compile; fastdit's processors run
eagerly between the compiled graphs, see ``fastdit/pipelines/base.py``).

The step cache and its skip pattern
-----------------------------------
Cache decisions on random weights mean nothing, so the estimate uses a fixed pattern: the one of
``TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=10, use_lite_mode=True)``, a
config users can run (``fastdit generate --cache taylorseer:cache_interval=2,
disable_cache_before_step=10,use_lite_mode=true``): steps 0-9 computed, then every other step
computed: **skipped: 10, 12, ..., 48 (20 of 50)**. Why it is representative: the adaptive caches
(FirstBlockCache, MagCache, TeaCache) never skip the first steps (MagCache's default
``retention_ratio=0.2`` in diffusers: the first 20%) and skip at most a few steps in a row
(MagCache's ``max_skip_steps``), spreading the skips over the rest of the run; 40% skipped after a
20% warm-up is that shape. What the estimate depends on is the number of skipped steps and the
phase each skipped step would have been (a dense warm-up step of Radial, AdaSpa's search steps),
which it counts per method: of Radial's 12 dense steps only step 10 is skipped; AdaSpa's
search steps 10 and 30 are both skipped, so (fastdit's deferral, ``fastdit/methods/adaspa.py``)
step 11 runs the dense + LSE search and step 31 the cached-LSE search. A skipped step costs the
``cached`` row: the TaylorSeer-lite skip path (blocks return zeros, ``proj_out`` extrapolated),
timed for real with a TaylorSeer config that skips every forward after its warm-up;
FirstBlockCache would add one block per skipped step. The cache's bookkeeping on computed steps
(``proj_out``'s Taylor factors, a ``[1, S, 64]`` tensor) is not timed. The smoke mode checks the
pattern and AdaSpa's deferred searches against a real 50-step run of the tiny model with that
config (``check_step_kinds``; ``--check-step-kinds`` runs it in a GPU run too).

Estimates and shares
--------------------
Per (model, method, cache, compile, quantize): the 50-step transformer time (VAE, text encoder
and scheduler excluded) and its speedup over stock cuDNN without cache or compilation. For Radial
and AdaSpa the chain stock -> + sparsity -> + caching -> + compilation -> + quantization gives one
factor per source; their product is the total, and each source's share is
``log(factor) / log(total)`` (the order is the chain's: a source's factor depends on what came
before it). The plot stacks those factors per method on a log axis.

How to run
----------
    python -m benchmarks.compose_bench --budget-s 300     # both models, ~5-6 min on an H200
    python -m benchmarks.compose_bench --models wan14b-720p --no-compile
    python -m benchmarks.compose_bench --smoke --out /tmp/compose   # tiny model, CPU bf16
    python -m benchmarks.compose_bench --replot benchmarks/results/<gpu>_<date>/compose_bench_<gpu>_<date>.json

Rows run in priority order (14B eager, 14B compiled, then 1.3B); ``--budget-s`` skips the rows
that would start after that many seconds, with the reason, and results are written after every
model. Writes ``compose_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.e2e_bench import (  # noqa: E402
    MODELS,
    NUM_STEPS,
    RADIAL_PRESET,
    SMOKE_MODELS,
    TIMESTEP,
    AttentionTimer,
    ModelSpec,
    build_transformer,
    make_inputs,
    sdpa_context,
)
from benchmarks import harness  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    StepTiming,
    add_out_argument,
    choose_models,
    describe_error,
    git_commit,
    parse_list,
    stem,
)

import fastdit  # noqa: E402
from fastdit import AdaSpa, Radial  # noqa: E402
from fastdit.cli.bench import write_outputs  # noqa: E402
from fastdit.kernels import explain_backends  # noqa: E402
from fastdit.cli.report import agg_pyplot  # noqa: E402

ALL_METHODS = ("stock-cudnn", "best-dense", "radial", "adaspa")
# Blocks built per model (the estimate extrapolates to the published depth).
DEPTH = {"wan14b-720p": 3, "wan13b-480p": 4, "smoke-tiny": 2}
FULL_LAYERS = {name: spec.config["num_layers"] for name, spec in {**MODELS, **SMOKE_MODELS}.items()}
STOCK_STEP = 20
RADIAL = Radial.preset(RADIAL_PRESET)
ADASPA = AdaSpa()
# The fixed skip pattern: TaylorSeer's rule with these settings (module docstring).
CACHE_INTERVAL = 2
CACHE_WARMUP = 10
CACHE_SPEC = (f"taylorseer:cache_interval={CACHE_INTERVAL},disable_cache_before_step={CACHE_WARMUP},"
              "use_lite_mode=true")
QUANTIZE = "int8"
SOURCES = ("sparsity", "caching", "compilation", "quantization")
TARGET_MODEL, TARGET_SPEEDUP = "wan14b-720p", 2.5

CSV_FIELDS = (
    "kind", "model", "depth", "layers", "grid", "tokens", "dtype", "method", "phase", "step_index",
    "compiled", "quantize", "cache", "status", "source", "ms_step", "blocks_ms", "fixed_ms",
    "steady_layer_ms", "full_ms_step", "step_density", "repeats", "peak_mem_gib", "out_finite",
    "rel_diff_vs_stock", "graph_breaks", "unique_graphs", "e2e_s", "speedup_vs_cudnn",
    "computed_steps", "recipe", "factors", "shares", "wall_s", "error",
)


def cache_computes(step: int) -> bool:
    """Whether the fixed-pattern cache computes ``step`` (diffusers TaylorSeer's rule)."""
    return step < CACHE_WARMUP or (step - CACHE_WARMUP - 1) % CACHE_INTERVAL == 0


def cache_config():
    """The diffusers config whose skip pattern the estimate uses."""
    from diffusers.hooks import TaylorSeerCacheConfig

    return TaylorSeerCacheConfig(cache_interval=CACHE_INTERVAL,
                                 disable_cache_before_step=CACHE_WARMUP, use_lite_mode=True)


# --------------------------------------------------------------------------- step kinds
def step_kinds(method: str, num_steps: int = NUM_STEPS, cached: bool = False) -> list[str]:
    """Which timed row each of ``num_steps`` steps costs: ``cached`` for a step the cache skips,
    else the method's phase (``step``; Radial ``dense-step``/``sparse-step``; AdaSpa
    ``dense-step``/``search-step``/``sparse-step``/``cached-search-step``/``late-sparse-step``),
    following fastdit's rules (an AdaSpa search a skip misses runs at the next computed step)."""
    kinds = []
    searches = ADASPA.resolve_search_steps(num_steps)
    searched_at = None  # AdaSpa: the step of the search that chose the masks in force
    for step in range(num_steps):
        if cached and not cache_computes(step):
            kind = "cached"
        elif method in ("stock-cudnn", "best-dense"):
            kind = "step"
        elif method == "radial":
            kind = "dense-step" if step < RADIAL.dense_steps else "sparse-step"
        elif step < searches[0]:
            kind = "dense-step"
        elif searched_at is None:
            kind, searched_at = "search-step", step  # dense + LSE (scheduled or on demand)
        elif any(searched_at < s <= step for s in searches):
            kind, searched_at = "cached-search-step", step  # one mass pass, the cached LSE
        else:
            late = len(searches) > 1 and searched_at >= searches[1]
            kind = "late-sparse-step" if late else "sparse-step"
        kinds.append(kind)
    return kinds


def check_step_kinds() -> dict:
    """A real 50-step loop of the tiny Wan model (CPU, fp32) with fastdit and the fixed-pattern
    TaylorSeer config: the steps whose attention ran, and AdaSpa's searches, must be the ones
    ``step_kinds`` counts. Returns what was compared; raises AssertionError on a mismatch."""
    # The smoke model on a 3 x 4 x 4 grid: the check is about which steps run, not about sizes.
    spec = dataclasses.replace(SMOKE_MODELS["smoke-tiny"], latent=(1, 16, 3, 8, 8), text_len=8)
    device = torch.device("cpu")
    interpret = os.environ.pop("TRITON_INTERPRET", None)  # the reference kernels: fast on a CPU
    try:
        model = build_transformer(spec, device, torch.float32, seed=0)
        inputs = make_inputs(spec, device, torch.float32, seed=0)
        report = {}
        for method, fastdit_method in (("radial", RADIAL), ("adaspa", ADASPA)):
            handle = fastdit.apply(model, fastdit_method, cache=cache_config())
            try:
                with torch.inference_mode():
                    for step in range(NUM_STEPS):
                        for name, text in (("cond", inputs.text_cond), ("uncond", inputs.text_uncond)):
                            with model.cache_context(name, step_index=step, num_inference_steps=NUM_STEPS):
                                model(hidden_states=inputs.latent, timestep=torch.tensor([TIMESTEP]),
                                      encoder_hidden_states=text, return_dict=False)
                ran = sorted({step for (layer, step) in handle.state.densities if layer == 1})
                expected = [s for s, k in enumerate(step_kinds(method, cached=True)) if k != "cached"]
                assert ran == expected, f"{method}: attention ran at {ran}, expected {expected}"
                if method == "adaspa":
                    searches = sorted({(r["step"], r["kind"]) for r in handle.state.runtime.records})
                    kinds = step_kinds(method, cached=True)
                    counted = [(s, "dense-lse" if k == "search-step" else "cached-lse")
                               for s, k in enumerate(kinds) if k.endswith("search-step")]
                    assert searches == counted, f"adaspa searches {searches}, counted {counted}"
                    report["adaspa_searches"] = searches
                report[f"{method}_computed_steps"] = len(ran)
            finally:
                handle.remove()
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret
    return report


# --------------------------------------------------------------------------- timing
class SpanTimer(AttentionTimer):
    """Per forward: the span from ``condition_embedder``'s end to ``norm_out``'s start (the
    transformer blocks). Hooks on modules regional compilation leaves eager; CUDA events on the
    GPU, the wall clock on the CPU (e2e_bench's timer, opened and closed on two modules)."""

    def __init__(self, model, device: torch.device) -> None:  # noqa: D107 - no super(): other hooks
        self.device = device
        self.pending: list[tuple[object, object]] = []
        self._open: dict[int, object] = {}
        self.handles = [
            model.condition_embedder.register_forward_hook(lambda *a: self._start(model, ())),
            model.norm_out.register_forward_pre_hook(lambda *a: self._stop(model, (), None)),
        ]


def time_cfg_steps(model, inputs, device: torch.device, *, step_index: int, warmup: int,
                   repeat: int, sdpa) -> StepTiming:
    """``warmup`` untimed CFG steps, then ``repeat`` timed ones (cond + uncond forwards);
    ``timer_ms`` is the time inside the transformer blocks."""
    return harness.time_cfg_steps(model, inputs, device, step_index=step_index, num_steps=NUM_STEPS,
                                  timestep=TIMESTEP, warmup_forwards=2 * warmup, repeat=repeat,
                                  sdpa=sdpa, timer=SpanTimer(model, device))


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, unique graphs) dynamo counted so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"].get("unique_graphs", 0)


# --------------------------------------------------------------------------- one model
class ComposeRun:
    """One reduced-depth model: every (attention, compile, quantize) row, then freed."""

    def __init__(self, spec: ModelSpec, args, device, dtype, start: float) -> None:
        self.depth = min(DEPTH.get(spec.name, 2), spec.config["num_layers"])
        self.spec = dataclasses.replace(spec, config=dict(spec.config, num_layers=self.depth))
        self.name, self.layers = spec.name, FULL_LAYERS[spec.name]
        self.args, self.device, self.dtype, self.start = args, device, dtype, start
        self.warmup = spec.warmup if args.warmup is None else args.warmup
        self.repeat = spec.repeat if args.repeat is None else args.repeat
        self.rows: list[dict] = []
        self.reference = None
        self.compiled = False
        self.model = self.inputs = None

    # -- rows
    def new_row(self, method: str, phase: str, step_index, quantize=None, cache=None) -> dict:
        row = dict.fromkeys(CSV_FIELDS)
        row.update(kind="timing", model=self.name, depth=self.depth, layers=self.layers,
                   grid="x".join(map(str, self.spec.grid.shape)), tokens=self.spec.grid.num_tokens,
                   dtype=str(self.dtype).removeprefix("torch."), method=method, phase=phase,
                   step_index=step_index, compiled=self.compiled, quantize=quantize, cache=cache)
        self.rows.append(row)
        return row

    def skip(self, row: dict, reason: str) -> None:
        row.update(status="skipped", error=reason)
        log(row)

    def over_budget(self) -> str | None:
        budget = self.args.budget_s
        if budget is not None and time.perf_counter() - self.start > budget:
            return f"time budget spent (--budget-s {budget:g})"
        return None

    def measure(self, row: dict, step_index: int, sdpa=None, handle=None) -> None:
        reason = self.over_budget()
        if reason:
            self.skip(row, reason)
            return
        wall = time.perf_counter()
        breaks, graphs = dynamo_counts()
        try:
            timing = time_cfg_steps(self.model, self.inputs, self.device, step_index=step_index,
                                    warmup=self.warmup, repeat=self.repeat,
                                    sdpa=sdpa or sdpa_context(self.sdpa_name, self.device))
        except Exception as exc:  # one failing row must not end the run
            row.update(status="error", error=describe_error(exc),
                       wall_s=round(time.perf_counter() - wall, 1))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            log(row)
            return
        ms, blocks = statistics.median(timing.step_ms), statistics.median(timing.timer_ms)
        out = timing.output.float()
        after_breaks, after_graphs = dynamo_counts()
        row.update(status="ok", source="measured", ms_step=ms, blocks_ms=blocks,
                   fixed_ms=ms - blocks, repeats=len(timing.step_ms),
                   peak_mem_gib=timing.peak_mem_gib, out_finite=bool(torch.isfinite(out).all()),
                   graph_breaks=after_breaks - breaks, unique_graphs=after_graphs - graphs,
                   wall_s=round(time.perf_counter() - wall, 1))
        if handle is not None:
            recorded = [d for (_, step), d in handle.state.densities.items() if step == step_index]
            row["step_density"] = sum(recorded) / len(recorded) if recorded else None
        elif row["phase"] != "cached":
            row["step_density"] = 1.0
        if self.reference is None and row["method"] == "stock-cudnn" and not self.compiled:
            self.reference = timing.output.detach().float().clone()
        if self.reference is not None and row["phase"] != "cached":
            row["rel_diff_vs_stock"] = ((out - self.reference).abs().max()
                                        / self.reference.abs().max()).item()
        log(row)

    @property
    def sdpa_name(self) -> str | None:
        return "CUDNN_ATTENTION" if self.device.type == "cuda" else None

    # -- the rows of one compile setting
    def run_pass(self, methods: list[str]) -> None:
        if "stock-cudnn" in methods:
            self.measure(self.new_row("stock-cudnn", "step", STOCK_STEP), STOCK_STEP)
        if "best-dense" in methods:
            # Dense attention on the fastest backend fastdit has (FA4's dense kernel on Hopper),
            # through fastdit's Dense processor: e2e_bench's best-dense baseline.
            self.run_fastdit("best-dense", fastdit.Dense(), [("step", STOCK_STEP)], None)
        for quantize in (None, QUANTIZE):
            if "radial" in methods or "adaspa" in methods:
                # Radial's dense step (every layer through fastdit's processor to the stock path)
                # is every sparse method's dense warm-up step; it has no sparse attention to
                # quantize. Its sparse step: layer 0 dense, the others on Radial's plan.
                phases = [("sparse-step", RADIAL.dense_steps)]
                if quantize is None:
                    phases.insert(0, ("dense-step", 0))
                if "radial" not in methods:
                    phases = phases[:1] if quantize is None else []
                if phases:
                    self.run_fastdit("radial", RADIAL, phases, quantize)
            if "adaspa" in methods:
                searches = ADASPA.resolve_search_steps(NUM_STEPS)
                phases = [("search-step", searches[0]), ("sparse-step", searches[0] + 1),
                          ("cached-search-step", searches[1]), ("late-sparse-step", searches[1] + 1)]
                self.run_fastdit("adaspa", ADASPA, phases, quantize)
        self.run_cached()

    def fastdit_unavailable(self, quantize) -> str | None:
        if quantize is not None and self.dtype not in (torch.bfloat16, torch.float16):
            return f"quantize={quantize!r} needs bf16/fp16 (this run is {self.dtype})"
        if self.device.type != "cuda":
            return None
        reason = explain_backends(self.device, self.dtype,
                                  self.spec.config["attention_head_dim"]).get("triton")
        return f"fastdit Triton kernel cannot run: {reason}" if reason else None

    def run_fastdit(self, method: str, fastdit_method, phases, quantize) -> None:
        """``phases`` in step order on one installation. With int8, AdaSpa's first search (a
        16-bit dense pass) runs untimed to set the state up; its time is the bf16 row's."""
        reason = self.fastdit_unavailable(quantize)
        handle = None
        if reason is None:
            try:
                handle = fastdit.apply(self.model, fastdit_method, quantize=quantize)
            except Exception as exc:
                reason = f"fastdit.apply: {describe_error(exc)}"
        try:
            for phase, step in phases:
                if quantize is not None and phase == "search-step":
                    if handle is not None and not self.over_budget():
                        time_cfg_steps(self.model, self.inputs, self.device, step_index=step,
                                       warmup=1, repeat=0,
                                       sdpa=sdpa_context(self.sdpa_name, self.device))
                    continue
                row = self.new_row(method, phase, step, quantize)
                if reason:
                    self.skip(row, reason)
                    continue
                self.measure(row, step, handle=handle)
        finally:
            if handle is not None:
                handle.remove()

    def run_cached(self) -> None:
        """A step the cache skips: TaylorSeer lite with a pattern that skips every forward after
        its warm-up (per CFG context: computes 0 and 2, skips 1 and 3 on), so the timed steps
        are skips. The skip path runs no attention: one row serves every method."""
        from diffusers.hooks import TaylorSeerCacheConfig

        row = self.new_row("any", "cached", STOCK_STEP, cache="taylorseer-lite skip")
        reason = self.over_budget()
        if reason:
            self.skip(row, reason)
            return
        config = TaylorSeerCacheConfig(cache_interval=10**6, disable_cache_before_step=1,
                                       use_lite_mode=True)
        self.model.enable_cache(config)
        warmup = self.warmup
        try:
            self.warmup = max(warmup, 3)  # forwards 0-2 of each context compute or set up
            self.measure(row, STOCK_STEP)
        finally:
            self.warmup = warmup
            self.model.disable_cache()
        if row["status"] == "ok":
            row["step_density"] = None

    def run(self, methods: list[str]) -> list[dict]:
        wall = time.perf_counter()
        try:
            self.model = build_transformer(self.spec, self.device, self.dtype, self.args.seed)
        except Exception as exc:
            row = self.new_row("model", "build", None)
            row.update(status="error", error=f"model build: {describe_error(exc)}")
            log(row)
            return self.rows
        self.inputs = make_inputs(self.spec, self.device, self.dtype, self.args.seed)
        print(f"[{self.name}] built {self.depth} of {self.layers} layers, grid "
              f"{self.spec.grid.shape} = {self.spec.grid.num_tokens} tokens "
              f"({time.perf_counter() - wall:.1f} s); warm-up {self.warmup} steps, "
              f"{self.repeat} timed steps", flush=True)
        self.run_pass(methods)
        if self.args.no_compile:
            return self.rows
        reason = self.over_budget()
        if reason is None:
            try:
                self.model.compile_repeated_blocks()
                self.compiled = True
            except Exception as exc:
                reason = f"compile_repeated_blocks: {describe_error(exc)}"
        if reason is not None:
            self.compiled = True
            for method in methods:
                self.skip(self.new_row(method, "all", None), reason)
            return self.rows
        self.run_pass(methods)
        return self.rows

    def close(self) -> None:
        self.model = self.inputs = self.reference = None
        gc.collect()
        torch._dynamo.reset()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def log(row: dict) -> None:
    flags = f"{'compiled' if row['compiled'] else 'eager':<8} {row['quantize'] or 'bf16':<5}"
    head = f"[{row['model']}] {row['method']:<12}{row['phase']:<19}{flags}"
    if row["status"] != "ok":
        print(f"{head} {row['status'].upper()}: {(row['error'] or '')[:200]}", flush=True)
        return
    density = "" if row["step_density"] is None else f"  density {row['step_density']:.3f}"
    diff = "" if row["rel_diff_vs_stock"] is None else f"  diff {row['rel_diff_vs_stock']:.1e}"
    graphs = f"  graphs {row['unique_graphs']} breaks {row['graph_breaks']}" if row["compiled"] else ""
    print(f"{head} {row['ms_step']:10.1f} ms/step (blocks {row['blocks_ms']:.1f}){density}{diff}"
          f"{graphs}  ({row['wall_s']} s)", flush=True)


# --------------------------------------------------------------------------- estimates
def extrapolate(rows: list[dict]) -> None:
    """``full_ms_step`` of every measured row (module docstring), in place."""
    for row in rows:
        if row["status"] != "ok" or row["kind"] != "timing":
            continue
        depth, layers = row["depth"], row["layers"]
        steady = row["blocks_ms"] / depth
        if row["method"] == "radial" and row["phase"] == "sparse-step" and depth > 1:
            # Layer 0 runs dense through fastdit's processor: Radial's dense step's layer time.
            dense = find(rows, row["model"], "radial", "dense-step", row["compiled"], None)
            if dense is None or dense["status"] != "ok":
                row.update(full_ms_step=None, error="no dense-step row to separate Radial's dense layer")
                continue
            dense_layers = RADIAL.dense_layers
            steady = (row["blocks_ms"] - dense_layers * dense["blocks_ms"] / depth) / (depth - dense_layers)
        row["steady_layer_ms"] = steady
        row["full_ms_step"] = row["ms_step"] + (layers - depth) * steady


def find(rows, model, method, phase, compiled, quantize):
    return next((r for r in rows if r["kind"] == "timing" and r["model"] == model
                 and r["method"] == method and r["phase"] == phase
                 and bool(r["compiled"]) == bool(compiled) and r["quantize"] == quantize), None)


def phase_row(rows, model, method, kind, compiled, quantize):
    """The timed row a step of ``kind`` costs (dense steps are the stock row; AdaSpa's first
    search is 16-bit whatever the quantization; a cached step is method-independent)."""
    if kind == "cached":
        return find(rows, model, "any", "cached", compiled, None)
    if kind == "dense-step":  # every layer through fastdit's processor to the stock path
        return find(rows, model, "radial", "dense-step", compiled, None)
    if kind == "search-step":
        quantize = None
    return find(rows, model, method, kind, compiled, quantize)


def estimate(rows, model, method, cached, compiled, quantize) -> dict:
    row = dict.fromkeys(CSV_FIELDS)
    kinds = step_kinds(method, NUM_STEPS, cached)
    counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    row.update(kind="estimate", model=model, method=method, phase=f"e2e-{NUM_STEPS}-steps",
               compiled=compiled, quantize=quantize, cache=CACHE_SPEC if cached else None,
               computed_steps=NUM_STEPS - counts.get("cached", 0), source="estimate",
               recipe=", ".join(f"{n} x {kind}" for kind, n in counts.items()))
    total = 0.0
    for kind, n in counts.items():
        part = phase_row(rows, model, method, kind, compiled, quantize)
        if part is None or part["status"] != "ok" or part["full_ms_step"] is None:
            why = "not run" if part is None else (part["error"] or part["status"])
            row.update(status="n/a", error=f"{kind}: {why}")
            return row
        total += n * part["full_ms_step"]
    row.update(status="ok", e2e_s=total / 1e3)
    return row


def estimate_rows(rows: list[dict]) -> list[dict]:
    estimates = []
    for model in dict.fromkeys(r["model"] for r in rows):
        per_model = []
        for method in ALL_METHODS:
            quantizations = (None, QUANTIZE) if method in ("radial", "adaspa") else (None,)
            for compiled in (False, True):
                for quantize in quantizations:
                    for cached in (False, True):
                        per_model.append(estimate(rows, model, method, cached, compiled, quantize))
        base = next((e for e in per_model if e["method"] == "stock-cudnn" and not e["cache"]
                     and not e["compiled"] and e["status"] == "ok"), None)
        for e in per_model:
            if base is not None and e["status"] == "ok":
                e["speedup_vs_cudnn"] = base["e2e_s"] / e["e2e_s"]
        estimates += per_model
    return estimates


def share_rows(estimates: list[dict]) -> list[dict]:
    """Per (model, sparse method): stock -> +sparsity -> +caching -> +compilation ->
    +quantization, each source's factor and its share of the log of the total."""
    shares = []
    for model in dict.fromkeys(e["model"] for e in estimates):
        def get(method, cached, compiled, quantize):
            e = next((e for e in estimates if e["model"] == model and e["method"] == method
                      and bool(e["cache"]) == cached and e["compiled"] == compiled
                      and e["quantize"] == quantize), None)
            return e if e is not None and e["status"] == "ok" else None

        stock = get("stock-cudnn", False, False, None)
        for method in ("radial", "adaspa"):
            chain = [stock, get(method, False, False, None), get(method, True, False, None),
                     get(method, True, True, None), get(method, True, True, QUANTIZE)]
            row = dict.fromkeys(CSV_FIELDS)
            row.update(kind="share", model=model, method=method, phase="chain",
                       cache=CACHE_SPEC, compiled=True, quantize=QUANTIZE)
            factors = {}
            for source, (before, after) in zip(SOURCES, zip(chain, chain[1:])):
                if before is None or after is None:
                    break
                factors[source] = before["e2e_s"] / after["e2e_s"]
            if not factors:
                row.update(status="n/a", error="stock or sparse estimate missing")
                shares.append(row)
                continue
            total = math.prod(factors.values())
            row.update(status="ok" if len(factors) == len(SOURCES) else "partial",
                       speedup_vs_cudnn=total, factors=factors,
                       e2e_s=stock["e2e_s"] / total,
                       shares={s: (math.log(f) / math.log(total) if total != 1 else None)
                               for s, f in factors.items()})
            if len(factors) < len(SOURCES):
                row["error"] = f"chain stops before {SOURCES[len(factors)]} (estimate missing)"
            shares.append(row)
    return shares


def verdicts(estimates: list[dict], metadata: dict) -> list[str]:
    """The target's verdict on the fastest combination of any method, cache, compilation and
    quantization (not only the full chain: INT8 can be slower than bf16 on FA4)."""
    lines = []
    best = max((e for e in estimates if e["model"] == TARGET_MODEL and e["status"] == "ok"
                and e.get("speedup_vs_cudnn") is not None),
               key=lambda e: e["speedup_vs_cudnn"], default=None)
    if metadata.get("smoke"):
        lines.append(f"N/A   {TARGET_MODEL} >= {TARGET_SPEEDUP}x over stock cuDNN: smoke run")
    elif best is None:
        lines.append(f"N/A   {TARGET_MODEL} >= {TARGET_SPEEDUP}x over stock cuDNN: no estimate")
    else:
        status = "PASS" if best["speedup_vs_cudnn"] >= TARGET_SPEEDUP else "MISS"
        recipe = " + ".join([best["method"]] + (["cache"] if best["cache"] else [])
                            + (["compile"] if best["compiled"] else [])
                            + [best["quantize"] or "bf16"])
        lines.append(f"{status:<5} {TARGET_MODEL} >= {TARGET_SPEEDUP}x over stock cuDNN (50-step "
                     f"estimate): best {recipe} = {best['speedup_vs_cudnn']:.2f}x (quality cost: "
                     "measured on the trained model, not here)")
    return lines


# --------------------------------------------------------------------------- output
def format_tables(rows, estimates, shares) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines.append(f"\n== {model}: timed rows (ms per CFG step at depth; full = extrapolated) ==")
        lines.append(f"{'method':<12}{'phase':<19}{'mode':<15}{'ms':>9}{'blocks':>9}{'full ms':>10}"
                     f"{'density':>9}{'diff':>9}")
        for r in (r for r in rows if r["model"] == model):
            mode = f"{'compiled' if r['compiled'] else 'eager'} {r['quantize'] or 'bf16'}"
            if r["status"] != "ok":
                lines.append(f"{r['method']:<12}{r['phase']:<19}{mode:<15}{r['status']}: "
                             f"{(r['error'] or '')[:90]}")
                continue
            lines.append(f"{r['method']:<12}{r['phase']:<19}{mode:<15}{r['ms_step']:>9.1f}"
                         f"{r['blocks_ms']:>9.1f}{fmt(r['full_ms_step'], '.1f'):>10}"
                         f"{fmt(r['step_density'], '.3f'):>9}{fmt(r['rel_diff_vs_stock'], '.1e'):>9}")
        lines.append(f"\n== {model}: {NUM_STEPS}-step estimates (cache: {CACHE_SPEC}, skips "
                     f"{NUM_STEPS - sum(map(cache_computes, range(NUM_STEPS)))} steps) ==")
        lines.append(f"{'method':<12}{'cache':<7}{'mode':<15}{'total s':>9}{'x cuDNN':>9}  recipe")
        for e in (e for e in estimates if e["model"] == model):
            mode = f"{'compiled' if e['compiled'] else 'eager'} {e['quantize'] or 'bf16'}"
            cache = "yes" if e["cache"] else "no"
            if e["status"] != "ok":
                lines.append(f"{e['method']:<12}{cache:<7}{mode:<15}N/A: {e['error']}")
                continue
            lines.append(f"{e['method']:<12}{cache:<7}{mode:<15}{e['e2e_s']:>9.1f}"
                         f"{fmt(e['speedup_vs_cudnn'], '.2f'):>9}  {e['recipe']}")
        lines.append(f"\n== {model}: speedup by source (chain {' -> '.join(SOURCES)}) ==")
        for s in (s for s in shares if s["model"] == model):
            if not s["factors"]:
                lines.append(f"{s['method']:<8} N/A: {s['error']}")
                continue
            parts = ", ".join(f"{source} x{f:.2f} ({s['shares'][source] * 100:.0f}%)"
                              if s["shares"][source] is not None else f"{source} x{f:.2f}"
                              for source, f in s["factors"].items())
            lines.append(f"{s['method']:<8} total x{s['speedup_vs_cudnn']:.2f}: {parts}"
                         + (f"  [{s['error']}]" if s["error"] else ""))
    return "\n".join(lines)


COLORS = {"sparsity": "tab:orange", "caching": "tab:green", "compilation": "tab:blue",
          "quantization": "tab:purple"}


def plot(all_rows: list[dict], metadata: dict, path: Path) -> None:
    """Per model: the speedup chain of each sparse method stacked by source on a log axis (each
    segment's height is log(factor), labelled with the factor and its share), and every
    estimate's speedup over stock cuDNN."""
    plt = agg_pyplot()
    if plt is None:
        return
    estimates = [r for r in all_rows if r["kind"] == "estimate"]
    shares = [r for r in all_rows if r["kind"] == "share"]
    models = list(dict.fromkeys(r["model"] for r in all_rows if r["kind"] == "estimate"))
    if not models:
        return
    fig, axes = plt.subplots(len(models), 2, figsize=(15, 4.8 * len(models)), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2.4]})
    for (ax_stack, ax_all), model in zip(axes, models):
        chains = [s for s in shares if s["model"] == model and s["factors"]]
        width = 0.8 / len(SOURCES)
        for i, chain in enumerate(chains):
            # A waterfall: each source's bar starts where the previous one ended (log axis, so
            # heights are the factors); a factor below 1 (a slowdown) is hatched and goes down.
            level = 1.0
            for j, (source, factor) in enumerate(chain["factors"].items()):
                x = i - 0.4 + (j + 0.5) * width
                low, high = sorted((level, level * factor))
                ax_stack.bar(x, high - low, bottom=low, width=width * 0.95, color=COLORS[source],
                             hatch="//" if factor < 1 else None, edgecolor="white",
                             label=source if i == 0 else None)
                share = chain["shares"][source]
                text = f"x{factor:.2f}" + (f"\n{share * 100:.0f}%" if share is not None else "")
                ax_stack.text(x, high, text, ha="center", va="bottom", fontsize=6)
                level *= factor
            ax_stack.text(i, level, f"total x{chain['speedup_vs_cudnn']:.2f}", ha="center",
                          va="top", fontsize=8, fontweight="bold")
        ax_stack.set_yscale("log")
        ax_stack.axhline(1.0, color="black", linewidth=0.8)
        ax_stack.set_xticks(range(len(chains)), [c["method"] for c in chains])
        ax_stack.set_ylabel("cumulative speedup over stock cuDNN (log)")
        ax_stack.set_title(f"{model}: speedup by source, share = log(factor) / log(total)\n"
                           f"(chain: {' -> '.join(SOURCES)})", fontsize=9)
        ax_stack.legend(fontsize=7, loc="best")
        ax_stack.margins(y=0.15)
        ax_stack.grid(True, axis="y", alpha=0.3, which="both")

        ok = [e for e in estimates if e["model"] == model and e["status"] == "ok"]
        labels = ["+".join([e["method"]] + ["cache"] * bool(e["cache"])
                           + ["compile"] * bool(e["compiled"]) + [e["quantize"]] * bool(e["quantize"]))
                  for e in ok]
        colors = ["tab:green" if e["cache"] else "tab:gray" for e in ok]
        ax_all.bar(range(len(ok)), [e["speedup_vs_cudnn"] for e in ok], color=colors, alpha=0.8)
        for i, e in enumerate(ok):
            ax_all.text(i, e["speedup_vs_cudnn"], f"{e['speedup_vs_cudnn']:.2f}", ha="center",
                        va="bottom", fontsize=6)
        ax_all.axhline(1.0, color="black", linewidth=0.8)
        if model == TARGET_MODEL:
            ax_all.axhline(TARGET_SPEEDUP, color="tab:red", linestyle="--", linewidth=1,
                           label=f"target {TARGET_SPEEDUP}x")
            ax_all.legend(fontsize=7)
        ax_all.set_xticks(range(len(ok)), labels, fontsize=6, rotation=60, ha="right")
        ax_all.set_ylabel(f"{NUM_STEPS}-step speedup over stock cuDNN")
        ax_all.set_title(f"{model}: every combination (green: with the fixed-pattern cache, "
                         f"{NUM_STEPS - sum(map(cache_computes, range(NUM_STEPS)))} of "
                         f"{NUM_STEPS} steps skipped)", fontsize=9)
        ax_all.grid(True, axis="y", alpha=0.3)
    fig.suptitle(f"fastdit compose_bench: {metadata['device_name']}, {metadata['dtype']}, torch "
                 f"{metadata['torch']}, diffusers {metadata['diffusers']}, {metadata['date']} "
                 f"(reduced depth, extrapolated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect_metadata(args, device: torch.device, dtype: torch.dtype) -> dict:
    import diffusers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return dict(
        date=datetime.date.today().isoformat(), device_type=device.type, device_name=name,
        torch=torch.__version__, diffusers=diffusers.__version__, fastdit=fastdit.__version__,
        cuda=torch.version.cuda, python=platform.python_version(), git_commit=git_commit(),
        dtype=str(dtype).removeprefix("torch."), smoke=args.smoke, num_steps=NUM_STEPS,
        depth=DEPTH, cache=CACHE_SPEC,
        cache_skipped_steps=[s for s in range(NUM_STEPS) if not cache_computes(s)],
        radial=repr(RADIAL), adaspa=repr(ADASPA), quantize=QUANTIZE,
        step_kinds={m: step_kinds(m, NUM_STEPS, True) for m in ("radial", "adaspa")},
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    )


def output_stem(metadata: dict) -> str:
    return stem("compose_bench", metadata)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sparse attention x step cache x torch.compile x INT8 on full-size Wan2.1 "
        "(reduced depth, extrapolated): 50-step estimates and each source's share.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default=None,
                        help=f"comma list of {list(MODELS)} (default: all; --smoke: {list(SMOKE_MODELS)})")
    parser.add_argument("--methods", default=",".join(ALL_METHODS),
                        type=lambda s: parse_list(s, ALL_METHODS), help=f"comma list of {list(ALL_METHODS)}")
    parser.add_argument("--repeat", type=int, default=None, help="timed CFG steps per row (default per model)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up CFG steps per row (default per model)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled pass")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip rows that would start after this many seconds (default: no limit)")
    add_out_argument(parser)
    parser.add_argument("--check-step-kinds", action="store_true",
                        help="check the step-kind model against a real 50-step tiny-model loop "
                        "on the CPU (always with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model, on the CPU in bf16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", type=Path, metavar="JSON", help="redraw an earlier run's plot and exit")
    args = parser.parse_args(argv)
    choose_models(parser, args, MODELS, SMOKE_MODELS)
    # The target first: a run cut short by the budget still has it.
    args.models.sort(key=lambda m: m != TARGET_MODEL)
    if "stock-cudnn" not in args.methods:
        args.methods = ["stock-cudnn", *args.methods]  # every speedup is relative to it
    if (args.repeat is not None and args.repeat < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--repeat must be >= 1 and --warmup >= 0")
    if args.smoke:  # plumbing, not timings: one warm-up and one timed step per row
        args.repeat = 1 if args.repeat is None else args.repeat
        args.warmup = 1 if args.warmup is None else args.warmup
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot(saved["results"], saved["metadata"], args.replot.with_suffix(".png"))
        rows = [r for r in saved["results"] if r["kind"] == "timing"]
        print(format_tables(rows, [r for r in saved["results"] if r["kind"] == "estimate"],
                            [r for r in saved["results"] if r["kind"] == "share"]))
        return
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    dtype = torch.bfloat16  # the INT8 kernel needs 16-bit inputs; the smoke run too
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # fastdit's PyTorch reference: fast on a CPU
    metadata = collect_metadata(args, device, dtype)
    print(f"device {metadata['device_name']} ({device}), {metadata['dtype']}; models {args.models}; "
          f"methods {args.methods}; cache pattern {CACHE_SPEC}: skips "
          f"{metadata['cache_skipped_steps']}", flush=True)
    if args.smoke or args.check_step_kinds:
        check = time.perf_counter()
        metadata["step_kind_check"] = check_step_kinds()
        print(f"step-kind check (tiny model, real 50-step loop with the cache): passed "
              f"{metadata['step_kind_check']} ({time.perf_counter() - check:.1f} s)", flush=True)
    specs = [(SMOKE_MODELS if args.smoke else MODELS)[name] for name in args.models]
    rows: list[dict] = []
    for spec in specs:
        run = ComposeRun(spec, args, device, dtype, start)
        try:
            rows += run.run(args.methods)
        finally:
            run.close()
            del run
        extrapolate(rows)
        estimates = estimate_rows(rows)
        shares = share_rows(estimates)
        metadata["elapsed_s"] = round(time.perf_counter() - start, 1)
        metadata["verdicts"] = verdicts(estimates, metadata)
        paths = write_outputs(rows + estimates + shares, metadata, args.out, output_stem(metadata),
                              fields=CSV_FIELDS, plot=plot)
        print(f"[{spec.name}] done at {metadata['elapsed_s']} s; results so far in {paths[1]}",
              flush=True)
    print(format_tables(rows, estimates, shares))
    print("\n== target ==\n" + "\n".join(metadata["verdicts"]))
    print(f"\nelapsed {metadata['elapsed_s']} s; wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
