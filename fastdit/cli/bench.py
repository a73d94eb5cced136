"""``fastdit bench``: fastdit block-sparse attention against dense SDPA, FlexAttention, xformers.

What it measures
----------------
Forward attention at the token counts of Wan2.1 video diffusion (B=1, bf16, head dim 128):

* ``wan13b-480p``: S = 32,760 tokens, 12 heads (Wan2.1-1.3B, 480p, 81 frames)
* ``wan14b-720p``: S = 75,600 tokens, 40 heads (Wan2.1-14B, 720p, 81 frames)

Neither length is a multiple of the 128-token block, so every kernel also handles a ragged edge.
For each shape, in one run:

* dense baselines: torch SDPA with the cuDNN backend and with the flash backend ((B, H, S, D)
  contiguous; they cannot skip blocks), xformers' ``memory_efficient_attention`` ((B, S, H, D);
  when xformers is installed, else the row says so), and fastdit with a dense plan in diffusers'
  native (B, S, H, D) layout and in (B, H, S, D);
* for each mask kind and target density (default 1, 0.5, 0.25, 0.125):
  - ``random``: per head, every query-block row keeps ``round(density * nK)`` key blocks chosen at
    random, always including the diagonal block;
  - ``banded``: blocks with ``|p - q| <= w``, ``w`` chosen so the density is closest to the target
    (same map for all heads);
  timed with fastdit ``block_sparse_attention`` ((B, S, H, D)) and with compiled FlexAttention
  ((B, H, S, D)) given a BlockMask built from the same plan (all kept blocks as full blocks, so
  Flex does no mask_mod work; it bounds-checks the ragged last block itself);
* the time to build a plan (``BlockSparsity.from_block_map`` on a GPU block map).

Per (shape, mask, density, backend) it reports the median time of
``triton.testing.do_bench`` (L2 flushed between calls; inputs rotate over a few random sets),
TFLOP/s counted on computed blocks only (``4 * computed_pairs * D``, dense SDPA counts S*S), the
speedup over cuDNN dense at the same shape, and correctness: the max abs error against an fp32
reference on sampled query blocks (first, middle, last: the ragged one) and the max abs
difference to a peer on the full output (fastdit sparse <-> Flex on the same mask; fastdit dense
and flash -> cuDNN).

Targets (evaluated at the end, PASS/MISS per shape and mask kind)
-----------------------------------------------------------------
* fastdit with a dense plan reaches >= 0.80x cuDNN SDPA throughput;
* at 25% density fastdit is >= 1.5x faster than FlexAttention on the same mask
  and >= 3.0x faster than cuDNN dense attention;
* building a plan takes less time than one dense attention call.

How to run
----------
    fastdit bench                                          # both shapes: ~80 s on an H100
    fastdit bench --shapes wan13b-480p --masks random --backends fastdit,flex
    fastdit bench --smoke                                  # tiny shapes, any device (CPU: fp32)
    fastdit bench --replot bench-results/kernel_bench_<gpu>_<date>.json
    python -m benchmarks.kernel_bench ...                  # the same, into benchmarks/results/<gpu>_<date>

It is a GPU benchmark: without CUDA it refuses (exit 2) unless ``--smoke`` (tiny shapes, fp32,
through fastdit's PyTorch reference, or Triton's interpreter when ``TRITON_INTERPRET=1``; this
checks the benchmark itself, its times mean nothing) or ``--replot``.

Writes ``kernel_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out`` (default
``bench-results``; ``benchmarks/results/<gpu>_<date>`` for the script) and prints a summary table and the
target verdicts last. The plot needs matplotlib (skipped with a notice without it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import itertools
import json
import math
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import importlib.util

import torch
import torch.nn.functional as F

from . import peers
from ..kernels import BlockSparsity, block_sparse_attention, explain_backends
from ..kernels.backend import explain_calls

__all__ = ["DEFAULT_OUT", "DESCRIPTION", "SHAPES", "SMOKE_SHAPES", "add_arguments", "main",
           "run_bench"]

# Where the package lives: the checkout (for the git commit in the metadata), if it is one.
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("bench-results")
DESCRIPTION = (
    "Time fastdit block-sparse attention against dense SDPA (cuDNN, flash), FlexAttention on the\n"
    "same masks and xformers (when installed), at Wan2.1 token counts; print a table, write\n"
    "CSV/JSON and a plot. GPU only: on a CPU use --smoke (tiny shapes through the PyTorch\n"
    "reference or TRITON_INTERPRET=1) or --replot."
)

BLOCK_SIZE = 128
# fastdit: the backend fastdit picks (FA4 where it can); fastdit-triton: fastdit's own kernel.
# Peers: fa4 (dense and block-sparse), fa3 (dense), flex (Triton), flex-flash (FA4 through Flex),
# sage (SageAttention 1.x, dense), SDPA cudnn/flash, xformers.
ALL_BACKENDS = ("fastdit", "fastdit-triton", "fa4", "fa3", "flex", "flex-flash", "sage", "cudnn",
                "flash", "xformers")
# fastdit's time over FA4's on the same map (dense and block-sparse): the backends issue's target.
VS_FA4_TARGET = 1.03
ALL_MASKS = ("random", "banded")
# Relative error (max abs error / max |reference|) accepted by the correctness line: bf16 and
# fp16 outputs round at ~2**-9 relative; a wrong block set shifts outputs by several percent.
REL_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}
# Thresholds of the issue's targets.
DENSE_THROUGHPUT_TARGET = 0.80
TARGET_DENSITY = 0.25
VS_FLEX_TARGET = 1.5
VS_CUDNN_TARGET = 3.0

CSV_FIELDS = (
    "shape", "seq_len", "heads", "head_dim", "dtype", "mask", "target_density", "density",
    "backend", "executor", "layout", "status", "ms", "tflop_per_call", "tflops", "speedup_vs_cudnn",
    "err_vs_ref", "rel_err_vs_ref", "peer", "diff_vs_peer", "plan_build_ms", "error",
)


@dataclass(frozen=True)
class Shape:
    name: str
    seq_len: int
    heads: int
    head_dim: int
    batch: int = 1


SHAPES = {
    s.name: s
    for s in (
        Shape("wan13b-480p", seq_len=32_760, heads=12, head_dim=128),
        Shape("wan14b-720p", seq_len=75_600, heads=40, head_dim=128),
    )
}
# Ragged lengths on purpose (300 = 2 * 128 + 44, 1000 = 7 * 128 + 104, 1900 = 14 * 128 + 108);
# smoke-300 is small enough for Triton's interpreter on a CPU (the tests run it).
SMOKE_SHAPES = {
    s.name: s
    for s in (
        Shape("smoke-300", seq_len=300, heads=1, head_dim=32),
        Shape("smoke-1k", seq_len=1000, heads=2, head_dim=64),
        Shape("smoke-2k", seq_len=1900, heads=3, head_dim=64),
    )
}


@dataclass(frozen=True)
class Timing:
    warmup_ms: float
    rep_ms: float
    min_reps: int
    plan_repeats: int


# ------------------------------------------------------------------------------------ masks


def random_block_map(
    heads: int, num_blocks: int, density: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """``[1, H, n, n]``: each row keeps ``round(density * n)`` random blocks, diagonal included."""
    keep = max(1, round(density * num_blocks))
    scores = torch.rand(heads, num_blocks, num_blocks, generator=generator, device=device)
    diagonal = torch.arange(num_blocks, device=device)
    scores[:, diagonal, diagonal] = 2.0  # rand() < 1, so top-k always picks the diagonal
    chosen = scores.topk(keep, dim=-1).indices
    block_map = torch.zeros(heads, num_blocks, num_blocks, dtype=torch.bool, device=device)
    return block_map.scatter_(-1, chosen, True)[None]


def band_density(num_blocks: int, width: int) -> float:
    """Fraction of an n x n block grid with ``|p - q| <= width``."""
    kept = num_blocks + 2 * (width * num_blocks - width * (width + 1) // 2)
    return kept / num_blocks**2


def banded_block_map(num_blocks: int, density: float, device: torch.device) -> torch.Tensor:
    """``[1, 1, n, n]`` band whose density is closest to ``density`` (shared by all heads)."""
    width = min(range(num_blocks), key=lambda w: abs(band_density(num_blocks, w) - density))
    index = torch.arange(num_blocks, device=device)
    return ((index[:, None] - index[None, :]).abs() <= width)[None, None]


def flex_block_mask(plan: BlockSparsity, shape: Shape):
    """FlexAttention BlockMask visiting exactly the plan's blocks, all as full blocks.

    Broadcast dims are expanded and the index list padded to ``nK`` so that every mask of a
    shape has the same tensor shapes: the compiled Flex kernel is then reused, not recompiled.
    """
    from torch.nn.attention.flex_attention import BlockMask

    dims = (shape.batch, shape.heads, plan.num_q_blocks)
    counts = plan.kv_counts.expand(*dims).contiguous()
    indices = torch.zeros(*dims, plan.num_kv_blocks, dtype=torch.int32, device=plan.device)
    max_kv = plan.kv_indices.shape[-1]
    indices[..., :max_kv] = plan.kv_indices.expand(*dims, max_kv)
    return BlockMask.from_kv_blocks(
        torch.zeros_like(counts),
        torch.zeros_like(indices),
        full_kv_num_blocks=counts,
        full_kv_indices=indices,
        BLOCK_SIZE=(plan.q_block_size, plan.kv_block_size),
        seq_lengths=(shape.seq_len, shape.seq_len),
    )


# ----------------------------------------------------------------------------------- timing


def benchmark_ms(fn: Callable[[], object], device: torch.device, timing: Timing) -> float:
    """Median milliseconds per call of ``fn``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        # do_bench derives its repeat count from `rep`; a 200 ms call would otherwise be timed
        # once, so stretch `rep` to give the median at least `min_reps` samples.
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        estimate_ms = (time.perf_counter() - start) * 1e3
        rep_ms = max(timing.rep_ms, timing.min_reps * estimate_ms)
        return do_bench(fn, warmup=timing.warmup_ms, rep=rep_ms, return_mode="median")
    fn()
    samples = []
    for _ in range(timing.min_reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def plan_build_ms(block_map: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Median wall-clock ms of ``BlockSparsity.from_block_map``, synchronised on both ends.

    Wall clock rather than CUDA events because the build synchronises with the host.
    """
    BlockSparsity.from_block_map(block_map, block_size=BLOCK_SIZE)  # first-call kernel loading
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        BlockSparsity.from_block_map(block_map, block_size=BLOCK_SIZE)
        synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


# ------------------------------------------------------------------------- inputs and checks


@dataclass
class InputSet:
    bshd: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    bhsd: tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def make_input_sets(
    shape: Shape, count: int, dtype: torch.dtype, device: torch.device, generator: torch.Generator
) -> list[InputSet]:
    sets = []
    for _ in range(count):
        bshd = tuple(
            torch.randn(
                shape.batch, shape.seq_len, shape.heads, shape.head_dim,
                dtype=dtype, device=device, generator=generator,
            )
            for _ in range(3)
        )
        bhsd = tuple(x.transpose(1, 2).contiguous() for x in bshd)
        sets.append(InputSet(bshd, bhsd))
    return sets


def as_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bshd" else x.transpose(1, 2)


def check_rows(seq_len: int, device: torch.device) -> torch.Tensor:
    """Query rows compared with the fp32 reference: all of them for tiny shapes, else the first,
    middle and last (ragged) query blocks."""
    num_blocks = math.ceil(seq_len / BLOCK_SIZE)
    blocks = range(num_blocks) if num_blocks <= 32 else sorted({0, num_blocks // 2, num_blocks - 1})
    rows = torch.cat([torch.arange(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE) for b in blocks])
    return rows[rows < seq_len].to(device)


def reference_rows(
    inputs: InputSet, block_map: torch.Tensor | None, rows: torch.Tensor
) -> torch.Tensor:
    """fp32 attention output ``(B, len(rows), H, D)`` for the given query rows, keys restricted to
    the blocks of ``block_map`` (``None``: dense). Built from the block map, not the plan, so it
    also checks the plan construction."""
    q, k, v = inputs.bshd
    batch, seq_len, heads, head_dim = q.shape
    out = torch.empty(batch, len(rows), heads, head_dim, dtype=torch.float32, device=q.device)
    row_blocks = rows // BLOCK_SIZE
    key_blocks = torch.arange(seq_len, device=q.device) // BLOCK_SIZE
    for b in range(batch):
        for h in range(heads):  # one head at a time keeps the (rows x S) scores small
            scores = (q[b, rows, h].float() @ k[b, :, h].float().T) * head_dim**-0.5
            if block_map is not None:
                head_map = block_map[b % block_map.shape[0], h % block_map.shape[1]]
                keep = head_map[row_blocks][:, key_blocks]
                scores.masked_fill_(~keep, float("-inf"))
            out[b, :, h] = torch.softmax(scores, dim=-1) @ v[b, :, h].float()
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> float:
    """Max |a - b| over (B, S, H, D) tensors, in sequence chunks to bound fp32 temporaries."""
    return max(
        (a[:, i : i + chunk].float() - b[:, i : i + chunk].float()).abs().max().item()
        for i in range(0, a.shape[1], chunk)
    )


# --------------------------------------------------------------------------------- backends


def sdpa_runner(backend_name: str) -> Callable[[InputSet], torch.Tensor]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[
        backend_name
    ]

    def run(inputs: InputSet) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*inputs.bhsd)

    return run


def xformers_unavailable(device: torch.device) -> str | None:
    """Why the xformers baseline cannot run here, or None."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install xformers)"
    if device.type != "cuda":
        return "xformers memory_efficient_attention needs a CUDA device"
    return None


def xformers_runner() -> Callable[[InputSet], torch.Tensor]:
    import xformers.ops

    def run(inputs: InputSet) -> torch.Tensor:
        return xformers.ops.memory_efficient_attention(*inputs.bshd)  # (B, S, H, D) in and out

    return run


def fastdit_backend(device: torch.device) -> str | None:
    """The Triton kernel on CUDA (INT8 and window masks run there), fastdit's choice elsewhere:
    a silent fallback to the PyTorch reference would time the wrong thing."""
    return "triton" if device.type == "cuda" else None


def fastdit_executor(plan: BlockSparsity, dtype: torch.dtype, head_dim: int,
                     forced: str | None) -> tuple[str | None, str | None]:
    """(backend fastdit runs this plan on, reason to skip the row). On CUDA a fallback to the
    PyTorch reference would time the wrong thing (and take minutes at 75K tokens): skipped."""
    reasons = explain_backends(plan.device, dtype, head_dim, q_block_size=plan.q_block_size,
                               kv_block_size=plan.kv_block_size, dense=plan.is_dense)
    if forced is not None:
        return (forced, None) if reasons[forced] is None else (None, f"{forced}: {reasons[forced]}")
    chosen = next(name for name, reason in reasons.items() if reason is None)
    if chosen == "reference" and plan.device.type == "cuda":
        return None, "only the PyTorch reference can run: " + "; ".join(
            f"{n}: {r}" for n, r in reasons.items() if r)
    return chosen, None


def fastdit_runner(plan: BlockSparsity, layout: str, backend: str | None = None
                   ) -> Callable[[InputSet], torch.Tensor]:
    def run(inputs: InputSet) -> torch.Tensor:
        return block_sparse_attention(
            *getattr(inputs, layout), plan, layout=layout, backend=backend
        )

    return run


def flex_runner(compiled_flex: Callable, block_mask) -> Callable[[InputSet], torch.Tensor]:
    def run(inputs: InputSet) -> torch.Tensor:
        return compiled_flex(*inputs.bhsd, block_mask=block_mask)

    return run


def describe_error(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}"[:500]


# ------------------------------------------------------------------------------ one shape


class ShapeRun:
    """Runs and records every case of one shape; its tensors die with it."""

    def __init__(self, shape: Shape, args: argparse.Namespace, device: torch.device,
                 dtype: torch.dtype, compiled_flex: Callable | None, flex_unavailable: str | None):
        self.shape, self.args, self.device, self.dtype = shape, args, device, dtype
        self.compiled_flex, self.flex_unavailable = compiled_flex, flex_unavailable
        self.timing = args.timing
        self.generator = torch.Generator(device=device).manual_seed(args.seed)
        self.inputs = make_input_sets(shape, args.input_sets, dtype, device, self.generator)
        self.rows_checked = check_rows(shape.seq_len, device)
        self.results: list[dict] = []

    def new_row(self, mask: str, target_density: float, density: float, backend: str,
                layout: str, computed_pairs: int) -> dict:
        shape = self.shape
        row = dict.fromkeys(CSV_FIELDS)
        row.update(
            shape=shape.name, seq_len=shape.seq_len, heads=shape.heads, head_dim=shape.head_dim,
            dtype=str(self.dtype).removeprefix("torch."), mask=mask,
            target_density=target_density, density=round(density, 5), backend=backend,
            layout=layout, tflop_per_call=4 * computed_pairs * shape.head_dim / 1e12,
        )
        self.results.append(row)
        return row

    def skip(self, row: dict, reason: str) -> None:
        row.update(status="skipped", error=reason)
        self.log(row)

    def measure(self, row: dict, run: Callable[[InputSet], torch.Tensor],
                reference: torch.Tensor) -> torch.Tensor | None:
        """Time ``run``; record ms, TFLOP/s and the error vs ``reference``. Returns the output
        on input set 0 (for peer comparisons), or None if the backend failed."""
        wall_start = time.perf_counter()
        try:
            out = as_bshd(run(self.inputs[0]), row["layout"])  # also compiles / autotunes
            rotation = itertools.cycle(self.inputs)
            ms = benchmark_ms(lambda: run(next(rotation)), self.device, self.timing)
        except Exception as exc:  # one failing backend must not end the run
            row.update(status="error", error=describe_error(exc))
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self.log(row, time.perf_counter() - wall_start)
            return None
        err = (out[:, self.rows_checked].float() - reference).abs().max().item()
        row.update(
            status="ok", ms=ms, tflops=row["tflop_per_call"] / (ms * 1e-3),
            err_vs_ref=err, rel_err_vs_ref=err / reference.abs().max().item(),
        )
        self.log(row, time.perf_counter() - wall_start)
        return out

    def log(self, row: dict, wall_s: float | None = None) -> None:
        head = (f"[{row['shape']}] {row['mask']:<6} {row['target_density']:<6.4g} "
                f"{row['backend']:<8} {row['layout']}")
        if row["status"] == "ok":
            print(f"{head} {row['ms']:10.3f} ms {row['tflops']:8.4g} TFLOP/s  "
                  f"err {row['err_vs_ref']:.2e}  ({wall_s:.1f} s)", flush=True)
        else:
            print(f"{head} {row['status'].upper()}: {row['error'][:200]}", flush=True)

    @staticmethod
    def record_peer(rows: list[dict], peer_names: list[str], diff: float) -> None:
        for row, peer in zip(rows, peer_names, strict=True):
            row.update(peer=peer, diff_vs_peer=diff)

    def run_dense(self) -> None:
        shape, backends = self.shape, self.args.backends
        pairs = shape.batch * shape.heads * shape.seq_len**2
        reference = reference_rows(self.inputs[0], None, self.rows_checked)
        cudnn_out = None
        for backend in ("cudnn", "flash"):
            if backend not in backends:
                continue
            row = self.new_row("dense", 1.0, 1.0, backend, "bhsd", pairs)
            if self.device.type != "cuda":
                self.skip(row, "SDPA cuDNN/flash backends need a CUDA device")
                continue
            out = self.measure(row, sdpa_runner(backend), reference)
            if backend == "cudnn":
                cudnn_out = out
            elif out is not None and cudnn_out is not None:
                self.record_peer([row], ["cudnn"], max_abs_diff(out, cudnn_out))
        if "xformers" in backends:
            row = self.new_row("dense", 1.0, 1.0, "xformers", "bshd", pairs)
            reason = xformers_unavailable(self.device)
            if reason:
                self.skip(row, reason)
            else:
                out = self.measure(row, xformers_runner(), reference)
                if out is not None and cudnn_out is not None:
                    self.record_peer([row], ["cudnn"], max_abs_diff(out, cudnn_out))
        for name in ("fa4", "fa3", "flex", "flex-flash"):
            if name not in backends:
                continue
            row = self.new_row("dense", 1.0, 1.0, name, "bhsd" if name == "flex" else "bshd", pairs)
            if name == "flex":
                if self.flex_unavailable:
                    self.skip(row, self.flex_unavailable)
                    continue
                self.measure(row, flex_runner(self.compiled_flex, None), reference)
                continue
            self.measure_peer(row, lambda: {
                "fa4": lambda: peers.fa4_dense_attention(self.device),
                "fa3": lambda: peers.fa3_dense_attention(self.device),
                "flex-flash": lambda: peers.flex_flash_attention(
                    None, shape.batch, shape.heads, shape.seq_len, self.device),
            }[name](), reference)
        plan = BlockSparsity.dense(shape.seq_len, shape.seq_len, BLOCK_SIZE, self.device)
        for name, forced in (("fastdit", None), ("fastdit-triton", "triton")):
            if name not in backends:
                continue
            for layout in ("bshd", "bhsd"):
                row = self.new_row("dense", 1.0, 1.0, name, layout, pairs)
                out = self.measure_fastdit(row, plan, layout, forced, reference)
                if out is not None and cudnn_out is not None:
                    self.record_peer([row], ["cudnn"], max_abs_diff(out, cudnn_out))
        if "sage" in backends:  # last: it smooths K in place (softmax-invariant)
            row = self.new_row("dense", 1.0, 1.0, "sage", "bshd", pairs)
            self.measure_peer(row, lambda: peers.sage_attention(self.device), reference)

    def measure_fastdit(self, row: dict, plan: BlockSparsity, layout: str, forced: str | None,
                        reference: torch.Tensor) -> torch.Tensor | None:
        executor, reason = fastdit_executor(plan, self.dtype, self.shape.head_dim, forced)
        row["executor"] = executor
        if reason:
            self.skip(row, reason)
            return None
        return self.measure(row, fastdit_runner(plan, layout, executor), reference)

    def measure_peer(self, row: dict, make: Callable[[], Callable], reference: torch.Tensor
                     ) -> torch.Tensor | None:
        """A peer's (B, S, H, D) function, made outside the timing; skipped with its reason."""
        try:
            attend = make()
        except peers.PeerUnavailable as exc:
            self.skip(row, str(exc))
            return None
        except Exception as exc:
            row.update(status="error", error=describe_error(exc))
            self.log(row)
            return None
        return self.measure(row, lambda inputs: attend(*inputs.bshd), reference)

    def run_sparse(self, mask: str, target_density: float) -> None:
        shape, backends = self.shape, self.args.backends
        num_blocks = math.ceil(shape.seq_len / BLOCK_SIZE)
        if mask == "random":
            block_map = random_block_map(
                shape.heads, num_blocks, target_density, self.generator, self.device
            )
        else:
            block_map = banded_block_map(num_blocks, target_density, self.device)
        plan = BlockSparsity.from_block_map(block_map, block_size=BLOCK_SIZE)
        plan_batch, plan_heads, _ = plan.kv_counts.shape
        broadcast = (shape.batch // plan_batch) * (shape.heads // plan_heads)
        pairs = plan.computed_pairs(shape.seq_len, shape.seq_len) * broadcast
        reference = reference_rows(self.inputs[0], block_map, self.rows_checked)

        fastdit_row = fastdit_out = None
        if "fastdit" in backends:
            fastdit_row = self.new_row(mask, target_density, plan.density, "fastdit", "bshd", pairs)
            fastdit_row["plan_build_ms"] = plan_build_ms(
                block_map, self.device, self.timing.plan_repeats
            )
            fastdit_out = self.measure_fastdit(fastdit_row, plan, "bshd", None, reference)
        if "fastdit-triton" in backends:
            row = self.new_row(mask, target_density, plan.density, "fastdit-triton", "bshd", pairs)
            self.measure_fastdit(row, plan, "bshd", "triton", reference)
        if "fa4" in backends:
            row = self.new_row(mask, target_density, plan.density, "fa4", "bshd", pairs)
            self.measure_peer(row, lambda: peers.fa4_block_sparse_attention(plan, shape.batch),
                              reference)
        if "flex-flash" in backends:
            row = self.new_row(mask, target_density, plan.density, "flex-flash", "bshd", pairs)
            self.measure_peer(row, lambda: peers.flex_flash_attention(
                plan, shape.batch, shape.heads, shape.seq_len, self.device), reference)
        if "flex" in backends:
            row = self.new_row(mask, target_density, plan.density, "flex", "bhsd", pairs)
            if self.flex_unavailable:
                self.skip(row, self.flex_unavailable)
                return
            try:  # outside the timing: a BlockMask is built once per mask, like a plan
                block_mask = flex_block_mask(plan, shape)
            except Exception as exc:
                row.update(status="error", error=f"BlockMask: {describe_error(exc)}")
                self.log(row)
                return
            flex_out = self.measure(row, flex_runner(self.compiled_flex, block_mask), reference)
            if flex_out is not None and fastdit_out is not None:
                self.record_peer(
                    [row, fastdit_row], ["fastdit", "flex"], max_abs_diff(flex_out, fastdit_out)
                )

    def run(self) -> list[dict]:
        self.run_dense()
        for mask in self.args.masks:
            for target_density in self.args.densities:
                self.run_sparse(mask, target_density)
        cudnn_ms = next(
            (r["ms"] for r in self.results if r["backend"] == "cudnn" and r["status"] == "ok"),
            None,
        )
        for row in self.results:
            if cudnn_ms is not None and row["status"] == "ok":
                row["speedup_vs_cudnn"] = cudnn_ms / row["ms"]
        return self.results


# ------------------------------------------------------------------------------ reporting


def find_row(rows: list[dict], shape: str, mask: str, backend: str, density: float = 1.0,
             layout: str | None = None) -> dict | None:
    for row in rows:
        if (row["shape"] == shape and row["mask"] == mask and row["backend"] == backend
                and math.isclose(row["target_density"], density)
                and (layout is None or row["layout"] == layout)):
            return row
    return None


def missing_reason(*named_rows: tuple[str, dict | None]) -> str | None:
    """Why a target cannot be evaluated (a needed row absent or failed), else None."""
    for name, row in named_rows:
        if row is None:
            return f"{name} not run"
        if row["status"] != "ok":
            return f"{name} {row['status']}: {(row['error'] or '')[:100]}"
    return None


def evaluate_targets(rows: list[dict], dtype_name: str) -> list[dict]:
    """One verdict per (shape, target[, mask]): status PASS / MISS / N/A with the numbers."""
    verdicts = []

    def verdict(shape, mask, target, passed, summary, reason=None):
        status = "N/A" if reason else ("PASS" if passed else "MISS")
        verdicts.append(dict(shape=shape, mask=mask, target=target, status=status,
                             summary=reason or summary))

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    masks = [m for m in ALL_MASKS if any(r["mask"] == m for r in rows)]
    for shape in shapes:
        cudnn = find_row(rows, shape, "dense", "cudnn")
        dense = find_row(rows, shape, "dense", "fastdit", layout="bshd")
        dense_bhsd = find_row(rows, shape, "dense", "fastdit", layout="bhsd")
        reason = missing_reason(("cuDNN dense", cudnn), ("fastdit dense", dense))
        ratio = None if reason else dense["tflops"] / cudnn["tflops"]
        bhsd_note = ""
        if not reason and dense_bhsd and dense_bhsd["status"] == "ok":
            bhsd_note = f"; bhsd {dense_bhsd['tflops'] / cudnn['tflops']:.2f}x"
        verdict(shape, "dense", f"dense plan >= {DENSE_THROUGHPUT_TARGET:.2f}x cuDNN throughput",
                ratio is not None and ratio >= DENSE_THROUGHPUT_TARGET,
                None if reason else f"{ratio:.2f}x  [fastdit bshd {dense['tflops']:.0f} vs "
                f"cuDNN {cudnn['tflops']:.0f} TFLOP/s{bhsd_note}]", reason)

        for mask in masks:
            sparse = find_row(rows, shape, mask, "fastdit", TARGET_DENSITY)
            flex = find_row(rows, shape, mask, "flex", TARGET_DENSITY)
            reason = missing_reason((f"fastdit {mask} 25%", sparse), (f"flex {mask} 25%", flex))
            speedup = None if reason else flex["ms"] / sparse["ms"]
            verdict(shape, mask, f"25% density >= {VS_FLEX_TARGET:.1f}x faster than Flex",
                    speedup is not None and speedup >= VS_FLEX_TARGET,
                    None if reason else f"{speedup:.2f}x  [fastdit {sparse['ms']:.3f} ms vs "
                    f"Flex {flex['ms']:.3f} ms, density {sparse['density']:.3f}]", reason)
            reason = missing_reason((f"fastdit {mask} 25%", sparse), ("cuDNN dense", cudnn))
            speedup = None if reason else cudnn["ms"] / sparse["ms"]
            verdict(shape, mask, f"25% density >= {VS_CUDNN_TARGET:.1f}x faster than cuDNN dense",
                    speedup is not None and speedup >= VS_CUDNN_TARGET,
                    None if reason else f"{speedup:.2f}x  [fastdit {sparse['ms']:.3f} ms vs "
                    f"cuDNN dense {cudnn['ms']:.3f} ms]", reason)

        for mask in ["dense", *masks]:
            for density in ([1.0] if mask == "dense" else sorted(
                    {r["target_density"] for r in rows if r["shape"] == shape and r["mask"] == mask})):
                ours = find_row(rows, shape, mask, "fastdit", density, layout="bshd")
                fa4 = find_row(rows, shape, mask, "fa4", density)
                reason = missing_reason((f"fastdit {mask} {density:g}", ours),
                                        (f"fa4 {mask} {density:g}", fa4))
                ratio = None if reason else ours["ms"] / fa4["ms"]
                verdict(shape, f"{mask} {density:g}", f"time <= {VS_FA4_TARGET:.2f}x FA4's",
                        ratio is not None and ratio <= VS_FA4_TARGET,
                        None if reason else f"{ratio:.3f}x  [fastdit ({ours['executor']}) "
                        f"{ours['ms']:.3f} ms vs FA4 {fa4['ms']:.3f} ms]", reason)

        builds = [r for r in rows if r["shape"] == shape and r["plan_build_ms"] is not None]
        baseline = cudnn if cudnn and cudnn["status"] == "ok" else dense
        reason = missing_reason(("dense call", baseline))
        if not builds:
            reason = "no plan built (fastdit not run on a mask)"
        if reason:
            verdict(shape, "all", "plan build < one dense call", False, None, reason)
        else:
            worst = max(builds, key=lambda r: r["plan_build_ms"])
            verdict(shape, "all", "plan build < one dense call",
                    worst["plan_build_ms"] < baseline["ms"],
                    f"{worst['plan_build_ms']:.3f} ms vs {baseline['backend']} dense "
                    f"{baseline['ms']:.3f} ms  [slowest of {len(builds)} builds: "
                    f"{worst['mask']} {worst['target_density']:g}]")

        checked = [r for r in rows if r["shape"] == shape and r["status"] == "ok"]
        tolerance = REL_TOLERANCE[getattr(torch, dtype_name)]
        if checked:
            worst = max(checked, key=lambda r: r["rel_err_vs_ref"])
            peer_diffs = [r["diff_vs_peer"] for r in checked if r["diff_vs_peer"] is not None]
            peer_note = f"; max peer diff {max(peer_diffs):.2e}" if peer_diffs else ""
            verdict(shape, "all", f"correctness: rel err vs fp32 ref <= {tolerance:g}",
                    worst["rel_err_vs_ref"] <= tolerance,
                    f"{worst['rel_err_vs_ref']:.2e} ({worst['backend']} {worst['mask']} "
                    f"{worst['target_density']:g}, abs {worst['err_vs_ref']:.2e}){peer_note}")
        else:
            verdict(shape, "all", "correctness", False, None, "no backend ran")
    return verdicts


def format_number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
    header = (f"{'mask':<7}{'target':>7}{'dens':>7}  {'backend':<9}{'layout':<7}{'ms':>10}"
              f"{'TFLOP/s':>10}{'xcuDNN':>8}{'err_ref':>10}{'rel_err':>9}  {'peer diff':<17}"
              f"{'plan_ms':>8}")
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        shape_rows = [r for r in rows if r["shape"] == shape]
        first = shape_rows[0]
        lines.append(f"\n== {shape}: S={first['seq_len']} H={first['heads']} "
                     f"D={first['head_dim']} {first['dtype']} ==")
        lines.append(header)
        for r in shape_rows:
            start = (f"{r['mask']:<7}{r['target_density']:>7.3f}{r['density']:>7.3f}  "
                     f"{r['backend']:<9}{r['layout']:<7}")
            if r["status"] != "ok":
                lines.append(f"{start}{r['status'].upper()}: {(r['error'] or '')[:90]}")
                continue
            peer = f"{r['diff_vs_peer']:.1e} vs {r['peer']}" if r["peer"] else "-"
            lines.append(
                f"{start}{r['ms']:>10.3f}{r['tflops']:>10.4g}"
                f"{format_number(r['speedup_vs_cudnn'], '.2f'):>8}{r['err_vs_ref']:>10.1e}"
                f"{r['rel_err_vs_ref']:>9.1e}  {peer:<17}"
                f"{format_number(r['plan_build_ms'], '.3f'):>8}"
            )
    return "\n".join(lines)


def format_targets(verdicts: list[dict]) -> str:
    lines = ["\n== targets =="]
    for v in verdicts:
        lines.append(f"{v['status']:<5} {v['shape']:<12} {v['mask']:<7} {v['target']}: "
                     f"{v['summary']}")
    return "\n".join(lines)


def plot_results(rows: list[dict], metadata: dict, path: Path) -> None:
    """Per shape: ms (top, log) and TFLOP/s (bottom) vs achieved density for each sparse
    backend and mask kind; dense baselines as horizontal lines."""
    from matplotlib.ticker import LogFormatter

    from .report import agg_pyplot

    plt = agg_pyplot()

    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(2, len(shapes), figsize=(6.5 * len(shapes), 9), squeeze=False)
    colors = {"fastdit": "tab:blue", "fastdit-triton": "tab:cyan", "fa4": "tab:red",
              "fa3": "tab:purple", "flex": "tab:orange", "flex-flash": "tab:brown",
              "sage": "tab:olive", "cudnn": "black", "flash": "tab:gray", "xformers": "tab:green"}
    dense_styles = {"bshd": ":", "bhsd": "-."}
    for column, shape in enumerate(shapes):
        ok = [r for r in rows if r["shape"] == shape and r["status"] == "ok"]
        densities = sorted({r["target_density"] for r in ok if r["mask"] != "dense"})
        for axis, metric, label in ((axes[0, column], "ms", "ms (median)"),
                                    (axes[1, column], "tflops", "TFLOP/s (computed blocks)")):
            for backend in ("fastdit", "fastdit-triton", "fa4", "flex", "flex-flash"):
                for mask, style in (("random", "-"), ("banded", "--")):
                    series = sorted((r["density"], r[metric]) for r in ok
                                    if r["backend"] == backend and r["mask"] == mask)
                    if series:
                        xs, ys = zip(*series, strict=True)
                        axis.plot(xs, ys, style, marker="o", color=colors[backend],
                                  label=f"{backend} {mask}")
            for r in ok:
                if r["mask"] == "dense":
                    axis.axhline(r[metric], color=colors[r["backend"]], alpha=0.8,
                                 linestyle=dense_styles[r["layout"]],
                                 label=f"{r['backend']} dense ({r['layout']})")
            axis.set_xscale("log", base=2)
            if densities:
                axis.set_xticks(densities, [f"{d:g}" for d in densities])
            if metric == "ms":
                axis.set_yscale("log")
                # Plain numbers ("20", not "2x10^1"); minor ticks are labelled only when the
                # axis spans little more than a decade, as with matplotlib's default.
                axis.yaxis.set_major_formatter(LogFormatter())
                axis.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
            axis.set_xlabel("block density (achieved)")
            axis.set_ylabel(label)
            axis.grid(True, which="both", alpha=0.3)
        first = ok[0] if ok else next(r for r in rows if r["shape"] == shape)
        axes[0, column].set_title(f"{shape}: S={first['seq_len']} H={first['heads']} "
                                  f"D={first['head_dim']}")
        axes[0, column].legend(fontsize=7)
    fig.suptitle(f"fastdit kernel_bench: {metadata['device_name']}, {metadata['dtype']}, "
                 f"torch {metadata['torch']}, {metadata['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(rows: list[dict], metadata: dict, out_dir: Path, stem: str,
                  fields: tuple[str, ...] = CSV_FIELDS, plot=None) -> list[Path]:
    """``<stem>.csv`` (``fields``), ``.json`` (metadata and rows) and ``.png`` (``plot``, this
    benchmark's ``plot_results`` by default) in ``out_dir``; other benchmarks reuse it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path, png_path = (out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "png"))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps({"metadata": metadata, "results": rows}, indent=1, default=str))
    if importlib.util.find_spec("matplotlib") is None:
        print("note: plot skipped: matplotlib is not installed (pip install 'fastdit[report]')")
        return [csv_path, json_path]
    (plot or plot_results)(rows, metadata, png_path)
    return [csv_path, json_path, png_path]


# ------------------------------------------------------------------------------------ main


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE_ROOT,
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def collect_metadata(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine() or "cpu"
    return dict(
        date=datetime.date.today().isoformat(),
        device_type=device.type,
        device_name=device_name,
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        python=platform.python_version(),
        dtype=str(dtype).removeprefix("torch."),
        block_size=BLOCK_SIZE,
        # Why each fastdit backend can or cannot run each kind of call here (None = can).
        fastdit_backends=explain_calls(device, dtype),
        peer_versions={name: package_version(name) for name in PEER_PACKAGES},
        git_commit=git_commit(),
        smoke=args.smoke,
        args={k: v for k, v in vars(args).items() if k not in ("timing", "func", "command")},
    )


PEER_PACKAGES = ("flash-attn-4", "nvidia-cutlass-dsl", "fa3-fwd", "sageattention", "xformers")


def package_version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def output_stem(metadata: dict) -> str:
    name = metadata["device_name"] if metadata["device_type"] == "cuda" else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if metadata["smoke"]:
        slug += "-smoke"
    return f"kernel_bench_{slug}_{metadata['date']}"


def parse_list(text: str, allowed: tuple[str, ...] | None = None) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if allowed is not None:
        unknown = [item for item in items if item not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; choose from {list(allowed)}")
    return items


def _non_negative(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text!r}")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser, default_out: Path = DEFAULT_OUT) -> None:
    """The benchmark's flags (``fastdit bench`` and ``benchmarks/kernel_bench.py``)."""
    add = parser.add_argument
    add("--shapes", default=None,
        help=f"comma list of {list(SHAPES)} (default: all; with --smoke: {list(SMOKE_SHAPES)})")
    add("--densities", default="1,0.5,0.25,0.125",
        help="target block densities of the sparse masks, in (0, 1] (default: 1,0.5,0.25,0.125)")
    add("--masks", default=",".join(ALL_MASKS), type=lambda s: parse_list(s, ALL_MASKS),
        help=f"mask kinds, comma list of {list(ALL_MASKS)} (default: {','.join(ALL_MASKS)})")
    add("--backends", default=",".join(ALL_BACKENDS), type=lambda s: parse_list(s, ALL_BACKENDS),
        help=f"comma list of {list(ALL_BACKENDS)}; xformers only when installed (default: "
        f"{','.join(ALL_BACKENDS)})")
    add("--out", type=Path, default=default_out,
        help=f"directory for the csv / json / png (default: {default_out})")
    add("--smoke", action="store_true",
        help="tiny shapes and short timing, on CUDA if present else CPU (fp32): checks the "
        "benchmark runs, its times mean nothing on a CPU (default: off)")
    add("--warmup-ms", type=_non_negative(float), default=25.0,
        help="do_bench warmup in ms (default: 25)")
    add("--rep-ms", type=_non_negative(float), default=100.0,
        help="do_bench rep in ms, at least (default: 100)")
    add("--min-reps", type=_non_negative(int), default=10,
        help="minimum timed calls per median (stretches --rep-ms for slow calls) (default: 10)")
    add("--plan-repeats", type=_non_negative(int), default=20,
        help="timed plan builds (default: 20)")
    add("--input-sets", type=_non_negative(int), default=3,
        help="random q/k/v sets rotated between timed calls (default: 3)")
    add("--seed", type=int, default=0, help="seed of the inputs and random masks (default: 0)")
    add("--replot", type=Path, metavar="JSON", default=None,
        help="redraw the plot and reprint the summary of an earlier run, then exit (default: off)")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve shapes, densities and the smoke timing; raises ``UsageError`` on bad values."""
    from .common import UsageError

    known = SMOKE_SHAPES if args.smoke else SHAPES
    try:
        names = parse_list(args.shapes, tuple(known)) if args.shapes else list(known)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"--shapes: {exc}") from None
    if not names:
        raise UsageError(f"--shapes: no shape given; choose from {list(known)}")
    args.shapes = names
    try:
        args.densities = [float(d) for d in parse_list(args.densities)]
    except ValueError:
        raise UsageError(f"--densities must be numbers in (0, 1], got {args.densities!r}") from None
    if not args.densities or not all(0 < d <= 1 for d in args.densities):
        raise UsageError(f"--densities must lie in (0, 1], got {args.densities}")
    if not args.backends:
        raise UsageError(f"--backends: choose at least one of {list(ALL_BACKENDS)}")
    if args.input_sets < 1 or args.min_reps < 1:
        raise UsageError("--input-sets and --min-reps must be >= 1")
    if args.smoke:
        args.warmup_ms, args.rep_ms = min(args.warmup_ms, 5.0), min(args.rep_ms, 20.0)
        args.min_reps, args.plan_repeats = min(args.min_reps, 3), min(args.plan_repeats, 5)
        args.input_sets = min(args.input_sets, 2)
    args.timing = Timing(args.warmup_ms, args.rep_ms, args.min_reps, args.plan_repeats)
    return args


def report(rows: list[dict], metadata: dict, verdicts: list[dict]) -> None:
    print(f"\n# fastdit kernel_bench  {metadata['device_name']}  torch {metadata['torch']}  "
          f"triton {metadata['triton']}  cuda {metadata['cuda']}  {metadata['date']}")
    print("# ms = median; TFLOP/s on computed blocks; xcuDNN = cuDNN dense ms / ms; err_ref = max "
          "abs err vs fp32 ref on sampled query blocks (rel_err = / max|ref|)")
    print(format_table(rows))
    print(format_targets(verdicts))


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark for parsed arguments; returns the exit code. Raises ``UsageError``
    (exit 2) for bad arguments and for a run without CUDA that is not ``--smoke``."""
    from .common import UsageError

    if args.replot:
        if not args.replot.is_file():
            raise UsageError(f"--replot {args.replot}: no such file")
        try:
            saved = json.loads(args.replot.read_text())
            rows, metadata = saved["results"], saved["metadata"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UsageError(f"--replot {args.replot}: not a kernel_bench JSON ({exc})") from None
        report(rows, metadata, evaluate_targets(rows, metadata["dtype"]))
        if importlib.util.find_spec("matplotlib") is None:
            print("\nnote: plot skipped: matplotlib is not installed")
        else:
            plot_results(rows, metadata, args.replot.with_suffix(".png"))
            print(f"\nwrote {args.replot.with_suffix('.png')}")
        return 0
    args = finalize_args(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise UsageError(
            "the kernel benchmark times GPU kernels and needs a CUDA device, and none is "
            "available here; --smoke runs tiny shapes on the CPU (fastdit's PyTorch reference, or "
            "Triton's interpreter with TRITON_INTERPRET=1) to check the benchmark itself"
        )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(SMOKE_SHAPES if args.smoke else SHAPES)[name] for name in args.shapes]
    metadata = collect_metadata(args, device, dtype)
    print(f"device {metadata['device_name']} ({device}), {metadata['dtype']}, shapes "
          f"{args.shapes}, masks {args.masks}, densities {args.densities}, backends "
          f"{args.backends}; peers {metadata['peer_versions']}", flush=True)
    for call, reasons in metadata["fastdit_backends"].items():
        print(f"  {call}: " + ", ".join(f"{n}: {r or 'can run'}" for n, r in reasons.items()))

    compiled_flex = flex_unavailable = None
    if {"flex", "flex-flash"} & set(args.backends):
        try:
            from torch.nn.attention.flex_attention import flex_attention

            # Compiled once; dynamo specialises per shape, and every mask of a shape has the
            # same BlockMask tensor shapes, so each shape compiles once and masks reuse it.
            compiled_flex = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:
            flex_unavailable = f"FlexAttention unavailable: {describe_error(exc)}"

    start = time.perf_counter()
    rows: list[dict] = []
    for shape in shapes:
        shape_run = ShapeRun(shape, args, device, dtype, compiled_flex, flex_unavailable)
        rows += shape_run.run()
        del shape_run  # frees this shape's inputs and outputs before the next shape allocates
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metadata["elapsed_s"] = round(time.perf_counter() - start, 1)

    verdicts = evaluate_targets(rows, metadata["dtype"])
    metadata["targets"] = verdicts
    paths = write_outputs(rows, metadata, args.out, output_stem(metadata))
    report(rows, metadata, verdicts)
    print(f"\nelapsed {metadata['elapsed_s']} s; wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None, default_out: Path = DEFAULT_OUT) -> int:
    """Stand-alone entry point (``benchmarks/kernel_bench.py``); returns the exit code."""
    import sys

    from .common import UsageError

    parser = argparse.ArgumentParser(prog="kernel_bench", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, default_out=default_out)
    args = parser.parse_args(argv)
    try:
        return run_bench(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
