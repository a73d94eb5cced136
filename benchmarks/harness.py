"""What the benchmark scripts share: where results go, the flags every script takes, the timing
loops, and the helpers of ``fastdit bench`` (:mod:`fastdit.cli.bench`) they reuse.

Run a script as a module from the repository root, so that it benchmarks this checkout whether
fastdit is installed or not (``python -m`` puts the current folder first on the import path)::

    python -m benchmarks.e2e_bench --smoke
    torchrun --nproc-per-node 2 -m benchmarks.cp_bench --smoke

Run as a file (``python benchmarks/<script>.py``), a script says this and exits: its imports of
``benchmarks.*`` need the package, and no script puts a folder on ``sys.path``.

Results: each run writes into one folder, ``benchmarks/results/<gpu>_<date>/`` by default
(:func:`default_out`: ``h200_2026-12-02``; ``cpu_<date>`` without a GPU), ``--out`` picks another.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdit.cli.bench import (  # noqa: F401  (re-exported: the scripts take them from here)
    BLOCK_SIZE,
    SHAPES,
    SMOKE_SHAPES,
    Shape,
    Timing,
    banded_block_map,
    benchmark_ms,
    collect_metadata,
    describe_error,
    fastdit_backend,
    format_number,
    git_commit,
    output_stem,
    parse_list,
    random_block_map,
    write_outputs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "benchmarks" / "results"


# --------------------------------------------------------------------------- results folders
def device_slug(device_name: str | None) -> str:
    """``NVIDIA H200`` -> ``h200``, ``NVIDIA H100 80GB HBM3`` -> ``h100``; ``None`` -> ``cpu``."""
    if not device_name:
        return "cpu"
    words = re.sub(r"^(nvidia|amd)\s+", "", device_name.strip().lower()).split()
    return re.sub(r"[^a-z0-9]+", "-", words[0] if words else "gpu").strip("-") or "gpu"


def default_out(date: str | None = None) -> Path:
    """This run's results folder: ``benchmarks/results/<gpu>_<date>``, named after this process's
    GPU (``LOCAL_RANK`` under torchrun; ``cpu`` without one)."""
    import os

    name = (torch.cuda.get_device_name(int(os.environ.get("LOCAL_RANK", 0)))
            if torch.cuda.is_available() else None)
    return RESULTS_ROOT / f"{device_slug(name)}_{date or datetime.date.today().isoformat()}"


def stem(benchmark: str, metadata: dict) -> str:
    """``<benchmark>_<device-slug>[-smoke]_<date>``: the file names of one benchmark's outputs."""
    return f"{benchmark}_" + output_stem(metadata).removeprefix("kernel_bench_")


def pyplot():
    """matplotlib's pyplot on the Agg backend, or ``None`` with a notice when it is not installed."""
    from fastdit.cli.report import agg_pyplot

    plt = agg_pyplot()
    if plt is None:
        print("matplotlib not installed: no plot")
    return plt


# --------------------------------------------------------------------------- common flags
def add_out_argument(parser: argparse.ArgumentParser) -> None:
    """``--out``, the results folder, by default this run's :func:`default_out`."""
    parser.add_argument("--out", type=Path, default=default_out(),
                        help="results folder (default: benchmarks/results/<gpu>_<date>)")


def choose_models(parser: argparse.ArgumentParser, args: argparse.Namespace, models, smoke_models) -> None:
    """``args.models``: the comma list of ``--models`` checked against ``smoke_models`` with
    ``--smoke``, else ``models`` (every one of them when the flag is not given); a usage error
    naming the unknown ones."""
    known = smoke_models if args.smoke else models
    try:
        args.models = parse_list(args.models, tuple(known)) if args.models else list(known)
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--models: {exc}")


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepTiming:
    step_ms: list[float]
    timer_ms: list[float]  # what ``timer`` measured inside each step (attention, blocks, ...)
    output: torch.Tensor | None
    peak_mem_gib: float | None


def time_cfg_steps(model: torch.nn.Module, inputs, device: torch.device, *, step_index: int,
                   num_steps: int, timestep: float, warmup_forwards: int, repeat: int,
                   sdpa: Callable[[], contextlib.AbstractContextManager], timer) -> StepTiming:
    """``warmup_forwards`` untimed forwards (cond, uncond, cond, ...), then ``repeat`` timed
    classifier-free-guidance steps (a cond and an uncond forward, each in the diffusers
    ``cache_context`` the Wan pipeline's loop sets). ``inputs`` has ``latent``, ``text_cond`` and
    ``text_uncond``; ``timer`` (``collect_ms()``, ``remove()``, removed at the end) measures a
    part of each step. One ``timestep`` value for every row, so that outputs compare across
    methods (the cost of a forward does not depend on it; fastdit reads the step from the
    cache context)."""
    def forward(name: str) -> torch.Tensor:
        text = inputs.text_cond if name == "cond" else inputs.text_uncond
        with model.cache_context(name, step_index=step_index, num_inference_steps=num_steps):
            return model(hidden_states=inputs.latent, timestep=timestep_tensor,
                         encoder_hidden_states=text, return_dict=False)[0]

    step_ms, timer_ms, output = [], [], None
    try:
        timestep_tensor = torch.tensor([timestep], device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(), sdpa():
            for i in range(warmup_forwards):
                forward("cond" if i % 2 == 0 else "uncond")
            synchronize(device)
            timer.collect_ms()
            for _ in range(repeat):
                synchronize(device)
                start = time.perf_counter()
                output = forward("cond")
                forward("uncond")
                synchronize(device)
                step_ms.append((time.perf_counter() - start) * 1e3)
                timer_ms.append(timer.collect_ms())
    finally:
        timer.remove()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return StepTiming(step_ms, timer_ms, output, peak)


def accuracy(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(cosine similarity, relative L1) of ``out`` against ``ref`` over the whole tensor, fp64
    accumulation in chunks along the sequence (dim 1)."""
    dot = norm_out = norm_ref = diff = total = 0.0
    for i in range(0, out.shape[1], 4096):
        a, b = out[:, i : i + 4096].double(), ref[:, i : i + 4096].double()
        dot += (a * b).sum().item()
        norm_out += (a * a).sum().item()
        norm_ref += (b * b).sum().item()
        diff += (a - b).abs().sum().item()
        total += b.abs().sum().item()
    return dot / math.sqrt(norm_out * norm_ref), diff / total
