"""Launch-configuration sweep of fastdit's FP8 attention kernel (issue 13), against FA4.

At Wan2.1-14B 720p (75,600 tokens x 40 heads x 128, B=1, bf16, (B, S, H, D)), for a dense plan
and random 25% and 12.5% plans (128-token blocks, diagonal kept, the same plan for every row),
it times:

* FA4 bf16 through fastdit's ``flash4`` backend (dense or block-sparse): the reference;
* the quantization passes on their own (K's mean alone, INT8 and e4m3 Q/K quantization, V to
  e4m3 transposed), and their share of the ``int8-fp8`` attention call;
* Hopper automatic warp specialization (``triton_common.WARP_SPECIALIZE``): the bf16 Triton
  kernel and ``quantize="int8-fp8"`` with the switch on (its own launch configuration, and for
  int8-fp8 also 3 stages), each next to the switch off (the default configuration), with the
  output of "on" against "off" (a miscompiled kernel shows there, status ``wrong``) and the warp
  counts Triton compiled (12 where it specialized 4-warp tiles). Each mode runs in a child
  process with a time limit: Triton's Hopper pass may abort the process (its asserts are compiled
  in) and a wrong warp-specialized kernel may hang; either costs only that mode's rows;
* ``quantize="int8-fp8"`` (two-level accumulation, V transposed) under every launch
  configuration of :data:`CONFIGS` (``int8_attention.FP8_LAUNCH_CONFIG``: BLOCK_M, BLOCK_N,
  num_warps, num_stages), then with Triton's default accumulation (``FP8_ACCUMULATION=-1``)
  under the 2 fastest, then ``quantize="fp8"`` (e4m3 Q.K^T) under the 2 fastest and the default.

Every timing is a whole ``block_sparse_attention`` call (quantization included), the median of
``triton.testing.do_bench``; TFLOP/s on computed blocks (``4 * pairs * D``) and the ratio to FA4
at the same plan (issue 13's target: >= 1.25x). Configurations that do not fit the GPU, and
compile failures, are recorded as errors. ``--budget-s`` stops starting new configurations once
exceeded (each costs a Triton compile, a few seconds); what ran is written either way. The best
configuration per mode goes into ``int8_attention`` by hand (``FP8_LAUNCH_CONFIG`` or a table of
its own).

    python -m benchmarks.fp8_tune                  # ~200 s on an H200 (about 20 compiles)
    python -m benchmarks.fp8_tune --no-warp-specialize   # without the warp-specialization rows
    python -m benchmarks.fp8_tune --warp-specialize-only # FA4 and those rows, ~100 s
    python -m benchmarks.fp8_tune --densities 1.0 --budget-s 120
    python -m benchmarks.fp8_tune --smoke          # tiny shape on the CPU (interpreter), ~1 min

Writes ``fp8_tune_<gpu>_<date>.json`` into ``--out`` (default ``benchmarks/results/<gpu>_<date>``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import signal
import subprocess
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
    Shape,
    Timing,
    add_out_argument,
    benchmark_ms,
    device_slug,
    random_block_map,
)
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.kernels import BlockSparsity, block_sparse_attention, explain_backends  # noqa: E402
from fastdit.kernels.quantized import sampled_key_mean  # noqa: E402
from fastdit.kernels.triton import attention, int8_attention, triton_common  # noqa: E402
from fastdit.kernels.triton.quantize import triton_quantize_qk, triton_quantize_v_fp8  # noqa: E402

SHAPE = "wan14b-720p"
DENSITIES = (1.0, 0.25, 0.125)  # the issue-13 targets: dense, 25% and 12.5% plans
# (BLOCK_M, BLOCK_N, num_warps, num_stages). 64-row tiles on one warpgroup (the INT8 kernel's
# tuned choice, the default here), 128-row tiles on two warpgroups (FA3's split), 64- and 128-key
# tiles, 2-3 stages (4 stages, mixed warp counts and some 2-stage ones were cut to make room for
# the warp-specialization rows).
CONFIGS = (
    (64, 128, 4, 2), (64, 128, 4, 3), (64, 64, 4, 3),
    (128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3),
)
SMOKE_CONFIGS = ((64, 64, 4, 2), (128, 128, 4, 1))
SMOKE_SHAPE = Shape("smoke-256", seq_len=256, heads=2, head_dim=64)
SPEEDUP_TARGET = 1.25
# Warp specialization: the modes timed with the switch on and off, and for int8-fp8 the extra
# launch configurations tried with it on (FP8_LAUNCH_CONFIG; None is the switch's own,
# triton_common.WARP_SPECIALIZED_CONFIG). A worker that runs past its limit is stopped.
WARP_SPECIALIZE_MODES = ("bf16", "int8-fp8")
WARP_SPECIALIZED_FP8_CONFIGS = (None, (128, 128, 4, 3))
WORKER_TIMEOUT_S = 75.0  # a worker needs about 20-40 s on an H200 (2-3 compiles)
# On/off outputs further apart than this (relative L1) mark the warp-specialized row "wrong":
# the same arithmetic in another order differs by bf16 rounding (~1e-3 at most).
WARP_SPECIALIZE_MAX_REL_L1 = 1e-2


@contextlib.contextmanager
def fp8_settings(config, accumulation: int = 0, warp_specialize: bool = False):
    """FP8_LAUNCH_CONFIG, FP8_ACCUMULATION and the warp-specialization switch set for a while
    (the switch through FASTDIT_WARP_SPECIALIZE, which a shell's own value would override)."""
    saved = (int8_attention.FP8_LAUNCH_CONFIG, int8_attention.FP8_ACCUMULATION,
             os.environ.get(triton_common.WARP_SPECIALIZE_ENV))
    int8_attention.FP8_LAUNCH_CONFIG, int8_attention.FP8_ACCUMULATION = config, accumulation
    os.environ[triton_common.WARP_SPECIALIZE_ENV] = "1" if warp_specialize else "0"
    try:
        yield
    finally:
        int8_attention.FP8_LAUNCH_CONFIG, int8_attention.FP8_ACCUMULATION, switch = saved
        if switch is None:
            os.environ.pop(triton_common.WARP_SPECIALIZE_ENV, None)
        else:
            os.environ[triton_common.WARP_SPECIALIZE_ENV] = switch


def describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def compiled_warps(kernel) -> list[int] | None:
    """The warp counts of ``kernel``'s compiled variants in this process (a warp-specialized one
    counts its producer and consumer groups: 12 for 4-warp tiles), or None where this Triton
    keeps its cache otherwise."""
    try:
        warps = set()
        for cache in kernel.device_caches.values():
            for compiled in cache[0].values():
                compiled = compiled.result() if hasattr(compiled, "result") else compiled
                warps.add(compiled.metadata.num_warps)
        return sorted(warps)
    except (AttributeError, IndexError, TypeError):
        return None


WORKER_ROW = "WORKER-ROW "  # prefix of the rows a worker prints, one JSON object a line


class Sweep:
    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.shape = SMOKE_SHAPE if args.smoke else SHAPES[args.shape]
        self.timing = Timing(1.0, 3.0, 2, 1) if args.smoke else Timing(10.0, 50.0, 3, 1)
        self.start = time.perf_counter()
        self.rows: list[dict] = []
        shape = self.shape
        generator = torch.Generator(device=device).manual_seed(args.seed)
        dims = (1, shape.seq_len, shape.heads, shape.head_dim)
        self.q, self.k, self.v = (
            torch.randn(*dims, device=device, dtype=torch.bfloat16, generator=generator) for _ in range(3))
        num_blocks = math.ceil(shape.seq_len / 128)
        self.plans = {}
        for density in args.densities:
            if density == 1.0:
                plan = BlockSparsity.dense(shape.seq_len, shape.seq_len, 128, device=device)
            else:
                plan = BlockSparsity.from_block_map(
                    random_block_map(shape.heads, num_blocks, density, generator, device), 128)
            pairs = (plan.computed_pairs(shape.seq_len, shape.seq_len)
                     * (shape.heads // plan.kv_counts.shape[1]))
            self.plans[density] = (plan, 4.0 * pairs * shape.head_dim)
        self.fa4_ms: dict[float, float] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget_s

    def row(self, **fields) -> dict:
        row = dict(shape=self.shape.name, **fields)
        self.rows.append(row)
        print(format_row(row), flush=True)
        return row

    def time_call(self, call) -> float:
        return benchmark_ms(call, self.device, self.timing)

    def fa4(self) -> None:
        reason = explain_backends(self.device, torch.bfloat16, self.shape.head_dim)["flash4"]
        for density, (plan, flop) in self.plans.items():
            if reason is not None:
                self.row(kind="fa4", mode="fa4-bf16", density=density, status="skipped",
                         error=reason)
                continue
            try:
                ms = self.time_call(
                    lambda: block_sparse_attention(self.q, self.k, self.v, plan, backend="flash4"))
            except Exception as exc:  # noqa: BLE001 - the sweep goes on without a ratio
                self.row(kind="fa4", mode="fa4-bf16", density=density, status="error",
                         error=describe(exc))
                continue
            self.fa4_ms[density] = ms
            self.row(kind="fa4", mode="fa4-bf16", density=density, status="ok", ms=ms,
                     tflops=flop / ms / 1e9, vs_fa4=1.0)

    def quantization_passes(self) -> None:
        """The quantization passes alone (they are inside every attention timing too)."""
        q, k, v = self.q, self.k, self.v
        common = dict(q_block_size=128, kv_block_size=128, scale=self.shape.head_dim**-0.5,
                      layout="bshd", key_lengths=None, lse_shift=False)
        passes = {
            "K sampled mean (64 rows per head)": lambda: sampled_key_mean(k, "bshd", None),
            "Q and K to INT8 (sampled mean included)": lambda: triton_quantize_qk(q, k, **common),
            "Q and K to e4m3 (sampled mean included)": lambda: triton_quantize_qk(q, k, fp8=True, **common),
            "V to e4m3, transposed": lambda: triton_quantize_v_fp8(
                v, layout="bshd", key_lengths=None, transposed=True),
        }
        for name, call in passes.items():
            try:
                ms = self.time_call(call)
            except Exception as exc:  # noqa: BLE001
                self.row(kind="quantization", mode=name, status="error", error=describe(exc))
                continue
            self.row(kind="quantization", mode=name, status="ok", ms=ms)

    def attention(self, mode: str, config, accumulation: int = 0) -> list[dict]:
        rows = []
        for density, (plan, flop) in self.plans.items():
            def call():
                return block_sparse_attention(self.q, self.k, self.v, plan, backend="triton",
                                              quantize=mode)

            fields = dict(kind="attention", mode=mode, accumulation=accumulation,
                          config=list(config) if config else "default", density=round(plan.density, 4))
            try:
                with fp8_settings(config, accumulation):
                    ms = self.time_call(call)
            except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result
                rows.append(self.row(**fields, status="error", error=describe(exc)))
                break  # the same compiled kernel serves every density
            fa4 = self.fa4_ms.get(density)
            rows.append(self.row(**fields, status="ok", ms=ms, tflops=flop / ms / 1e9,
                                 vs_fa4=fa4 / ms if fa4 else None))
        return rows

    def warp_specialize(self) -> None:
        """Each mode of :data:`WARP_SPECIALIZE_MODES` in a worker process (this script with
        ``--worker MODE``): its rows, and one error row if it dies or runs past
        :data:`WORKER_TIMEOUT_S`."""
        for mode in WARP_SPECIALIZE_MODES:
            if self.over_budget():
                self.row(kind="warp_specialize", mode=mode, status="skipped",
                         error=f"over --budget-s {self.args.budget_s}")
                continue
            command = [sys.executable, "-m", "benchmarks.fp8_tune", "--worker", mode,
                       "--shape", self.args.shape, "--seed", str(self.args.seed),
                       "--densities", ",".join(map(str, self.args.densities))]
            if self.args.smoke:
                command.append("--smoke")
            timeout = WORKER_TIMEOUT_S * (4 if self.args.smoke else 1)  # the interpreter is slow
            error = None
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                stdout, stderr, code = done.stdout, done.stderr, done.returncode
            except subprocess.TimeoutExpired as expired:
                stdout, stderr, code = expired.stdout, expired.stderr, None
                error = f"worker stopped after {timeout:.0f} s"
            stdout, stderr = _text(stdout), _text(stderr)
            for line in stdout.splitlines():
                if line.startswith(WORKER_ROW):
                    row = json.loads(line[len(WORKER_ROW):])
                    fa4 = self.fa4_ms.get(row.pop("density_requested"))
                    if fa4 and row.get("ms"):
                        row["vs_fa4"] = fa4 / row["ms"]
                    self.row(**row)
            if code:
                error = f"worker exited with {_exit_status(code)}"
            if error is not None:
                last = [line for line in stderr.splitlines() if line.strip()][-3:]
                self.row(kind="warp_specialize", mode=mode, status="error",
                         error=f"{error}: {' | '.join(last)[-400:]}")

    def sweep(self, mode: str, configs, accumulation: int = 0) -> None:
        for config in configs:
            if self.over_budget():
                self.row(kind="attention", mode=mode, accumulation=accumulation, config=list(config),
                         status="skipped", error=f"over --budget-s {self.args.budget_s}")
                continue
            self.attention(mode, config, accumulation)

    def fastest(self, mode: str, accumulation: int, count: int) -> list[tuple]:
        """The ``count`` configurations of ``mode`` fastest on the densest plan."""
        densest = max(self.plans)
        timed = [r for r in self.rows if r["kind"] == "attention" and r["mode"] == mode
                 and r.get("accumulation") == accumulation and r["status"] == "ok"
                 and r["density"] == round(self.plans[densest][0].density, 4)
                 and r["config"] != "default"]
        return [tuple(r["config"]) for r in sorted(timed, key=lambda r: r["ms"])[:count]]

    def run(self) -> list[dict]:
        configs = SMOKE_CONFIGS if self.args.smoke else CONFIGS
        self.fa4()
        if self.args.warp_specialize_only:
            self.warp_specialize()
            return self.rows
        self.quantization_passes()
        if self.args.warp_specialize:
            self.warp_specialize()
        if "int8-fp8" in self.args.modes:
            self.sweep("int8-fp8", configs)
            self.sweep("int8-fp8", self.fastest("int8-fp8", 0, 2), accumulation=-1)
        if "fp8" in self.args.modes:
            self.attention("fp8", None)  # the default launch table
            best = self.fastest("int8-fp8", 0, 2) or list(configs[:2])
            self.sweep("fp8", best)
        return self.rows


def _text(output) -> str:
    """A subprocess's captured output as text (bytes when a time limit cut it)."""
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def run_worker(sweep: Sweep, mode: str) -> None:
    """The worker's part: for each plan, ``mode`` (``"bf16"``: the Triton kernel unquantized)
    with WARP_SPECIALIZE off, then on (under each of :data:`WARP_SPECIALIZED_FP8_CONFIGS` for
    int8-fp8): the median time, Triton's compiled warp counts, and the "on" output against the
    "off" one. Prints each row as it is done (``WORKER-ROW <json>``); a call that fails is a
    row with its error, and a configuration that failed is not tried at the next plan. A Triton
    release the library refuses (``triton_common.WARP_SPECIALIZE_WRONG_TRITON``) is timed too:
    its "on" rows are its warp-specialized kernels, and the comparison with "off" shows where
    they are wrong."""
    triton_common.WARP_SPECIALIZE_WRONG_TRITON = {}
    triton_common._wrong_on_this_triton.cache_clear()
    quantize = None if mode == "bf16" else mode
    kernel = attention._block_sparse_attn_fwd if mode == "bf16" else (
        int8_attention._int8_block_sparse_attn_fwd)
    settings = [(False, None)] + [(True, config) for config in (
        WARP_SPECIALIZED_FP8_CONFIGS if mode == "int8-fp8" else (None,))]
    failed = set()
    for density, (plan, flop) in sweep.plans.items():
        def call():
            return block_sparse_attention(sweep.q, sweep.k, sweep.v, plan, backend="triton",
                                          quantize=quantize)

        plain = None
        for switch, config in settings:
            fields = dict(kind="warp_specialize", mode=mode,
                          warp_specialize=switch, config=list(config) if config else "default",
                          density=round(plan.density, 4), density_requested=density)
            if (switch, config) in failed:
                print_row(dict(fields, status="skipped", error="failed at the previous plan"))
                continue
            try:
                with fp8_settings(config, warp_specialize=switch):
                    triton_common.working_launch_configs.clear()
                    out = call()
                    launched = [list(c) for c in triton_common.working_launch_configs.values()]
                    ms = benchmark_ms(call, sweep.device, sweep.timing)
            except Exception as exc:  # noqa: BLE001 - a compile failure is a result
                failed.add((switch, config))
                print_row(dict(fields, status="error", error=describe(exc)))
                continue
            fields.update(status="ok", ms=ms, tflops=flop / ms / 1e9, launched=launched or None,
                          compiled_warps=compiled_warps(kernel))
            if not switch:
                plain = (out, ms)
            elif plain is not None:
                reference = plain[0].double()
                rel_l1 = ((out.double() - reference).abs().sum() / reference.abs().sum()).item()
                wrong = not math.isfinite(rel_l1) or rel_l1 > WARP_SPECIALIZE_MAX_REL_L1
                fields.update(rel_l1_vs_off=rel_l1, vs_off=plain[1] / ms,
                              status="wrong" if wrong else "ok")
            print_row(fields)


def print_row(row: dict) -> None:
    print(WORKER_ROW + json.dumps(row), flush=True)


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_row(row: dict) -> str:
    if row["kind"] == "warp_specialize":
        config = row.get("config", "-")
        config = "x".join(map(str, config)) if isinstance(config, list) else config
        switch = {True: "ws on ", False: "ws off"}.get(row.get("warp_specialize"), "ws    ")
        return (f"{row['shape']:>12} {row['mode']:>9} {switch} {config:>12} density "
                f"{fmt(row.get('density'), '<6')} {row['status']:>7} "
                f"{fmt(row.get('ms'), '9.3f')} ms {fmt(row.get('tflops'), '7.1f')} TFLOP/s "
                f"x{fmt(row.get('vs_fa4'), '.3f')} FA4 x{fmt(row.get('vs_off'), '.3f')} off, "
                f"rel L1 {fmt(row.get('rel_l1_vs_off'), '.1e')}, warps {row.get('compiled_warps')} "
                f"{row.get('error', '')}")
    if row["kind"] == "quantization":
        return (f"{row['shape']:>12} quantization {row['mode']:<34} {row['status']:>7} "
                f"{fmt(row.get('ms'), '9.3f')} ms {row.get('error', '')}")
    config = row.get("config", "-")
    config = "x".join(map(str, config)) if isinstance(config, list) else config
    return (f"{row['shape']:>12} {row['mode']:>9} acc {fmt(row.get('accumulation'), 'd'):>2} "
            f"{config:>12} density {fmt(row.get('density'), '<6')} {row['status']:>7} "
            f"{fmt(row.get('ms'), '9.3f')} ms {fmt(row.get('tflops'), '7.1f')} TFLOP/s "
            f"x{fmt(row.get('vs_fa4'), '.3f')} FA4 {row.get('error', '')}")


def summary(rows: list[dict]) -> list[str]:
    lines = []
    timed = [r for r in rows if r["kind"] == "attention" and r["status"] == "ok"]
    densest = max((r["density"] for r in timed), default=None)
    fastest = min((r["ms"] for r in timed if r["mode"] == "int8-fp8" and r["density"] == densest),
                  default=None)
    for r in rows:
        if r["kind"] == "quantization" and r["status"] == "ok" and fastest is not None:
            lines.append(f"{r['mode']}: {r['ms']:.3f} ms = {100 * r['ms'] / fastest:.2f}% of the "
                         f"fastest int8-fp8 call at density {densest}")
    for r in rows:
        if r["kind"] == "warp_specialize" and r.get("warp_specialize") and r["status"] != "skipped":
            config = r["config"]
            config = "x".join(map(str, config)) if isinstance(config, list) else config
            lines.append(
                f"warp-specialized {r['mode']} {config} at density {r.get('density')}: "
                f"{r['status']}"
                + (f", {r['ms']:.3f} ms, x{fmt(r.get('vs_off'), '.3f')} the switch off, "
                   f"x{fmt(r.get('vs_fa4'), '.3f')} FA4, output rel L1 "
                   f"{fmt(r.get('rel_l1_vs_off'), '.1e')}, "
                   f"warps {r.get('compiled_warps')}" if r.get("ms") else f" {r.get('error', '')}"))
    for mode, density in sorted({(r["mode"], r["density"]) for r in timed}):
        best = min((r for r in timed if r["mode"] == mode and r["density"] == density),
                   key=lambda r: r["ms"])
        config = best["config"]
        config = "x".join(map(str, config)) if isinstance(config, list) else config
        ratio = best.get("vs_fa4")
        verdict = "" if ratio is None else (
            f" {'PASS' if ratio >= SPEEDUP_TARGET else 'MISS'} (target x{SPEEDUP_TARGET})")
        lines.append(f"best {mode} at density {density}: {config} acc {best['accumulation']}, "
                     f"{best['ms']:.3f} ms, {best['tflops']:.1f} TFLOP/s, x{fmt(ratio, '.3f')} FA4"
                     f"{verdict}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default=SHAPE, choices=list(SHAPES))
    parser.add_argument("--densities", default=",".join(map(str, DENSITIES)))
    parser.add_argument("--modes", default="int8-fp8,fp8", help="subset of int8-fp8,fp8")
    parser.add_argument("--budget-s", type=float, default=190.0,
                        help="start no new configuration after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny shape on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--no-warp-specialize", dest="warp_specialize", action="store_false",
                        help="skip the warp-specialization rows")
    parser.add_argument("--warp-specialize-only", action="store_true",
                        help="FA4 and the warp-specialization rows only")
    parser.add_argument("--worker", choices=WARP_SPECIALIZE_MODES, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    args.densities = [float(d) for d in args.densities.split(",") if d]
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.densities or not all(0 < d <= 1 for d in args.densities):
        parser.error(f"--densities must be values in (0, 1], got {args.densities}")
    if not args.modes or not set(args.modes) <= {"int8-fp8", "fp8"}:
        parser.error(f"--modes must be a subset of int8-fp8,fp8, got {args.modes}")
    if args.smoke:
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --smoke for the CPU interpreter)")
    else:
        device = torch.device("cuda")
    if args.worker:
        run_worker(Sweep(args, device), args.worker)
        return 0
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    print(f"device {gpu or 'cpu'}, torch {torch.__version__}", flush=True)
    sweep = Sweep(args, device)
    try:
        rows = sweep.run()
    finally:
        lines = summary(sweep.rows)
        print("\n" + "\n".join(lines))
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        name = f"{device_slug(gpu)}{'-smoke' if args.smoke else ''}_{datetime.date.today().isoformat()}"
        path = out_dir / f"fp8_tune_{name}.json"
        atomic_write_text(path, json.dumps(dict(
            gpu=gpu or "cpu", torch=torch.__version__, shape=sweep.shape.name,
            elapsed_s=round(sweep.elapsed(), 1), rows=sweep.rows, summary=lines), indent=1))
        print(f"elapsed {sweep.elapsed():.1f} s; wrote {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
