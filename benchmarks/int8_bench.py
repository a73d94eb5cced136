"""Micro-benchmark: fastdit's INT8 block-sparse attention against the bf16 kernel at the same plan.

What it measures
----------------
The core kernel benchmark's shapes (``benchmarks/kernel_bench.py``: Wan2.1-1.3B 480p, 32,760
tokens x 12 heads, and Wan2.1-14B 720p, 75,600 x 40; head_dim 128, B=1, bf16, (B, S, H, D) as
diffusers gives it) and plans (``random``: per head, ``round(density * nK)`` random key blocks per
row with the diagonal; ``banded``: ``|p - q| <= w``), at densities 1, 0.5, 0.25, 0.125. Per
(shape, mask, density):

* ``bf16``: ``block_sparse_attention(q, k, v, plan)``, the baseline;
* ``int8``: ``block_sparse_attention(q, k, v, plan, quantize="int8")``: the whole INT8 path, K's
  mean, the quantization kernel (Q and K) and the INT8 attention kernel (what PARO runs);
* ``int8-kernel``: the INT8 attention kernel alone on inputs quantized beforehand;
* ``quantize``: the quantization pass alone (K's mean and both quantization launches).

It reports the median ms (``triton.testing.do_bench``, L2 flushed), TOPS on computed blocks
(``4 * computed_pairs * D``), the speedup over ``bf16`` at the same plan, and the INT8 output's
accuracy against the bf16 kernel's (cosine similarity and relative L1 over the whole output) on
the timed unit-variance inputs and on keys with a large shared per-head offset (``k + 8 * u_h``,
``u_h ~ N(0, I)``: the case K smoothing exists for).

Targets (PASS/MISS at the end, per shape, mask and density, head_dim 128)
-------------------------------------------------------------------------
* ``int8`` (quantization included) >= 1.3x faster than ``bf16`` at the same plan;
* cosine >= 0.999 and relative L1 <= 2% against ``bf16`` on both input kinds.

How to run
----------
    python -m benchmarks.int8_bench                               # both shapes, a few minutes
    python -m benchmarks.int8_bench --shapes wan13b-480p --masks random
    TRITON_INTERPRET=1 python -m benchmarks.int8_bench --smoke    # tiny shapes on the CPU
    python -m benchmarks.int8_bench --replot benchmarks/results/<gpu>_<date>/int8_bench_<gpu>_<date>.json

Writes ``int8_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out`` (default
``benchmarks/results/<gpu>_<date>``) and prints a table and the target verdicts last.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import (  # noqa: E402
    SHAPES,
    SMOKE_SHAPES,
    Shape,
    Timing,
    accuracy,
    add_out_argument,
    banded_block_map,
    benchmark_ms,
    collect_metadata,
    fastdit_backend,
    parse_list,
    pyplot,
    random_block_map,
    stem as harness_stem,
    write_outputs,
)

from fastdit.kernels import BlockSparsity, block_sparse_attention, quantize_qk_int8  # noqa: E402
from fastdit.kernels.dispatch import triton_interpreter_enabled  # noqa: E402
from fastdit.kernels.triton.int8_attention import triton_int8_block_sparse_attention  # noqa: E402
from fastdit.kernels.reference import int8_attention_reference  # noqa: E402

BLOCK_SIZE = 128
ALL_MASKS = ("random", "banded")
METHODS = ("bf16", "int8", "int8-kernel", "quantize")
SPEEDUP_TARGET = 1.3
COSINE_TARGET = 0.999
REL_L1_TARGET = 0.02
KEY_OFFSET = 8.0

CSV_FIELDS = (
    "shape", "seq_len", "heads", "head_dim", "mask", "target_density", "density", "method",
    "status", "ms", "tops", "speedup_vs_bf16", "cosine", "rel_l1", "cosine_offset_k",
    "rel_l1_offset_k", "error",
)


class ShapeRun:
    def __init__(self, shape: Shape, args, device: torch.device, dtype: torch.dtype) -> None:
        self.shape, self.args, self.device, self.dtype = shape, args, device, dtype
        generator = torch.Generator(device=device).manual_seed(args.seed)
        dims = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
        self.q, self.k, self.v = (
            torch.randn(*dims, device=device, dtype=dtype, generator=generator) for _ in range(3)
        )
        offset = torch.randn(shape.heads, shape.head_dim, device=device, generator=generator)
        self.k_offset = (self.k.float() + KEY_OFFSET * offset).to(dtype)
        self.generator = generator
        self.backend = fastdit_backend(device)

    def plan(self, mask: str, density: float) -> BlockSparsity:
        num_blocks = math.ceil(self.shape.seq_len / BLOCK_SIZE)
        if mask == "random":
            block_map = random_block_map(self.shape.heads, num_blocks, density, self.generator, self.device)
        else:
            block_map = banded_block_map(num_blocks, density, self.device)
        return BlockSparsity.from_block_map(block_map, BLOCK_SIZE)

    def run(self) -> list[dict]:
        rows = []
        masks = self.args.masks
        for mask in masks:
            for density in self.args.densities:
                if density == 1.0 and mask != masks[0]:
                    continue  # density 1 is the same dense plan for every mask kind
                rows += self.run_plan(mask, density)
        return rows

    def run_plan(self, mask: str, target_density: float) -> list[dict]:
        shape, timing = self.shape, self.args.timing
        plan = self.plan(mask, target_density)
        pairs = plan.computed_pairs(shape.seq_len, shape.seq_len) * (shape.heads // plan.kv_counts.shape[1])
        flop = 4.0 * pairs * shape.head_dim * shape.batch
        q, k, v, backend = self.q, self.k, self.v, self.backend
        quantized = quantize_qk_int8(q, k, block_size=BLOCK_SIZE, backend=backend)

        def int8_kernel():
            if self.device.type == "cpu" and not triton_interpreter_enabled():
                return int8_attention_reference(quantized, v, plan)[0]
            return triton_int8_block_sparse_attention(
                quantized, v, plan, layout="bshd", return_lse=False, key_lengths=None,
                interpret=self.device.type == "cpu",
            )[0]

        calls = {
            "bf16": lambda: block_sparse_attention(q, k, v, plan, backend=backend),
            "int8": lambda: block_sparse_attention(q, k, v, plan, backend=backend, quantize="int8"),
            "int8-kernel": int8_kernel,
            "quantize": lambda: quantize_qk_int8(q, k, block_size=BLOCK_SIZE, backend=backend),
        }
        base = dict(shape=shape.name, seq_len=shape.seq_len, heads=shape.heads,
                    head_dim=shape.head_dim, mask=mask, target_density=target_density,
                    density=round(plan.density, 5))
        reference = calls["bf16"]()
        reference_offset = block_sparse_attention(q, self.k_offset, v, plan, backend=backend)
        rows, bf16_ms = [], None
        for method in self.args.methods:
            row = dict(base, method=method)
            try:
                ms = benchmark_ms(calls[method], self.device, timing)
                row.update(status="ok", ms=ms)
                if method != "quantize":
                    row["tops"] = flop / ms / 1e9
                if method == "bf16":
                    bf16_ms = ms
                if method in ("int8", "int8-kernel"):
                    row["cosine"], row["rel_l1"] = accuracy(calls[method](), reference)
                if method == "int8":
                    offset_out = block_sparse_attention(
                        q, self.k_offset, v, plan, backend=backend, quantize="int8"
                    )
                    row["cosine_offset_k"], row["rel_l1_offset_k"] = accuracy(offset_out, reference_offset)
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            rows.append(row)
            print(format_row(row), flush=True)
        for row in rows:
            if bf16_ms is not None and row.get("ms") and row["method"] != "quantize":
                row["speedup_vs_bf16"] = bf16_ms / row["ms"]
        return rows


def format_number(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: dict) -> str:
    return (
        f"{row['shape']:>12} {row['mask']:>7} {row['target_density']:>5} {row['method']:>11} "
        f"{row['status']:>5} {format_number(row.get('ms'), '9.3f')} ms "
        f"{format_number(row.get('tops'), '7.1f')} TOPS "
        f"x{format_number(row.get('speedup_vs_bf16'), '.2f')} "
        f"cos {format_number(row.get('cosine'), '.5f')} L1 {format_number(row.get('rel_l1'), '.4f')} "
        f"offset-K cos {format_number(row.get('cosine_offset_k'), '.5f')} "
        f"L1 {format_number(row.get('rel_l1_offset_k'), '.4f')} {row.get('error', '')}"
    )


def evaluate_targets(rows: list[dict], metadata: dict) -> list[dict]:
    """PASS/MISS per int8 row; N/A on smoke or CPU runs, whose timings say nothing."""
    verdicts = []
    for row in rows:
        if row["method"] != "int8":
            continue
        name = f"{row['shape']} {row['mask']} density {row['target_density']}"
        if row["status"] != "ok" or row.get("speedup_vs_bf16") is None:
            verdicts.append(dict(target=name, verdict="N/A", detail=row.get("error", "no bf16 row")))
            continue
        speed_ok = row["head_dim"] != 128 or row["speedup_vs_bf16"] >= SPEEDUP_TARGET
        accurate = all(
            row.get(c) is not None and row[c] >= COSINE_TARGET for c in ("cosine", "cosine_offset_k")
        ) and all(row.get(l) is not None and row[l] <= REL_L1_TARGET for l in ("rel_l1", "rel_l1_offset_k"))
        if metadata["smoke"] or metadata["device_type"] != "cuda":
            verdict = "N/A"
        else:
            verdict = "PASS" if speed_ok and accurate else "MISS"
        verdicts.append(dict(
            target=name,
            verdict=verdict,
            detail=(f"x{row['speedup_vs_bf16']:.2f} vs bf16 (target {SPEEDUP_TARGET}"
                    f"{'' if row['head_dim'] == 128 else ', applies at head_dim 128'}); cosine "
                    f"{row['cosine']:.5f}/{row['cosine_offset_k']:.5f}, rel L1 "
                    f"{row['rel_l1']:.4f}/{row['rel_l1_offset_k']:.4f} (unit/offset K)"),
        ))
    return verdicts


def plot_results(rows: list[dict], metadata: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    shapes = sorted({row["shape"] for row in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.2), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for mask in sorted({row["mask"] for row in rows}):
            for method, style in (("int8", "-o"), ("int8-kernel", ":s")):
                points = sorted(
                    (row["density"], row["speedup_vs_bf16"]) for row in rows
                    if row["shape"] == shape and row["method"] == method and row.get("speedup_vs_bf16")
                    and (row["mask"] == mask or row["target_density"] == 1.0)
                )
                if points:
                    ax.plot(*zip(*points), style, label=f"{method} ({mask})")
        ax.axhline(SPEEDUP_TARGET, color="gray", linestyle="--", label=f"target x{SPEEDUP_TARGET}")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("block density")
        ax.set_ylabel("speedup over bf16 block-sparse (same plan)")
        ax.set_title(shape)
        ax.legend(fontsize=8)
    fig.suptitle(f"fastdit INT8 attention, {metadata['device_name']}, {metadata['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(rows: list[dict], metadata: dict, verdicts: list[dict]) -> None:
    print(f"\n# fastdit int8_bench  {metadata['device_name']}  torch {metadata['torch']}  "
          f"triton {metadata['triton']}  {metadata['date']}")
    for row in rows:
        print(format_row(row))
    print("\ntargets:")
    for verdict in verdicts:
        print(f"  {verdict['verdict']:<4} {verdict['target']}: {verdict['detail']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time fastdit's INT8 attention (quantization included) against the bf16 kernel.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of {list(SHAPES)} (default: all; with --smoke: "
                        f"{list(SMOKE_SHAPES)[:1]})")
    parser.add_argument("--densities", default=None, help="block densities (default: 1,0.5,0.25,0.125; "
                        "with --smoke: 1,0.25)")
    parser.add_argument("--masks", default=None, help=f"comma list of {list(ALL_MASKS)} (default: all; "
                        "with --smoke: random)")
    parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: parse_list(s, METHODS))
    add_out_argument(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shape, short timing, bf16 on CUDA if present else the CPU "
                        "(set TRITON_INTERPRET=1 to run the Triton kernels there)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="redraw the plot and reprint the table of an earlier run, then exit")
    args = parser.parse_args(argv)
    known = SMOKE_SHAPES if args.smoke else SHAPES
    try:
        args.shapes = parse_list(args.shapes, tuple(known)) if args.shapes else (
            list(known)[:1] if args.smoke else list(known))
        args.masks = parse_list(args.masks, ALL_MASKS) if args.masks else (
            ["random"] if args.smoke else list(ALL_MASKS))
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    densities = args.densities or ("1,0.25" if args.smoke else "1,0.5,0.25,0.125")
    args.densities = [float(d) for d in parse_list(densities)]
    if not all(0 < d <= 1 for d in args.densities):
        parser.error("--densities must lie in (0, 1]")
    if args.smoke:
        args.warmup_ms, args.rep_ms, args.min_reps = min(args.warmup_ms, 5.0), min(args.rep_ms, 20.0), 2
    args.timing = Timing(args.warmup_ms, args.rep_ms, args.min_reps, 1)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot_results(saved["results"], saved["metadata"], args.replot.with_suffix(".png"))
        report(saved["results"], saved["metadata"], evaluate_targets(saved["results"], saved["metadata"]))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16  # INT8 attention takes 16-bit inputs, on the CPU too
    metadata = collect_metadata(args, device, dtype)
    metadata["bench"] = "int8_bench"
    print(f"device {metadata['device_name']} ({device}), shapes {args.shapes}, masks {args.masks}, "
          f"densities {args.densities}, methods {args.methods}", flush=True)
    start = time.perf_counter()
    rows = []
    for name in args.shapes:
        run = ShapeRun((SMOKE_SHAPES if args.smoke else SHAPES)[name], args, device, dtype)
        rows += run.run()
        del run
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    metadata["elapsed_s"] = round(time.perf_counter() - start, 1)
    verdicts = evaluate_targets(rows, metadata)
    metadata["targets"] = verdicts
    stem = harness_stem("int8_bench", metadata)
    paths = write_outputs(rows, metadata, args.out, stem, fields=CSV_FIELDS, plot=plot_results)
    report(rows, metadata, verdicts)
    print(f"\nelapsed {metadata['elapsed_s']} s; wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
