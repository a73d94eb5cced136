"""End-to-end PARO step times: Wan2.1-1.3B 480p, stock cuDNN against PARO on the bf16 and INT8 kernels.

What it measures
----------------
The full-size Wan2.1-1.3B transformer of ``benchmarks/e2e_bench.py`` (30 layers, 12 heads x 128,
random bf16 weights, 480p x 81 frames: 21 x 30 x 52 = 32,760 tokens; its model building and CFG
step timing are reused from there). One step is classifier-free guidance: two forwards inside the
pipeline's ``cache_context``. Methods:

* ``stock-cudnn``: diffusers' stock processors with SDPA forced to cuDNN;
* ``dense``: ``fastdit.Dense()`` (fastdit's bf16 kernel, full plan), for reference;
* ``paro-bf16``: ``fastdit.PARO(plan=..., quantize=None)``: per-head reordering (gather), the bf16
  block-sparse kernel on the plan of the current (bucket, layer), inverse reordering (scatter);
* ``paro-int8``: ``fastdit.PARO(plan=..., quantize="int8")``: the same with the INT8 kernel
  (K mean and quantization included).

The plan. By default a synthetic one, per ``--densities`` value: random weights have no
attention pattern worth calibrating, and the GPU machine cannot download Wan2.1's weights. Step
time depends on the plan's density and on the reordering, not on which blocks are kept, so the
synthetic plan has the real structure: per head an axis order (cycling through the 6, so 5 of 6
heads are really permuted), and per (layer, head) each query-block row keeps
``round(density * nK)`` random key blocks plus its diagonal block
(``kernel_bench.random_block_map``); one timestep bucket. ``--plan FILE`` times a calibrated plan
instead (``fastdit calibrate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --height 480 --width 832
--num-frames 81 --steps 50 -o FILE`` where the weights are available).

Per (method, density) it records the median ms per step, the time inside the self-attention
modules and its share, peak memory, the density the step ran (fastdit's record), and the
output's max difference to stock cuDNN relative to its max (sparse rows differ by design); then
the 50-step estimate ``50 * step`` (PARO runs every step sparse) and the speedup over stock cuDNN.
There is no pass/fail target here; the paper reports 1.9-2.7x end to end on CogVideoX-5B and
Flux at 20-30% density with INT8/INT4.

How to run
----------
    python -m benchmarks.paro_e2e_bench                            # ~2 min on an H100
    python -m benchmarks.paro_e2e_bench --densities 0.3 --methods stock-cudnn,paro-int8
    python -m benchmarks.paro_e2e_bench --plan plan.safetensors    # a calibrated plan
    python -m benchmarks.paro_e2e_bench --smoke --out /tmp/paro    # tiny model, CPU bf16, ~1 min
    python -m benchmarks.paro_e2e_bench --replot benchmarks/results/<gpu>_<date>/paro_e2e_bench_<gpu>_<date>.json

Writes ``paro_e2e_bench_<gpu-slug>_<YYYY-MM-DD>.{csv,json,png}`` into ``--out`` (default
``benchmarks/results/<gpu>_<date>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.e2e_bench import (  # noqa: E402
    MODELS,
    NUM_STEPS,
    SMOKE_MODELS,
    ModelSpec,
    build_transformer,
    collect_metadata,
    make_inputs,
    sdpa_context,
    time_steps,
)
from benchmarks.harness import (  # noqa: E402
    add_out_argument,
    describe_error,
    parse_list,
    pyplot,
    random_block_map,
    write_outputs,
)
from benchmarks.harness import stem as harness_stem  # noqa: E402

import fastdit  # noqa: E402
from fastdit.layout import AXIS_ORDERS, SequenceLayout  # noqa: E402
from fastdit.methods.paro import ParoPlan, layout_to_json  # noqa: E402

ALL_METHODS = ("stock-cudnn", "dense", "paro-bf16", "paro-int8")
MODEL = "wan13b-480p"
BLOCK_SIZE = 128
STEP_INDEX = 20

CSV_FIELDS = (
    "model", "tokens", "method", "plan", "target_density", "step_density", "status", "ms_step",
    "attn_ms_step", "attn_share", "peak_mem_gib", "out_finite", "rel_diff_vs_stock", "e2e_s",
    "speedup_vs_cudnn", "error",
)


def synthetic_plan(spec: ModelSpec, density: float, seed: int, path: Path) -> ParoPlan:
    """The module docstring's synthetic plan for ``spec`` at ``density``, saved to ``path``."""
    config = spec.config
    layers, heads = config["num_layers"], config["num_attention_heads"]
    layout = SequenceLayout(spec.grid)
    num_blocks = math.ceil(layout.num_tokens / BLOCK_SIZE)
    generator = torch.Generator().manual_seed(seed)
    masks = torch.stack([
        random_block_map(heads, num_blocks, density, generator, torch.device("cpu"))[0]
        for _ in range(layers)
    ])[None]
    orders = (torch.arange(layers * heads) % len(AXIS_ORDERS)).view(layers, heads).to(torch.uint8)
    metadata = {
        "model_class": "WanTransformer3DModel", "transformer_layers": [layers], "num_heads": heads,
        "head_dim": config["attention_head_dim"], "layout": layout_to_json(layout),
        "num_steps": NUM_STEPS, "num_buckets": 1, "block_size": BLOCK_SIZE,
        "target": {"density": density}, "fastdit_version": fastdit.__version__,
        "calibration": {"synthetic": "random blocks per row + diagonal, orders cycling over heads"},
    }
    plan = ParoPlan(orders, masks, metadata)
    plan.save(path)
    return plan


