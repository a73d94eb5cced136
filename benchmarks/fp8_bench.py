"""Micro-benchmark of issue 13: INT8 Q.K + FP8 P.V attention against bf16, INT8, FA4 and peers.

What it measures (``kernels`` mode, the default)
-------------------------------------------------
At Wan2.1-1.3B 480p (32,760 tokens x 12 heads) and Wan2.1-14B 720p (75,600 x 40), head_dim 128,
B=1, bf16, (B, S, H, D) inputs, for a dense plan and random per-head plans of 25% and 12.5% of the
128-token key blocks (diagonal kept), one run, the same plan for every kernel:

* ``bf16``: fastdit's Triton kernel; ``fa4``: FlashAttention-4 through fastdit's ``flash4``
  backend (dense or block-sparse, as the plan is), when it can run here;
* ``int8``: ``quantize="int8"`` (INT8 Q.K, bf16 P.V);
* ``int8-fp8/<variant>``: ``quantize="int8-fp8"`` with each accumulation switch and V layout:
  ``acc0-vt`` (two-level accumulation, V transposed: the default), ``acc0-v`` (V untransposed),
  ``acc64-vt`` (``max_num_imprecise_acc=64``), ``accdef-vt`` (Triton's default: no promotion);
* ``fp8``: ``quantize="fp8"`` (e4m3 Q.K^T with the same scales, FP8 P.V as ``acc0-vt``);
* dense plan only: ``sage`` (``sageattention.sageattn``, if installed) and ``cudnn`` (SDPA).

Quantization is inside every quantized timing (the whole ``block_sparse_attention`` call). It
reports the median ms, TFLOP/s on computed blocks (``4 * pairs * D``), the ratio to FA4 at the
same plan, and the quantized outputs' cosine and relative L1 against ``bf16`` (unit-variance
inputs; the default variant also with keys sharing a per-head offset of 20). Targets (issue 13):
``int8-fp8`` >= 1.25x FA4 (dense and each sparse map); cosine >= 0.999, rel L1 <= 3%.

``--e2e`` (issue 13's end-to-end target): a full-size Wan2.1-1.3B transformer (random weights,
480p x 81 frames: 32,760 tokens), one cond forward per timing, for three methods: ``dense``
(``fastdit.Dense()``, step 20), ``radial`` (``Radial.preset("wan2.1-14b")``, its sparse step: the
first after its 12 dense steps, layer 0 on the stock path) and ``paro`` (a plan calibrated in
process on this model: one forward with PARO's block-mass collector, density ``--paro-density``,
one timestep bucket; step 20), each in bf16 on the fastest backend (``backend`` auto: FA4 where
it runs the call; the row names the backend), ``int8``, ``int8-fp8`` and ``fp8``. Every row warms up
(``--warmup`` forwards: Triton and FA4 compile there), then takes the median of ``--repeat``
forwards, each between CUDA synchronizations; it reports the forward time, the time inside the
self-attention modules (QKV/out projections included), the speedup of both over the method's
bf16 row, and the output's relative L2/L1 error and cosine against the method's bf16 output.
Whatever stays on diffusers' stock path (cross-attention, Radial's dense layer) runs on cuDNN.

    python -m benchmarks.fp8_bench                 # kernels, both shapes (about 3 min on an H200)
    python -m benchmarks.fp8_bench --e2e           # Wan2.1-1.3B, 12 rows (about 1.5-2 min)
    python -m benchmarks.fp8_bench --smoke         # tiny shapes on the CPU (interpreter)
    python -m benchmarks.fp8_bench --e2e --smoke   # tiny Wan, the whole path (about 1.5 min)

Writes ``fp8_bench_<gpu>_<date>.json`` (or ``fp8_e2e_...``) into ``--out`` (default
``benchmarks/results/<gpu>_<date>``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:  # before Triton is imported: the interpreter decides at decoration
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import (  # noqa: E402
    SHAPES,
    SMOKE_SHAPES,
    Timing,
    accuracy,
    add_out_argument,
    benchmark_ms,
    random_block_map,
    synchronize,
)
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.kernels import BlockSparsity, block_sparse_attention, explain_backends  # noqa: E402
from fastdit.kernels.triton import int8_attention  # noqa: E402

DENSITIES = (1.0, 0.25, 0.125)
KEY_OFFSET = 20.0
SPEEDUP_TARGET = 1.25
# (name, FP8_ACCUMULATION, V_TRANSPOSED)
FP8_VARIANTS = (("acc0-vt", 0, True), ("acc0-v", 0, False), ("acc64-vt", 64, True), ("accdef-vt", -1, True))


@contextlib.contextmanager
def fp8_variant(accumulation: int, transposed: bool):
    saved = int8_attention.FP8_ACCUMULATION, int8_attention.V_TRANSPOSED
    int8_attention.FP8_ACCUMULATION, int8_attention.V_TRANSPOSED = accumulation, transposed
    try:
        yield
    finally:
        int8_attention.FP8_ACCUMULATION, int8_attention.V_TRANSPOSED = saved


def peer_calls(q, k, v, device) -> dict:
    """Dense-only peers: SageAttention (if installed) and cuDNN SDPA, on (B, H, S, D) copies."""
    calls = {}
    if device.type != "cuda":
        return calls
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    try:
        from sageattention import sageattn

        calls["sage"] = lambda: sageattn(q_t, k_t, v_t, tensor_layout="HND")
    except ImportError:
        print("sage: sageattention not installed", flush=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def cudnn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(q_t, k_t, v_t)

    calls["cudnn"] = cudnn
    return calls


def run_kernels(args, device: torch.device) -> list[dict]:
    rows = []
    shapes = [SMOKE_SHAPES["smoke-300"]] if args.smoke else [SHAPES[name] for name in args.shapes]
    timing = Timing(2.0, 5.0, 2, 1) if args.smoke else Timing(25.0, 100.0, 3, 1)
    backend = "triton" if device.type == "cuda" else None
    for shape in shapes:
        generator = torch.Generator(device=device).manual_seed(args.seed)
        dims = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
        q, k, v = (torch.randn(*dims, device=device, dtype=torch.bfloat16, generator=generator)
                   for _ in range(3))
        offset = torch.randn(shape.heads, shape.head_dim, device=device, generator=generator)
        k_offset = (k.float() + KEY_OFFSET * offset).to(k.dtype)
        num_blocks = math.ceil(shape.seq_len / 128)
        fa4_reason = explain_backends(device, torch.bfloat16, shape.head_dim)["flash4"]
        for density in args.densities:
            if density == 1.0:
                plan = BlockSparsity.dense(shape.seq_len, shape.seq_len, 128, device=device)
            else:
                plan = BlockSparsity.from_block_map(
                    random_block_map(shape.heads, num_blocks, density, generator, device), 128)
            pairs = plan.computed_pairs(shape.seq_len, shape.seq_len) * (shape.heads // plan.kv_counts.shape[1])
            flop = 4.0 * pairs * shape.head_dim * shape.batch
            calls = {
                "bf16": (lambda: block_sparse_attention(q, k, v, plan, backend=backend), None),
                "fa4": (lambda: block_sparse_attention(q, k, v, plan, backend="flash4"), None),
                "int8": (lambda: block_sparse_attention(q, k, v, plan, backend=backend, quantize="int8"),
                         None),
            }
            for name, accumulation, transposed in FP8_VARIANTS:
                calls[f"int8-fp8/{name}"] = (
                    lambda: block_sparse_attention(q, k, v, plan, backend=backend, quantize="int8-fp8"),
                    (accumulation, transposed),
                )
            calls["fp8"] = (lambda: block_sparse_attention(q, k, v, plan, backend=backend, quantize="fp8"),
                            None)
            if density == 1.0:
                calls.update({name: (call, None) for name, call in peer_calls(q, k, v, device).items()})
            reference = block_sparse_attention(q, k, v, plan, backend=backend)
            reference_offset = None
            plan_rows = []
            for method, (call, variant) in calls.items():
                row = dict(shape=shape.name, seq_len=shape.seq_len, heads=shape.heads,
                           density=round(plan.density, 4), method=method)
                if method == "fa4" and fa4_reason is not None:
                    row.update(status="skipped", error=fa4_reason)
                    plan_rows.append(row)
                    print(format_row(row), flush=True)
                    continue
                context = fp8_variant(*variant) if variant else contextlib.nullcontext()
                try:
                    with context:
                        ms = benchmark_ms(call, device, timing)
                        row.update(status="ok", ms=ms, tflops=flop / ms / 1e9)
                        if method.startswith("int8") or method == "fp8":
                            row["cosine"], row["rel_l1"] = accuracy(call(), reference)
                        if method in ("int8", "int8-fp8/acc0-vt", "fp8"):
                            if reference_offset is None:
                                reference_offset = block_sparse_attention(q, k_offset, v, plan, backend=backend)
                            quantize = method.split("/")[0]
                            out = block_sparse_attention(q, k_offset, v, plan, backend=backend, quantize=quantize)
                            row["cosine_offset20"], row["rel_l1_offset20"] = accuracy(out, reference_offset)
                except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                    row.update(status="error",
                               error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                plan_rows.append(row)
                print(format_row(row), flush=True)
            fa4_ms = next((r.get("ms") for r in plan_rows if r["method"] == "fa4"), None)
            for row in plan_rows:
                if fa4_ms and row.get("ms"):
                    row["vs_fa4"] = fa4_ms / row["ms"]
            rows += plan_rows
        del q, k, v, k_offset
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: dict) -> str:
    return (f"{row['shape']:>12} density {row['density']:<6} {row['method']:>18} {row['status']:>7} "
            f"{fmt(row.get('ms'), '9.3f')} ms {fmt(row.get('tflops'), '7.1f')} TFLOP/s "
            f"x{fmt(row.get('vs_fa4'), '.2f')} FA4  cos {fmt(row.get('cosine'), '.5f')} "
            f"L1 {fmt(row.get('rel_l1'), '.4f')}  offset-20 cos {fmt(row.get('cosine_offset20'), '.5f')} "
            f"L1 {fmt(row.get('rel_l1_offset20'), '.4f')} {row.get('error', '')}")


def verdicts(rows: list[dict], smoke: bool) -> list[str]:
    lines = []
    for row in rows:  # int8-fp8 (its best variant), and fp8
        if row["method"] not in ("int8-fp8/acc0-vt", "fp8") or row["status"] != "ok":
            continue
        family = row["method"].split("/")[0]
        best = max((r for r in rows if r["shape"] == row["shape"] and r["density"] == row["density"]
                    and r["method"].split("/")[0] == family and r.get("vs_fa4")),
                   key=lambda r: r["vs_fa4"], default=None)
        speed = "no FA4 row" if best is None else (
            f"best variant {best['method']} x{best['vs_fa4']:.2f} FA4 (target x{SPEEDUP_TARGET})")
        accurate = (row["cosine"] >= 0.999 and row["rel_l1"] <= 0.03
                    and row.get("cosine_offset20", 0) >= 0.999 and row.get("rel_l1_offset20", 1) <= 0.03)
        met = best is not None and best["vs_fa4"] >= SPEEDUP_TARGET and accurate
        verdict = "N/A " if smoke else ("PASS" if met else "MISS")
        lines.append(f"{verdict} {family} {row['shape']} density {row['density']}: {speed}; cosine "
                     f"{row['cosine']:.5f}/{row.get('cosine_offset20', float('nan')):.5f}, rel L1 "
                     f"{row['rel_l1']:.4f}/{row.get('rel_l1_offset20', float('nan')):.4f} (unit/offset-20 K)")
    return lines


# --------------------------------------------------------------------------- end to end
E2E_MODES = (None, "int8", "int8-fp8", "fp8")
E2E_METHODS = ("dense", "radial", "paro")
PARO_DENSITY = 0.3  # fastdit's calibration default (PAROAttention's lossless 20-30%, upper end)
DENSE_STEP = 20  # the step index of the Dense and PARO rows (every step of theirs runs sparse)


def calibrate_paro(model, inputs, timestep, device, path: Path, density: float):
    """A PARO plan of this (random-weight) model, calibrated in process
    (:func:`fastdit.methods.paro.calibrate.calibrate_model`): one cond forward at ``DENSE_STEP`` collected,
    one timestep bucket, the per-row blocks of ``density`` (diagonal kept), saved to ``path``.
    Returns ``(plan, seconds)``."""
    from fastdit.methods.paro.calibrate import calibrate_model

    from benchmarks.e2e_bench import NUM_STEPS

    def run():
        with model.cache_context("cond", step_index=DENSE_STEP, num_inference_steps=NUM_STEPS):
            model(hidden_states=inputs.latent, timestep=timestep,
                  encoder_hidden_states=inputs.text_cond, return_dict=False)

    start = time.perf_counter()
    plan = calibrate_model(model, run, NUM_STEPS, density=density, num_buckets=1, output=path,
                           calibration={"in_process": "one cond forward of the random-weight model"})
    synchronize(device)
    return plan, time.perf_counter() - start


def time_forwards(model, inputs, timestep, device, *, step_index: int, warmup: int, repeat: int):
    """``warmup`` untimed cond forwards at ``step_index`` (Triton and FA4 compile on the first),
    then ``repeat`` timed ones, each between two CUDA synchronizations. Returns (forward ms list,
    self-attention ms list (``attn1`` modules, QKV/out projections included), last output)."""
    from benchmarks.e2e_bench import NUM_STEPS, AttentionTimer

    timer = AttentionTimer([block.attn1 for block in model.blocks], device)

    def forward():
        with model.cache_context("cond", step_index=step_index, num_inference_steps=NUM_STEPS):
            return model(hidden_states=inputs.latent, timestep=timestep,
                         encoder_hidden_states=inputs.text_cond, return_dict=False)[0]

    forward_ms, attention_ms, output = [], [], None
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                forward()
            synchronize(device)
            timer.collect_ms()
            for _ in range(repeat):
                synchronize(device)
                start = time.perf_counter()
                output = forward()
                synchronize(device)
                forward_ms.append((time.perf_counter() - start) * 1e3)
                attention_ms.append(timer.collect_ms())
    finally:
        timer.remove()
    return forward_ms, attention_ms, output


def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    out, ref = out.double().flatten(), ref.double().flatten()
    return dict(rel_l2=((out - ref).norm() / ref.norm()).item(),
                rel_l1=((out - ref).abs().sum() / ref.abs().sum()).item(),
                cosine=torch.nn.functional.cosine_similarity(out, ref, dim=0).item())


def run_e2e(args, device: torch.device) -> list[dict]:
    """Wan2.1-1.3B 480p (random weights), one cond forward per timing: Dense (step 20), Radial's
    sparse step (the preset's first step after its dense ones) and PARO (a plan calibrated in
    process, step 20), each in bf16 on the fastest backend (``backend`` auto: FA4 where it runs
    the call), ``int8``, ``int8-fp8`` and ``fp8``. Each row: warm-up forwards, then the median of timed
    forwards; output error against the same method's bf16 output."""
    import tempfile

    import fastdit
    from benchmarks.e2e_bench import (
        MODELS, RADIAL_PRESET, SMOKE_MODELS, TIMESTEP, build_transformer, make_inputs, sdpa_context,
    )
    from fastdit.kernels import choose_backend

    spec = SMOKE_MODELS["smoke-tiny"] if args.smoke else MODELS["wan13b-480p"]
    dtype = torch.bfloat16
    warmup, repeat = (1, 2) if args.smoke else (args.warmup, args.repeat)
    model = build_transformer(spec, device, dtype, args.seed)
    inputs = make_inputs(spec, device, dtype, args.seed)
    timestep = torch.tensor([TIMESTEP], device=device)
    head_dim = spec.config["attention_head_dim"]
    # Whatever stays on diffusers' stock path (cross-attention, Radial's dense first layer) runs
    # on cuDNN, as in benchmarks/e2e_bench.py.
    sdpa = sdpa_context("CUDNN_ATTENTION", device)
    radial = fastdit.Radial.preset(RADIAL_PRESET)
    radial_schedule = fastdit.Schedule.from_method(radial)
    rows = []
    with tempfile.TemporaryDirectory() as work_dir:
        paro_path = Path(work_dir) / "paro_plan.safetensors"
        if "paro" in args.e2e_methods:
            with sdpa():
                plan, seconds = calibrate_paro(model, inputs, timestep, device, paro_path,
                                               args.paro_density)
            print(f"PARO calibrated in process: density {plan.density:.3f} "
                  f"(target {args.paro_density}), {seconds:.1f} s", flush=True)
        for method_name in args.e2e_methods:
            reference = None
            for mode in E2E_MODES:
                if method_name == "dense":
                    method, schedule, step, apply_quantize = fastdit.Dense(), None, DENSE_STEP, mode
                elif method_name == "radial":
                    method, schedule = radial, radial_schedule
                    step, apply_quantize = radial_schedule.dense_steps, mode
                else:  # PARO carries its quantize
                    method, schedule = fastdit.PARO(plan=paro_path, quantize=mode), None
                    step, apply_quantize = DENSE_STEP, None
                phase = "sparse-step" if method_name == "radial" else "step"
                row = dict(model=spec.name, method=method_name, phase=phase, step_index=step,
                           quantize=mode or "bf16",
                           backend=choose_backend(device, dtype, head_dim, quantize=mode,
                                                  dense=method_name == "dense"))
                try:
                    handle = fastdit.apply(model, method, schedule, quantize=apply_quantize)
                    try:
                        with sdpa():
                            forward_ms, attention_ms, out = time_forwards(
                                model, inputs, timestep, device, step_index=step, warmup=warmup,
                                repeat=repeat)
                        recorded = [d for (_, s), d in handle.state.densities.items() if s == step]
                    finally:
                        handle.remove()
                except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                    row.update(status="error",
                               error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                    rows.append(row)
                    print(format_e2e_row(row), flush=True)
                    continue
                row.update(status="ok", forward_ms=statistics.median(forward_ms),
                           forward_ms_min=min(forward_ms),
                           attention_ms=statistics.median(attention_ms), repeats=len(forward_ms),
                           density=sum(recorded) / len(recorded) if recorded else None)
                out = out.float()
                if mode is None:
                    reference = out
                elif reference is not None:
                    row.update(output_error(out, reference))
                rows.append(row)
                print(format_e2e_row(row), flush=True)
    for row in rows:
        bf16 = e2e_row(rows, row["method"], "bf16")
        if bf16 and row["status"] == "ok":
            row["forward_speedup"] = bf16["forward_ms"] / row["forward_ms"]
            row["attention_speedup"] = bf16["attention_ms"] / row["attention_ms"]
    return rows


def e2e_row(rows: list[dict], method: str, quantize: str) -> dict | None:
    return next((r for r in rows if r["method"] == method and r["quantize"] == quantize
                 and r["status"] == "ok"), None)


def e2e_summary(rows: list[dict]) -> list[str]:
    """Per method: int8-fp8 against bf16 on the fastest backend (the issue's end-to-end line)."""
    lines = []
    for method in E2E_METHODS:
        bf16, fp8 = e2e_row(rows, method, "bf16"), e2e_row(rows, method, "int8-fp8")
        if bf16 is None or fp8 is None:
            continue
        lines.append(f"{method} {fp8['phase']}: int8-fp8 {fp8['forward_ms']:.1f} ms vs bf16 "
                     f"({bf16['backend']}) {bf16['forward_ms']:.1f} ms per forward: "
                     f"x{fp8['forward_speedup']:.2f} "
                     f"(attention modules x{fp8['attention_speedup']:.2f}); output rel L2 "
                     f"{fp8['rel_l2']:.4f}, rel L1 {fp8['rel_l1']:.4f}, cosine {fp8['cosine']:.6f}")
    return lines


def format_e2e_row(row: dict) -> str:
    head = (f"{row['model']:>12} {row['method']:>6} {row['phase']:>11} {row['quantize']:>8} "
            f"on {row['backend']:<9}")
    if row["status"] != "ok":
        return f"{head} {row['status'].upper()}: {row.get('error', '')}"
    return (f"{head} forward {row['forward_ms']:9.1f} ms "
            f"(x{fmt(row.get('forward_speedup'), '.2f')}) attention {row['attention_ms']:8.1f} ms "
            f"(x{fmt(row.get('attention_speedup'), '.2f')}) density {fmt(row.get('density'), '.3f')}"
            f"  vs bf16: rel L2 {fmt(row.get('rel_l2'), '.4f')} rel L1 "
            f"{fmt(row.get('rel_l1'), '.4f')} cos {fmt(row.get('cosine'), '.6f')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e2e", action="store_true",
                        help="Wan2.1-1.3B 480p forwards: Dense, Radial, PARO x bf16/int8/int8-fp8")
    parser.add_argument("--e2e-methods", default=",".join(E2E_METHODS),
                        help=f"--e2e: subset of {E2E_METHODS}")
    parser.add_argument("--paro-density", type=float, default=PARO_DENSITY,
                        help="--e2e: PARO's calibration target")
    parser.add_argument("--warmup", type=int, default=2, help="--e2e: untimed forwards per row")
    parser.add_argument("--repeat", type=int, default=5, help="--e2e: timed forwards per row (median)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--seed", type=int, default=0)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    args.shapes = [s for s in args.shapes.split(",") if s]
    args.densities = [float(d) for d in args.densities.split(",") if d]
    args.e2e_methods = [m for m in args.e2e_methods.split(",") if m]
    unknown = [m for m in args.e2e_methods if m not in E2E_METHODS]
    if unknown:
        parser.error(f"--e2e-methods must be a subset of {E2E_METHODS}, got unknown {unknown}")
    if not 0 < args.paro_density <= 1:
        parser.error(f"--paro-density must lie in (0, 1], got {args.paro_density}")
    if args.warmup < 1 or args.repeat < 1:
        parser.error(f"--warmup and --repeat must be >= 1, got {args.warmup} and {args.repeat}")
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {gpu}, torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    rows = run_e2e(args, device) if args.e2e else run_kernels(args, device)
    lines = e2e_summary(rows) if args.e2e else verdicts(rows, args.smoke or device.type != "cuda")
    elapsed = round(time.perf_counter() - start, 1)
    print("\n" + "\n".join((format_e2e_row if args.e2e else format_row)(r) for r in rows))
    print("\n".join(lines))
    slug = "".join(c if c.isalnum() else "-" for c in gpu.lower()).strip("-")
    stem = f"fp8_{'e2e' if args.e2e else 'bench'}_{slug}_{datetime.date.today().isoformat()}"
    if args.smoke:
        stem += "_smoke"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    atomic_write_text(path, json.dumps(dict(gpu=gpu, torch=torch.__version__, elapsed_s=elapsed, rows=rows,
                                    verdicts=lines), indent=1))
    print(f"elapsed {elapsed} s; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
