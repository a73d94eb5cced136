"""Quality of every method on the embedded trained model: density, PSNR/SSIM against dense, and the
checker's reading of each video against its caption.

    python -m benchmarks.quality_table                 # the table in the README (CPU, see below)
    python -m benchmarks.quality_table --smoke         # tiny sizes and 2 steps: the plumbing
    python -m benchmarks.quality_table --rows dense,radial,gna-3x9x9 --captions 1

For each held-out caption (``fastdit.quality.heldout_specs``: combinations the model never saw in
training; the first ``--captions`` of them) and one seed, the model generates at its defaults (its
``fastdit_defaults.json``; the full model: 33 frames of 256x256 px, 9 x 16 x 16 = 2,304 video
tokens, 20 steps, guidance 5.0):

- ``dense``: diffusers' stock attention, fp32: the reference of every PSNR/SSIM;
- every method at its defaults and at two or three densities (Radial decays, GNA windows, VMoBA
  tau, AdaSpa sparsity, PARO calibrated on this model at two densities, Agent);
- INT8 attention (``quantize="int8"``, which needs a bf16 pipeline: those rows run the bf16
  pipeline, next to its own stock ``dense-bf16`` row that shows what bf16 alone costs);
- composed with a diffusers step cache through fastdit's ``cache=`` (issue 20): FirstBlockCache
  with and without sparsity and INT8, and TaylorSeer (lite, the GPU benchmark's fixed interval
  scaled to the step count: :func:`taylorseer_spec`) with and without Radial, and Radial's
  ``wan2.1-14b`` preset (the GPU benchmarks' Radial) alone and with TaylorSeer;
- controls: random block plans at the density Radial and GNA ran at
  (:class:`fastdit.quality.controls.RandomBlocks`): what keeping the wrong blocks costs.

Per row: mean density (fastdit's per-layer record over layers and steps; 1 for stock runs),
PSNR/SSIM against the fp32 dense video of the same caption and seed (means over captions), and
the checker's share of videos with the caption's colour, shape and motion. GPU speed is not
measured here (the CPU runs fastdit's PyTorch reference path): ``benchmarks/quality_speed.py``
times every row's configuration (:func:`build_rows`, the one definition both use) on a full-size
Wan2.1-1.3B at 480p on the GPU, and ``--speed`` merges its CSV into the tables::

    python -m benchmarks.quality_table --speed benchmarks/results/<gpu>_<date>/quality_speed_<gpu>_<date>.csv \
        --out benchmarks/results/cpu_<date>_quality_table

adds ``gpu_ms`` (ms per generation of the table's step count, transformer only),
``gpu_speedup_vs_cudnn`` (over stock cuDNN SDPA in bf16) and ``gpu_speed_note`` (why a row has
no time: "—" and the reason in the Markdown) to quality_table.{csv,json,md}, without generating.
``--speed`` takes several CSVs of one GPU and date (a later run's timed rows fill the rows the
earlier runs did not time; each keeps its speedup over its own run's dense).

Writes to ``--out`` (default ``benchmarks/results/<gpu>_<date>/quality_table``): ``quality_table.csv``,
``quality_table.json``, ``quality_table.md`` and ``side_by_side.png`` (the first caption: four
frames of every row, dense first), plus ``paro_d*.safetensors`` (the calibrated PARO plans).

Runtime on a 2-core CPU: ``rows x captions`` generations (31 rows), each as long as one
``fastdit generate`` at the model's defaults or longer (sparse methods run on the PyTorch
reference path, slower than dense SDPA there), plus one PARO calibration per
``--paro-densities`` entry. ``--smoke`` takes about 1.5 minutes. On the full-size model
(2026-12-02, a shared 2-core CPU) one calibration took 28 minutes and 22 rows x 1 caption 40
minutes (20 s to 5 min a video with the load): ``--captions 1``, ``--rows``,
``--paro-densities 0.3``, ``--reuse-paro`` or a machine with more cores shorten it.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{os.path.splitext(os.path.basename(__file__))[0]}")

import fastdit  # noqa: E402
from fastdit import LatentGrid  # noqa: E402
from benchmarks.harness import default_out  # noqa: E402
from fastdit.compose import build_cache_config, parse_cache_spec  # noqa: E402
from fastdit.files import atomic_path, atomic_write_text  # noqa: E402
from fastdit.cli.metrics import compare_videos  # noqa: E402
from fastdit.testing.embedded import trained_settings  # noqa: E402
from fastdit.testing.tiny import load_pipeline  # noqa: E402
from fastdit.quality import heldout_specs, score  # noqa: E402
from fastdit.quality.controls import RandomBlocks  # noqa: E402
from fastdit.cli.runner import SpeedProbe, pipeline_call_kwargs, run_generation  # noqa: E402

DEFAULT_OUT = str(default_out() / "quality_table")
PARO_DENSITIES = "0.3,0.5"  # one PARO row per calibration density (--paro-densities)
NO_PARO_PLAN = "needs a calibrated plan for this grid (PARO has no uncalibrated mode)"
PARO_PROMPTS = [  # training captions (not held out) for PARO's calibration
    "a red square moves left over a plain gray background",
    "a green circle bounces over blue stripes",
]


@dataclass
class Row:
    label: str
    group: str
    method: object = None  # a fastdit Method, a callable building one, or None (stock)
    quantize: str | None = None
    cache: str | None = None  # a --cache spec: "fbc", "taylorseer:cache_interval=2,..."
    bf16: bool = False
    control_of: str | None = None  # RandomBlocks at this row's density
    note: str = ""
    # Set by build_rows for another grid than the table's (benchmarks/quality_speed.py): how a
    # setting given for the table's grid was mapped, and why a row cannot run there.
    scaled: str = ""
    unavailable: str = ""
    results: list = field(default_factory=list)


def table_grid(smoke: bool = False) -> LatentGrid:
    """The latent grid the table's rows are defined for: the trained model's defaults (33 frames
    of 256 x 256 px: 9 x 16 x 16), or the ``--smoke`` size (9 frames of 64 x 64 px: 3 x 4 x 4)."""
    if smoke:
        return LatentGrid.from_video(9, 64, 64)
    settings = trained_settings()
    return LatentGrid.from_video(settings["num_frames"], settings["height"], settings["width"])


def scale_window(window: tuple, source: LatentGrid, target: LatentGrid) -> tuple:
    """A window given in tokens of ``source`` as the same fraction of each axis of ``target``
    (rounded half up, at least 1, at most the extent): GNA's ``(3, 9, 9)`` of the table's
    9 x 16 x 16 grid is ``(7, 17, 29)`` of Wan2.1's 480p grid 21 x 30 x 52."""
    return tuple(max(1, min(extent, math.floor(w * extent / base + 0.5)))
                 for w, base, extent in zip(window, source.shape, target.shape))