def measure(row: dict, model, inputs, device, args, sdpa, handle=None, reference=None) -> torch.Tensor | None:
    wall = time.perf_counter()
    try:
        timing = time_steps(model, inputs, device, step_index=STEP_INDEX, warmup=args.warmup,
                            repeat=args.repeat, sdpa=sdpa_context(sdpa, device))
    except Exception as exc:  # noqa: BLE001 - one failing method must not end the run
        row.update(status="error", error=describe_error(exc))
        print(f"{row['method']:<12} {row['target_density']}: ERROR {row['error'][:200]}", flush=True)
        return None
    ms = statistics.median(timing.step_ms)
    attn = statistics.median(timing.timer_ms)
    out = timing.output.float()
    row.update(status="ok", ms_step=ms, attn_ms_step=attn, attn_share=attn / ms,
               peak_mem_gib=timing.peak_mem_gib, out_finite=bool(torch.isfinite(out).all()),
               e2e_s=NUM_STEPS * ms / 1e3)
    if handle is not None:
        recorded = [d for (_, step), d in handle.state.densities.items() if step == STEP_INDEX]
        row["step_density"] = sum(recorded) / len(recorded) if recorded else None
    else:
        row["step_density"] = 1.0
    if reference is not None:
        ref = reference.float()
        row["rel_diff_vs_stock"] = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{row['method']:<12} density {row['target_density']}: {ms:9.1f} ms/step, attention "
          f"{row['attn_share'] * 100:5.1f}%, ran at {row['step_density']:.3f}, "
          f"{time.perf_counter() - wall:.0f} s", flush=True)
    return timing.output


def run(args, device: torch.device, dtype: torch.dtype, work_dir: Path) -> list[dict]:
    spec = (SMOKE_MODELS["smoke-tiny"] if args.smoke else MODELS[MODEL])
    model = build_transformer(spec, device, dtype, args.seed)
    inputs = make_inputs(spec, device, dtype, args.seed)
    base = dict(model=spec.name, tokens=spec.grid.num_tokens)
    rows, reference = [], None
    if "stock-cudnn" in args.methods:
        row = dict(base, method="stock-cudnn", plan="-", target_density=1.0)
        reference = measure(row, model, inputs, device, args, "CUDNN_ATTENTION")
        rows.append(row)
    if "dense" in args.methods:
        row = dict(base, method="dense", plan="full", target_density=1.0)
        handle = fastdit.apply(model, fastdit.Dense())
        try:
            measure(row, model, inputs, device, args, "CUDNN_ATTENTION", handle, reference)
        finally:
            handle.remove()
        rows.append(row)
    plans = ([(args.plan, ParoPlan.load(args.plan))] if args.plan else [])
    for density in ([] if args.plan else args.densities):
        path = work_dir / f"synthetic_{density}.safetensors"
        plans.append((path, synthetic_plan(spec, density, args.seed, path)))
    for path, plan in plans:
        for method in ("paro-bf16", "paro-int8"):
            if method not in args.methods:
                continue
            target = plan.metadata["target"].get("density", plan.density)
            row = dict(base, method=method, plan="calibrated" if args.plan else "synthetic",
                       target_density=target)
            quantize = "int8" if method == "paro-int8" else None
            try:
                handle = fastdit.apply(model, fastdit.PARO(plan=path, quantize=quantize))
            except ValueError as exc:
                row.update(status="error", error=describe_error(exc))
                rows.append(row)
                continue
            try:
                measure(row, model, inputs, device, args, "CUDNN_ATTENTION", handle, reference)
            finally:
                handle.remove()
            rows.append(row)
    stock = next((r for r in rows if r["method"] == "stock-cudnn" and r.get("ms_step")), None)
    for row in rows:
        if stock and row.get("ms_step"):
            row["speedup_vs_cudnn"] = stock["ms_step"] / row["ms_step"]
    return rows


def plot_results(rows: list[dict], metadata: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    done = [r for r in rows if r.get("ms_step")]
    labels = [f"{r['method']}\n{r['target_density']}" for r in done]
    fig, ax = plt.subplots(figsize=(1.3 * max(4, len(done)), 4.2))
    bars = ax.bar(labels, [r["ms_step"] for r in done], color=[
        {"stock-cudnn": "gray", "dense": "tab:blue", "paro-bf16": "tab:orange",
         "paro-int8": "tab:green"}[r["method"]] for r in done])
    for bar, row in zip(bars, done):
        if row.get("speedup_vs_cudnn"):
            ax.annotate(f"x{row['speedup_vs_cudnn']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per CFG step (2 forwards)")
    ax.set_title(f"PARO end to end, {metadata['model']} ({metadata['device_name']}, {metadata['date']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(rows: list[dict], metadata: dict, out_dir: Path) -> list[Path]:
    stem = harness_stem("paro_e2e_bench", metadata)
    return write_outputs(rows, metadata, out_dir, stem, fields=CSV_FIELDS, plot=plot_results)


def report(rows: list[dict], metadata: dict) -> None:
    print(f"\n# fastdit paro_e2e_bench  {metadata['model']}  {metadata['device_name']}  {metadata['date']}")
    print(f"{'method':<12} {'plan':<10} {'density':>7} {'ran at':>7} {'ms/step':>9} {'attn %':>6} "
          f"{'50 steps s':>10} {'x cuDNN':>7} {'diff':>8}")
    for r in rows:
        if not r.get("ms_step"):
            print(f"{r['method']:<12} {r['plan']:<10} {r['target_density']:>7} ERROR {r.get('error', '')[:120]}")
            continue
        diff = r.get("rel_diff_vs_stock")
        print(f"{r['method']:<12} {r['plan']:<10} {r['target_density']:>7} {r['step_density']:>7.3f} "
              f"{r['ms_step']:>9.1f} {r['attn_share'] * 100:>6.1f} {r['e2e_s']:>10.1f} "
              f"{r.get('speedup_vs_cudnn') or float('nan'):>7.2f} {'-' if diff is None else f'{diff:.1e}':>8}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time Wan2.1-1.3B 480p transformer steps with PARO (bf16 and INT8 kernels) "
        "against stock cuDNN attention.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--methods", default=",".join(ALL_METHODS), type=lambda s: parse_list(s, ALL_METHODS))
    parser.add_argument("--densities", default="0.5,0.3,0.2", help="synthetic plan densities")
    parser.add_argument("--plan", type=Path, default=None, help="a calibrated plan file instead")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up forwards per row")
    parser.add_argument("--repeat", type=int, default=5, help="timed CFG steps per row")
    add_out_argument(parser)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny transformer, on CUDA if present else the CPU (bf16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replot", type=Path, metavar="JSON")
    args = parser.parse_args(argv)
    args.densities = [float(d) for d in parse_list(args.densities)]
    if not all(0 < d <= 1 for d in args.densities):
        parser.error("--densities must lie in (0, 1]")
    if args.smoke:
        args.warmup, args.repeat = min(args.warmup, 1), min(args.repeat, 2)
    args.models, args.measure_gna_dense_step = [MODEL], False  # read by e2e_bench.collect_metadata
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot_results(saved["results"], saved["metadata"], args.replot.with_suffix(".png"))
        report(saved["results"], saved["metadata"])
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16  # PARO's INT8 path takes 16-bit inputs, on the CPU too
    if device.type == "cpu":
        os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch reference is far faster there
    metadata = collect_metadata(args, device, dtype)
    metadata.update(bench="paro_e2e_bench", model="smoke-tiny" if args.smoke else MODEL,
                    step_index=STEP_INDEX, block_size=BLOCK_SIZE)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        rows = run(args, device, dtype, Path(work_dir))
    metadata["elapsed_s"] = round(time.perf_counter() - start, 1)
    paths = save(rows, metadata, args.out)
    report(rows, metadata)
    print(f"\nelapsed {metadata['elapsed_s']} s; wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