def taylorseer_spec(steps: int) -> str:
    """The GPU benchmark's TaylorSeer cache (``compose_bench``: 50 steps, ``cache_interval=2,
    disable_cache_before_step=10``, lite mode) scaled to ``steps``: the first 20% of the steps
    computed, then every other one; at 20 steps: steps 4, 6, ..., 18 skipped (8 of 20, the GPU
    run's 40%)."""
    return (f"taylorseer:cache_interval=2,disable_cache_before_step={round(steps * 10 / 50)},"
            "use_lite_mode=true")


def radial_14b(steps: int, block: int, smoke: bool):
    """``Radial.preset("wan2.1-14b")`` as the GPU benchmarks run it (decay 0.2, layer 0 dense,
    the first 12 of 50 steps dense), its dense steps scaled to ``steps`` (5 of 20)."""
    preset = fastdit.Radial.preset("wan2.1-14b")
    return fastdit.Radial.preset("wan2.1-14b", dense_steps=round(preset.dense_steps * steps / 50),
                                 **(dict(block_size=block) if smoke else {}))


def build_rows(paro_plans: dict[str, str | None], smoke: bool, steps: int = 20,
               grid: LatentGrid | None = None) -> list[Row]:
    """Every configuration of the table, dense first: the one definition of each row, which
    ``benchmarks/quality_speed.py`` times on a full-size Wan.

    ``paro_plans``: row label -> calibrated plan file, or ``None`` for a row that has no plan for
    this grid (it keeps its label, with ``unavailable`` set). ``grid``: the grid the rows will run
    on when it is not the table's (:func:`table_grid`); GNA windows, given in tokens of the
    table's grid, become the same fraction of each axis of ``grid`` (:func:`scale_window`), and
    the row's ``scaled`` says so. Labels stay the table's, so the two match row by row."""
    R, G, V, A = fastdit.Radial, fastdit.GNA, fastdit.VMoBA, fastdit.AdaSpa
    block = 64 if smoke else 128
    gna_windows = [(1, 3, 3), (3, 3, 3)] if smoke else [(1, 5, 5), (3, 9, 9), (5, 11, 11)]
    rows = [
        Row("dense", "reference", note="diffusers' stock attention, fp32"),
        Row("radial", "radial", R(block_size=block) if smoke else R(), note="defaults: decay 0.2"),
        Row("radial-d0.1", "radial", R(decay=0.1, block_size=block)),
        Row("radial-d1.0", "radial", R(decay=1.0, block_size=block)),
    ]
    if not smoke:  # at 2,304 tokens every decay gives the same 128-block plan (density 0.877);
        # 64-token blocks resolve the bands: decay 0.2 keeps 0.773 of the blocks, 1.0 keeps 0.847
        rows += [Row("radial-b64", "radial", R(block_size=64), note="decay 0.2, 64-token blocks"),
                 Row("radial-b64-d1.0", "radial", R(decay=1.0, block_size=64))]
    source = table_grid(smoke)
    for window in gna_windows:
        label = "gna-" + "x".join(map(str, window))
        if grid is None or grid == source:
            rows.append(Row(label, "gna", G(window=window, block_size=block)))
            continue
        scaled = scale_window(window, source, grid)
        rows.append(Row(label, "gna", G(window=scaled, block_size=block),
                        scaled=f"window {window} of the table's {_shape(source)} grid as the same "
                        f"fraction of each axis of {_shape(grid)}: {scaled}"))
    rows += [
        Row("vmoba", "vmoba", V(block_size=block) if smoke else V(),
            note="defaults: tau 0.25, first 25% of steps dense"),
        Row("vmoba-tau0.1", "vmoba", V(tau=0.1, block_size=block)),
        Row("vmoba-tau0.5", "vmoba", V(tau=0.5, block_size=block)),
        Row("adaspa", "adaspa", A(), note="defaults: sparsity 0.8"),
        Row("adaspa-s0.5", "adaspa", A(sparsity=0.5)),
        Row("adaspa-s0.95", "adaspa", A(sparsity=0.95)),
    ]
    for label, path in paro_plans.items():
        rows.append(Row(label, "paro", None if path is None else fastdit.PARO(plan=path, quantize=None),
                        note="calibrated on 2 training captions; 16-bit kernel",
                        unavailable="" if path else NO_PARO_PLAN))
    rows += [
        Row("agent", "agent", fastdit.Agent(), note="defaults: last 60% of steps dense"),
        Row("dense-bf16", "int8", bf16=True, note="stock attention, bf16 pipeline"),
        Row("fastdit-dense+int8", "int8", fastdit.Dense(), quantize="int8", bf16=True),
        Row("radial+int8", "int8", R(block_size=block) if smoke else R(), quantize="int8",
            bf16=True),
    ]
    if paro_plans:
        first = next(iter(paro_plans))
        path = paro_plans[first]
        rows.append(Row(f"{first}+int8", "int8", None if path is None else fastdit.PARO(plan=path),
                        bf16=True, note="PARO as published: INT8",
                        unavailable="" if path else NO_PARO_PLAN))
    rows += [
        Row("dense+fbc", "cache", cache="fbc", note="stock attention + FirstBlockCache"),
        Row("radial+fbc", "cache", R(block_size=block) if smoke else R(), cache="fbc"),
        Row("radial+fbc+int8", "cache", R(block_size=block) if smoke else R(), cache="fbc",
            quantize="int8", bf16=True),
        Row("dense+taylorseer", "cache", cache=taylorseer_spec(steps),
            note="stock attention + TaylorSeer cache (lite: 20% warm-up, then every other step "
            "skipped)"),
        Row("radial+taylorseer", "cache", R(block_size=block) if smoke else R(),
            cache=taylorseer_spec(steps), note="issue 20's best GPU combination but compile (which does "
            "not change the result)"),
        Row("radial-14b", "radial", radial_14b(steps, block, smoke),
            note="Radial.preset('wan2.1-14b'), its 12 of 50 dense steps scaled to the step count"),
        Row("radial-14b+taylorseer", "cache", radial_14b(steps, block, smoke),
            cache=taylorseer_spec(steps), note="the GPU benchmark's Radial preset + TaylorSeer: "
            "issue 20's best combination but compile (which does not change the result)"),
        Row("random@radial", "control", control_of="radial",
            note="random blocks at radial's density"),
        Row(f"random@gna-{'x'.join(map(str, gna_windows[1]))}", "control",
            control_of=f"gna-{'x'.join(map(str, gna_windows[1]))}",
            note="random blocks at that GNA window's density"),
    ]
    return rows


def _shape(grid: LatentGrid) -> str:
    return "x".join(map(str, grid.shape))


def mean_density(densities: dict) -> float:
    return float(np.mean(list(densities.values()))) if densities else 1.0


def _block_size(method) -> int:
    return int(getattr(method, "block_size", 128))


def side_by_side(labels, videos, path, frames=4, side=128):
    """One row per configuration: its label, then ``frames`` evenly spaced frames."""
    import cv2

    rows = []
    for label, video in zip(labels, videos):
        picks = np.linspace(0, len(video) - 1, frames).round().astype(int)
        tiles = [cv2.resize(video[i], (side, side), interpolation=cv2.INTER_AREA) for i in picks]
        name = np.full((side, 190, 3), 255, np.uint8)
        for line, text in enumerate(_wrap(label, 18)):
            cv2.putText(name, text, (6, 22 + 20 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                        (0, 0, 0), 1, cv2.LINE_AA)
        rows.append(np.concatenate([name, *tiles], axis=1))
    image = np.concatenate(rows, axis=0)
    import imageio.v2 as imageio

    with atomic_path(path) as temporary:
        imageio.imwrite(temporary, image)


def _wrap(text, width):
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


def _fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table_entries(rows: list[Row]) -> list[dict]:
    """One entry per row that ran: means over its videos."""
    table = []
    for row in rows:
        runs = row.results
        if not runs:
            continue
        psnr = [r["psnr"] for r in runs if r["psnr"] is not None]
        ssim = [r["ssim"] for r in runs if r["ssim"] is not None]
        table.append(dict(
            label=row.label, group=row.group, note=row.note, quantize=row.quantize,
            cache=row.cache, bf16=row.bf16, videos=len(runs),
            density=float(np.mean([r["density"] for r in runs])),
            psnr=(math.inf if any(math.isinf(p) for p in psnr) else float(np.mean(psnr)))
            if psnr else None,
            ssim=float(np.mean(ssim)) if ssim else None,
            colour=float(np.mean([r["checker"]["colour"] for r in runs])),
            shape=float(np.mean([r["checker"]["shape"] for r in runs])),
            motion=float(np.mean([r["checker"]["motion"] for r in runs])),
            seconds=float(np.mean([r["seconds"] for r in runs])),
            method=repr(runs[0]["method"]),
        ))
    return table


def write_tables(rows: list[Row], settings: dict, out: str) -> dict:
    videos = {row.label: row.results for row in rows if row.results}
    return write_table_files(table_entries(rows), settings, videos, out)


# The GPU speed columns (--speed): benchmarks/quality_speed.py's CSV, matched by row label.
SPEED_COLUMNS = ["gpu_ms", "gpu_speedup_vs_cudnn", "gpu_density", "gpu_speed_note"]


def read_speed(paths: str | list[str]) -> dict:
    """``{"rows": {label: CSV row}, "gpu", "date", "steps", "source"}`` of quality_speed CSVs:
    one, or several runs on the same GPU, date and step count, where a later run's timed rows
    fill the rows the earlier runs did not time (each keeps its speedup over its own run's
    dense)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    rows: dict[str, dict] = {}
    first = None
    for path in paths:
        with open(path, newline="", encoding="utf-8") as handle:
            lines = list(csv.DictReader(handle))
        needed = {"label", "status", "ms_generation", "speedup_vs_cudnn", "reason", "gpu", "date",
                  "steps"}
        if not lines or needed - set(lines[0]):
            raise SystemExit(f"--speed: {path} is not a quality_speed CSV (needs the columns "
                             f"{sorted(needed)}, got {sorted(lines[0]) if lines else 'no rows'})")
        if first is None:
            first = lines[0]
        mismatch = [k for k in ("gpu", "date", "steps") if lines[0][k] != first[k]]
        if mismatch:
            raise SystemExit(f"--speed: {path} differs from {paths[0]} in {mismatch} "
                             f"({[lines[0][k] for k in mismatch]} against {[first[k] for k in mismatch]})")
        for line in lines:
            earlier = rows.get(line["label"])
            if earlier is None or (earlier["status"] != "ok" and line["status"] == "ok"):
                rows[line["label"]] = dict(line, speed_csv=str(path))
    source = [str(path) for path in paths]  # as given (relative paths stay relative)
    return dict(rows=rows, gpu=first["gpu"], date=first["date"], steps=first["steps"],
                source=source[0] if len(source) == 1 else source)


def add_speed(table: list[dict], speed: dict) -> None:
    """The speed columns of every entry, in place: ms per generation and the speedup over stock
    cuDNN where the row was timed, else ``None`` and the reason."""
    for entry in table:
        line = speed["rows"].get(entry["label"])
        if line is None:
            entry.update(gpu_ms=None, gpu_speedup_vs_cudnn=None, gpu_density=None,
                         gpu_speed_note="not in the speed run")
        elif line["status"] != "ok":
            entry.update(gpu_ms=None, gpu_speedup_vs_cudnn=None, gpu_density=None,
                         gpu_speed_note=line["reason"] or line["status"])
        else:
            entry.update(gpu_ms=float(line["ms_generation"]),
                         gpu_speedup_vs_cudnn=float(line["speedup_vs_cudnn"]),
                         gpu_density=float(line["density"]) if line.get("density") else None,
                         gpu_speed_note=line["reason"])


def write_table_files(table: list[dict], settings: dict, videos: dict, out: str,
                      speed: dict | None = None) -> dict:
    """quality_table.{json,csv,md}; with ``speed`` (:func:`read_speed`), the GPU speed columns."""
    if speed is not None:
        add_speed(table, speed)
        settings = dict(settings, gpu_speed={key: speed[key] for key in ("gpu", "date", "steps",
                                                                           "source")})
    atomic_write_text(os.path.join(out, "quality_table.json"), json.dumps(
        dict(settings=settings, rows=table, videos=videos), indent=1, default=str))
    columns = ["label", "group", "density", "psnr", "ssim", "colour", "shape", "motion",
               "seconds", "quantize", "cache", "bf16", "videos", "note", "method"]
    if speed is not None:
        columns += SPEED_COLUMNS
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for entry in table:
        writer.writerow({key: entry[key] for key in columns})
    atomic_write_text(os.path.join(out, "quality_table.csv"), buffer.getvalue())
    gpu_header = gpu_rule = ""
    if speed is not None:
        gpu_header = (f" {speed['gpu']} ms / {speed['steps']}-step generation (x stock cuDNN, "
                      "density there) |")
        gpu_rule = "---|"
    lines = ["| configuration | density | PSNR dB vs dense | SSIM vs dense | checker colour / shape "
             f"/ motion | CPU s / video |{gpu_header} notes |",
             f"|---|---|---|---|---|---|{gpu_rule}---|"]
    for entry in table:
        reference = entry["label"] == "dense"
        psnr = "ref" if reference else ("identical" if entry["psnr"] == math.inf
                                        else _fmt(entry["psnr"], ".2f"))
        gpu = ""
        if speed is not None and entry["gpu_ms"] is None:
            gpu = f" — ({entry['gpu_speed_note']}) |"
        elif speed is not None:
            details = [f"{entry['gpu_speedup_vs_cudnn']:.2f}x"]
            if entry["gpu_density"] is not None:
                details.append(f"{entry['gpu_density']:.3f}")
            text = ", ".join(details) + (f"; {entry['gpu_speed_note']}" if entry["gpu_speed_note"] else "")
            gpu = f" {entry['gpu_ms']:,.0f} ({text}) |"
        lines.append(
            f"| {entry['label']} | {entry['density']:.3f} | {psnr} | "
            f"{'ref' if reference else _fmt(entry['ssim'], '.4f')} | "
            f"{entry['colour']:.0%} / {entry['shape']:.0%} / {entry['motion']:.0%} | "
            f"{entry['seconds']:.0f} |{gpu} {entry['note']} |")
    atomic_write_text(os.path.join(out, "quality_table.md"), "\n".join(lines) + "\n")
    return dict(rows=table, markdown="\n".join(lines))


def merge_speed(out: str, speed_csv: str | list[str]) -> dict:
    """Rewrite the quality_table.{json,csv,md} in ``out`` with the speed columns of
    ``speed_csv`` (no generation: the rows are the JSON's)."""
    path = os.path.join(out, "quality_table.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--speed: no {path} to merge into (run the table first, or give --out)")
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    settings = {k: v for k, v in saved["settings"].items() if k != "gpu_speed"}
    table = [{k: v for k, v in entry.items() if k not in SPEED_COLUMNS} for entry in saved["rows"]]
    for entry in table:  # JSON keeps inf as Infinity, which json.load reads back as inf
        entry["psnr"] = None if entry["psnr"] is None else float(entry["psnr"])
    return write_table_files(table, settings, saved["videos"], out, read_speed(speed_csv))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny",
                        help="'tiny' (the embedded trained model) or a pipeline folder of it")
    parser.add_argument("--captions", type=int, default=2,
                        help="the first N held-out captions (default: 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=trained_settings()["num_inference_steps"])
    parser.add_argument("--height", type=int, default=trained_settings()["height"])
    parser.add_argument("--width", type=int, default=trained_settings()["width"])
    parser.add_argument("--num-frames", type=int, default=trained_settings()["num_frames"])
    parser.add_argument("--guidance-scale", type=float, default=trained_settings()["guidance_scale"])
    parser.add_argument("--rows", default=None, help="comma list of row labels (default: all)")
    parser.add_argument("--paro-densities", default=PARO_DENSITIES,
                        help=f"PARO calibration densities, one row each (default: {PARO_DENSITIES})")
    parser.add_argument("--reuse-paro", action="store_true",
                        help="use a paro_d*.safetensors already in --out instead of calibrating "
                             "again (it must come from a run with the same model and settings)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--smoke", action="store_true",
                        help="64x64 px, 9 frames, 3 steps, 1 caption: checks the plumbing")
    parser.add_argument("--speed", metavar="CSV", nargs="+", default=None,
                        help="no generation: merge the GPU speed of benchmarks/quality_speed.py's "
                             "CSV into the quality_table.{csv,json,md} already in --out (several "
                             "CSVs of one GPU and date: a later one fills rows the earlier left untimed)")
    args = parser.parse_args(argv)
    if args.speed is not None:
        tables = merge_speed(args.out, args.speed)
        print(tables["markdown"])
        print(f"merged {', '.join(args.speed)} into {args.out}/quality_table.{{csv,json,md}}")
        return
    if args.smoke:
        args.height = args.width = 64
        args.num_frames, args.steps, args.captions = 9, 3, 1
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.time()

    size = dict(height=args.height, width=args.width, num_frames=args.num_frames,
                num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    pipes = {False: load_pipeline(args.model, dtype=torch.float32)}
    pipes[False].set_progress_bar_config(disable=True)
    captions = [spec.caption for spec in heldout_specs(0)][: args.captions]
    wanted = None if args.rows is None else set(args.rows.split(","))

    paro_plans = {}
    for density in [float(d) for d in args.paro_densities.split(",") if d]:
        label = f"paro-d{density:g}"
        if wanted is not None and label not in wanted and f"{label}+int8" not in wanted:
            continue
        path = os.path.join(args.out, f"paro_d{density:g}.safetensors")
        if args.reuse_paro and os.path.isfile(path):
            print(f"{label}: reusing {path} (--reuse-paro)", flush=True)
            paro_plans[label] = path
            continue
        t0 = time.time()
        fastdit.calibrate(pipes[False], PARO_PROMPTS, args.steps, density=density,
                          num_buckets=min(4, args.steps), block_size=64 if args.smoke else 128,
                          output=path, seed=args.seed, height=args.height, width=args.width,
                          num_frames=args.num_frames, guidance_scale=args.guidance_scale)
        print(f"calibrated {label} in {time.time() - t0:.0f} s", flush=True)
        paro_plans[label] = path

    rows = build_rows(paro_plans, args.smoke, args.steps)
    # Every plan here is calibrated on this grid; a row without its configuration would run
    # stock attention under a method's label.
    assert not any(row.unavailable for row in rows), [row.label for row in rows if row.unavailable]
    if wanted is not None:
        unknown = wanted - {row.label for row in rows}
        if unknown:
            raise SystemExit(f"--rows: unknown label(s) {sorted(unknown)}; valid: "
                             f"{[row.label for row in rows]}")
        rows = [row for row in rows if row.label in wanted or row.label == "dense"]
        for row in rows:  # a control needs its method's density
            if row.control_of and not any(r.label == row.control_of for r in rows):
                raise SystemExit(f"--rows: {row.label} needs {row.control_of}")
    if any(row.bf16 for row in rows):
        pipes[True] = load_pipeline(args.model, dtype=torch.bfloat16)
        pipes[True].set_progress_bar_config(disable=True)
    probes = {key: SpeedProbe(pipe, torch.device("cpu")) for key, pipe in pipes.items()}

    references, first_videos = {}, {}
    by_label = {row.label: row for row in rows}
    try:
        for row in rows:
            pipe = pipes[row.bf16]
            method = row.method
            if row.control_of is not None:
                target = by_label[row.control_of]
                density = float(np.mean([r["density"] for r in target.results]))
                method = RandomBlocks(density=density, block_size=_block_size(target.method),
                                      seed=args.seed)
            cache = (build_cache_config(*parse_cache_spec(row.cache),
                                        num_inference_steps=args.steps) if row.cache else None)
            for index, caption in enumerate(captions):
                kwargs, _ = pipeline_call_kwargs(pipe, caption, size, None)
                t0 = time.time()
                result = run_generation(pipe, kwargs, probes[row.bf16], args.seed, method, None,
                                        cache=cache, quantize=row.quantize)
                seconds = time.time() - t0
                frames = result.frames
                if row.label == "dense":
                    references[index] = frames
                    psnr = ssim = None
                else:
                    quality = compare_videos(references[index], frames, data_range=255)
                    psnr, ssim = float(quality.psnr), float(quality.ssim)
                checker = {k: bool(v) for k, v in score(frames, caption).items()}
                density = 1.0 if method is None else mean_density(result.densities)
                row.results.append(dict(caption=caption, seed=args.seed, density=density,
                                        psnr=psnr, ssim=ssim, checker=checker, seconds=seconds,
                                        method=method))
                if index == 0:
                    first_videos[row.label] = frames
                print(f"[{row.label}] caption {index}: density {density:.3f}, PSNR "
                      f"{_fmt(psnr, '.2f')}, SSIM {_fmt(ssim, '.4f')}, checker {checker}, "
                      f"{seconds:.1f} s", flush=True)
    finally:
        for probe in probes.values():
            probe.remove()

    settings = dict(model=args.model, captions=captions, seed=args.seed, **size,
                    device="cpu", threads=torch.get_num_threads(),
                    wall_seconds=round(time.time() - start, 1), paro_prompts=PARO_PROMPTS)
    tables = write_tables(rows, settings, args.out)
    labels = [row.label for row in rows if row.label in first_videos]
    side_by_side(labels, [first_videos[label] for label in labels],
                 os.path.join(args.out, "side_by_side.png"))
    print(tables["markdown"])
    print(f"wrote {args.out}/quality_table.{{csv,json,md}} and side_by_side.png "
          f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
