"""``fastdit compare``: the same prompts and seeds through dense attention and several methods.

The reference run, labelled ``dense``, is the pipeline with diffusers' stock attention processors
(nothing of fastdit installed). Every method entry (``--methods``, ``--config``) runs with
:func:`fastdit.apply` on the same loaded pipeline, prompts, seeds and settings; any method named
in the methods registry (:func:`fastdit.methods.available`) works (``dense`` there is fastdit's own dense kernel,
labelled ``fastdit-dense`` unless given a label). Per method, ``--warmup`` untimed generations run
first (default 1: Triton compilation, autotuning and lazy initialisation stay out of the timings).

Report directory (``--output-dir``)::

    videos/<label>/p<prompt>_s<seed>.mp4   every run's video (dense first)
    grid/p<prompt>_s<seed>.mp4             side by side, labelled, PSNR vs dense in each label
    plots/*.png                            the report's plots (when matplotlib is installed)
    report.md, report.html                 tables and plots (report.html embeds them: one file)
    results.json                           everything below, machine readable

Combinations (:mod:`fastdit.compose`): ``--cache`` (repeatable, ``none`` included), ``--quantize``
(``none,int8``) and ``--also-compiled`` multiply the runs: every method entry, and the stock
pipeline, runs with every cache; every fastdit method with every quantization; and, with
``--also-compiled``, all of it once more with the transformer blocks compiled (after every eager
run: compilation is not undone). A run's label is its parts joined by ``+``
(``radial+fbc+int8+compiled``; ``dense+fbc`` is the stock pipeline with the cache). The reference
stays the eager stock pipeline without a cache, so every speedup is over it and every PSNR
against it. A combination a method cannot run (``int8`` for Agent, or PARO, which carries its
own ``quantize``) is skipped with a notice.

Quality is measured on the pipeline's uint8 frames before video encoding (methods vs dense), and
against ``--reference-dir`` videos after decoding them (those are lossy mp4s). Grid videos are
composed from the decoded mp4s. Speed is measured as :mod:`fastdit.cli.runner` describes (end to end,
denoising steps, transformer forwards, attention modules via forward hooks, peak memory).

``results.json`` schema (``"schema": "fastdit-compare/1"``). Times are seconds, memory bytes;
a number that JSON cannot hold is a string: an infinite PSNR (identical videos) is ``"inf"``,
NaN is ``"nan"``; unknown or not measured is ``null``::

    {
      "schema": "fastdit-compare/1",
      "created": "2026-01-01T12:00:00",            # local time, ISO 8601
      "environment": {"fastdit", "python", "torch", "triton", "diffusers": version strings,
                      "device": "cuda:0" | "cpu", "gpu": name | null, "cuda": version | null},
      "settings": {"model": str | null (null: an embedded model), "tiny": bool,
                   "model_description": str,
                   "pipeline": class name, "transformer": class name, "dtype": str,
                   "height", "width", "num_frames", "num_inference_steps": int | null,
                   "guidance_scale": float | null (null: the pipeline's default),
                   "fps": float, "negative_prompt": str | null, "warmup": int,
                   "compile": bool, "cpu_offload": bool, "load_s": float,
                   "prompts": [str], "seeds": [int], "reference_dir": str | null,
                   "ulysses": int (context-parallel ranks, 1 in one process)},
      "reference": "dense",                         # label of the run quality is measured against
      "lpips": {"available": bool, "reason": str | null},
      "notices": [str],                             # LPIPS skipped, random weights, CPU timings
      "runs": [                                     # the dense reference first, then each method
        {"label": str, "method": "stock" | a registered method name,
         "base": label of the method entry ("dense" for the stock pipeline),
         "cache": {"label": str, "config": str (fastdit.compose.describe_cache)} | null,
         "quantize": "int8" | null, "compiled": bool,
         "class": str | null, "config": {option: value} | null, "preset": str | null,
         "schedule": {"dense_steps", "dense_last_steps", "dense_layers"} | null,
         "description": str,
         "videos": [
           {"prompt_index": int, "prompt": str, "seed": int, "file": path relative to the report,
            "frames": int, "height": int, "width": int,
            "speed": {"run_s", "denoise_s", "step_s": [per step], "transformer_s",
                      "transformer_step_s": [per step], "transformer_calls": int,
                      "self_attention_s", "attention_s", "self_attention_share",
                      "attention_share", "peak_memory_bytes", "attention_note"},
            "quality": null for the reference, else {"psnr", "ssim", "lpips",
                       "psnr_per_frame": [..], "ssim_per_frame": [..], "lpips_per_frame"},
            "quality_vs_reference_dir": same form | null,
            "densities": [[layer, step, density], ...],   # fastdit's record; [] for dense
            "ranks": null | [{"rank", "device", "run_s", "denoise_s", "transformer_s",
                              "peak_memory_bytes"}],  # every rank's, under --ulysses N
            "extra": JSON | null,                 # the method runtime's ``records``, if any
            "checker": {"colour", "shape", "motion": bool} | null}  # fastdit.quality.score
                                                  # (embedded trained model, caption prompts)
         ],
         "summary": {"run_s", "denoise_s", "step_s", "transformer_s": means over videos,
                     "self_attention_share", "attention_share": means,
                     "peak_memory_bytes": max | null,
                     "speedup_e2e", "speedup_denoise", "speedup_transformer":
                         dense mean time / this run's mean time,
                     "psnr", "ssim", "lpips": means over videos (PSNR "inf" if any is),
                     "psnr_vs_reference_dir", "ssim_vs_reference_dir": means | null,
                     "mean_density": mean over layers and steps | null,
                     "checker": {"colour", "shape", "motion": share of videos right} | null,
                     "density": {"layers": [int], "steps": [int | null],
                                 "values": [[mean over videos, per layer, per step] | null]}}}
      ],
      "grids": [path relative to the report],
      "files": {"report_md": "report.md", "report_html": "report.html",
                "results_json": "results.json", "plots": [path]}
    }
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .common import (
    DEFAULT_SEED,
    UsageError,
    build_cache,
    build_method,
    build_schedule,
    check_method_fits,
    compile_transformers,
    default_prompt,
    describe_method,
    describe_schedule,
    format_seconds,
    gather_rank_speeds,
    load_for_run,
    make_probe,
    method_names,
    model_description,
    parse_value,
    resolve_run_setup,
    schedule_notes,
    write_video,
)
from ..files import atomic_write_text, check_writable_file
from ..methods import get as get_method

__all__ = [
    "DEFAULT_METHODS",
    "DEFAULT_METHOD_OPTIONS",
    "DEFAULT_OUTPUT_DIR",
    "MethodEntry",
    "compose_grid",
    "parse_method_entries",
    "read_video",
    "run_compare",
]

DEFAULT_METHODS = "radial,gna"
# Options of the default entries (used only when neither --methods nor --config is given): GNA
# has no default window; (1, 5, 5) is a valid neighbourhood on the tiny model's 5 x 6 x 10 grid
# and on real ones.
DEFAULT_METHOD_OPTIONS: dict[str, dict[str, Any]] = {"gna": {"window": (1, 5, 5)}}
# On the embedded trained model (the default model when its files are packaged): the methods that
# plan from the data too, GNA's window fitted to the run's latent grid.
TRAINED_DEFAULT_METHODS = "radial,gna,vmoba,adaspa"
DEFAULT_OUTPUT_DIR = "compare-report"
REFERENCE_LABEL = "dense"
# One untimed generation per method before the timed ones: Triton compilation and autotuning on
# the GPU, lazy initialisation and allocator warm-up everywhere (else the first run, dense, pays).
DEFAULT_WARMUP = 1
SCHEMA = "fastdit-compare/1"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_CONFIG_KEYS = {"method", "label", "options", "preset", "dense_steps", "dense_last_steps",
                "dense_layers"}
_DENSE_KEYS = ("dense_steps", "dense_last_steps", "dense_layers")


# --------------------------------------------------------------------------- method entries
@dataclass
class MethodEntry:
    """One compared method: its label (directory and legend name) and how to build it."""

    label: str
    name: str  # a registered method name
    options: dict[str, Any] = field(default_factory=dict)
    preset: str | None = None
    dense: dict[str, Any] = field(default_factory=dict)  # dense_* amounts from a config file
    source: str = "--methods"
    method: Any = None
    schedule: Any = None


def _check_label(label: str, where: str) -> None:
    if not _LABEL.match(label):
        raise UsageError(
            f"{where}: label {label!r} must start with a letter or digit and hold only letters, "
            "digits, '.', '_' and '-'"
        )
    if label == REFERENCE_LABEL:
        raise UsageError(
            f"{where}: label {label!r} is the stock dense reference's; fastdit's dense kernel "
            "runs as 'dense' (labelled fastdit-dense) or under another LABEL=dense"
        )


def _check_method_name(name: str, where: str) -> None:
    # Read at call time: the methods registry (fastdit.methods.available) names every method.
    if name not in method_names():
        raise UsageError(
            f"{where}: unknown method {name!r}; valid methods: {', '.join(method_names())}"
        )


def _default_label(name: str) -> str:
    return "fastdit-dense" if name == REFERENCE_LABEL else name


def _json_option(value):
    # JSON has lists where the command line has comma tuples (window=3,5,5).
    if isinstance(value, list):
        return tuple(_json_option(v) for v in value)
    return value


def _entries_from_config(path: str) -> list[MethodEntry]:
    where = f"--config {path}"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no such file")
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{where}: not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: cannot be read: {exc}") from None
    items = data.get("methods") if isinstance(data, dict) else data
    if isinstance(data, dict) and set(data) - {"methods"}:
        raise UsageError(f"{where}: unknown top-level keys {sorted(set(data) - {'methods'})}; "
                         "expected {\"methods\": [...]}")
    if not isinstance(items, list) or not items:
        raise UsageError(f"{where}: expected {{\"methods\": [ {{\"method\": ...}}, ... ]}} with "
                         "at least one entry")
    entries = []
    for index, item in enumerate(items):
        at = f"{where}: methods[{index}]"
        if not isinstance(item, dict) or "method" not in item:
            raise UsageError(f"{at}: expected an object with a \"method\" key, got {item!r}")
        unknown = sorted(set(item) - _CONFIG_KEYS)
        if unknown:
            raise UsageError(f"{at}: unknown keys {unknown}; valid keys: {sorted(_CONFIG_KEYS)}")
        name = item["method"]
        _check_method_name(name, at)
        label = item.get("label") or _default_label(name)
        _check_label(label, at)
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise UsageError(f"{at}: \"options\" must be an object, got {options!r}")
        preset = item.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise UsageError(f"{at}: \"preset\" must be a string, got {preset!r}")
        dense = {}
        for key in _DENSE_KEYS:
            if item.get(key) is not None:
                value = item[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise UsageError(f"{at}: {key} must be a count or a fraction, got {value!r}")
                dense[key] = value
        entries.append(MethodEntry(
            label=label, name=name, options={k.replace("-", "_"): _json_option(v)
                                             for k, v in options.items()},
            preset=preset, dense=dense, source=where,
        ))
    return entries


def _entries_from_methods(text: str) -> list[MethodEntry]:
    entries = []
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise UsageError(f"--methods expects NAME or LABEL=NAME entries, got {text!r}")
    for item in items:
        if not item:
            continue
        label, sep, name = item.partition("=")
        label, name = (label.strip(), name.strip()) if sep else (None, item)
        _check_method_name(name, "--methods")
        label = label or _default_label(name)
        _check_label(label, "--methods")
        entries.append(MethodEntry(label=label, name=name))
    return entries


def _target(entries: list[MethodEntry], prefix: str | None, flag: str, item: str) -> MethodEntry:
    labels = [entry.label for entry in entries]
    if prefix is None:
        if len(entries) == 1:
            return entries[0]
        raise UsageError(
            f"{flag} {item!r}: say which method it is for as LABEL:..., labels: {', '.join(labels)}"
        )
    for entry in entries:
        if entry.label == prefix:
            return entry
    raise UsageError(f"{flag} {item!r}: no method labelled {prefix!r}; labels: {', '.join(labels)}")


def _trained_grid(args: argparse.Namespace) -> tuple[int, int, int] | None:
    """The token grid of a run on the embedded trained model (``None`` for any other model)."""
    from ..testing.embedded import embedded_defaults, is_trained

    try:
        if not is_trained(args.model):
            return None
    except ValueError:  # a bad FASTDIT_DEFAULT_MODEL: reported when the run is set up
        return None
    defaults = embedded_defaults(args.model)
    frames = args.num_frames or defaults["num_frames"]
    height, width = args.height or defaults["height"], args.width or defaults["width"]
    return (max(1, (frames - 1) // 4 + 1), max(1, height // 16), max(1, width // 16))


def parse_method_entries(args: argparse.Namespace) -> list[MethodEntry]:
    """Method entries of a compare command line, each with its method config and schedule built.

    Raises :class:`UsageError` for unknown methods, options and presets, duplicate or bad labels,
    bad config files and option values.
    """
    entries: list[MethodEntry] = []
    if args.config:
        entries += _entries_from_config(args.config)
    if args.methods is not None:
        entries += _entries_from_methods(args.methods)
    elif not args.config:
        trained = _trained_grid(args)
        entries = _entries_from_methods(DEFAULT_METHODS if trained is None
                                        else TRAINED_DEFAULT_METHODS)
        for entry in entries:
            options = dict(DEFAULT_METHOD_OPTIONS.get(entry.label, {}))
            if trained is not None and "window" in options:  # odd, at most the grid's size
                options["window"] = tuple(min(w, g if g % 2 else g - 1)
                                          for w, g in zip(options["window"], trained))
            entry.options.update(options)
    seen: set[str] = set()
    for entry in entries:
        if entry.label in seen:
            raise UsageError(
                f"method label {entry.label!r} is used twice; name entries LABEL=NAME "
                "(e.g. --methods gna,g7=gna)"
            )
        seen.add(entry.label)

    given: set[tuple[str, str]] = set()  # (label, key) set on this command line
    for item in args.method_opt or ():
        key_part, sep, value = item.partition("=")
        prefix, colon, key = key_part.rpartition(":")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise UsageError(
                f"--method-opt expects [LABEL:]KEY=VALUE (e.g. gna:window=3,5,5), got {item!r}"
            )
        entry = _target(entries, prefix.strip() if colon else None, "--method-opt", item)
        if (entry.label, key) in given:
            raise UsageError(f"--method-opt {entry.label}:{key} is given more than once")
        given.add((entry.label, key))
        entry.options[key] = parse_value(value)  # overrides a config file's or a default

    for item in args.preset or ():
        prefix, colon, name = item.rpartition(":")
        if not name.strip():
            raise UsageError(f"--preset expects [LABEL:]NAME (e.g. radial:wan2.1-14b), got {item!r}")
        if colon:
            entry = _target(entries, prefix.strip(), "--preset", item)
        else:
            with_presets = [e for e in entries if get_method(e.name).presets()]
            if len(with_presets) != 1:
                raise UsageError(
                    f"--preset {item!r}: say which method it is for as LABEL:NAME "
                    f"({len(with_presets)} compared methods have presets)"
                )
            entry = with_presets[0]
        entry.preset = name.strip()

    for entry in entries:
        try:
            entry.method = build_method(entry.name, entry.options, entry.preset,
                                        method_flag="method", option_flag="--method-opt")
        except UsageError as exc:
            raise UsageError(f"method {entry.label!r} ({entry.source}): {exc}") from None
        if entry.method.follows_schedule:
            amounts = {key: getattr(args, key) for key in _DENSE_KEYS}
            for key in _DENSE_KEYS:
                if amounts[key] is None:
                    amounts[key] = entry.dense.get(key)
            entry.schedule = build_schedule(entry.method, **amounts)
    return entries


# --------------------------------------------------------------------------- prompts, seeds
def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p for p in (args.prompt or []) if p.strip()]
    if args.prompts_file:
        if not os.path.isfile(args.prompts_file):
            raise UsageError(f"--prompts-file {args.prompts_file}: no such file")
        with open(args.prompts_file, encoding="utf-8") as handle:
            lines = [line.strip() for line in handle]
        from_file = [line for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise UsageError(f"--prompts-file {args.prompts_file}: holds no prompt")
        prompts += from_file
    if args.prompt is not None and not prompts:
        raise UsageError("--prompt must not be empty")
    return prompts or [default_prompt(args.model)]


def _seeds(args: argparse.Namespace) -> list[int]:
    seeds = [seed for group in (args.seeds or [[DEFAULT_SEED]]) for seed in group]
    return list(dict.fromkeys(seeds))


def _video_name(prompt_index: int, seed: int) -> str:
    return f"p{prompt_index}_s{seed}.mp4"


def _reference_files(directory: str | None, prompts: list[str], seeds: list[int]) -> dict:
    if directory is None:
        return {}
    if not os.path.isdir(directory):
        raise UsageError(f"--reference-dir {directory}: no such directory")
    files = {}
    for index in range(len(prompts)):
        for seed in seeds:
            path = os.path.join(directory, _video_name(index, seed))
            if not os.path.isfile(path):
                raise UsageError(
                    f"--reference-dir {directory}: missing {_video_name(index, seed)} (one video "
                    "per prompt and seed, named p<prompt index>_s<seed>.mp4 as in "
                    "videos/dense of a compare report)"
                )
            files[(index, seed)] = path
    return files


# --------------------------------------------------------------------------- videos
def read_video(path: str) -> np.ndarray:
    """Frames ``(F, H, W, 3)`` uint8 of an mp4 (imageio-ffmpeg, else OpenCV)."""
    errors = []
    try:
        import imageio.v2 as imageio

        reader = imageio.get_reader(path, format="FFMPEG")
        try:
            frames = [np.asarray(frame)[..., :3] for frame in reader]
        finally:
            reader.close()
        if frames:
            return np.stack(frames)
        errors.append("imageio: no frames")
    except Exception as exc:  # noqa: BLE001 - try OpenCV next
        errors.append(f"imageio: {type(exc).__name__}: {exc}")
    import cv2

    capture = cv2.VideoCapture(path)
    frames = []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    finally:
        capture.release()
    if not frames:
        raise OSError(f"could not read video {path!r}: " + "; ".join(errors + ["opencv: no frames"]))
    return np.stack(frames)


def _label_bar(width: int, lines: list[str], height: int) -> np.ndarray:
    """A dark ``(height, width, 3)`` bar with ``lines`` of white text, shrunk to fit."""
    import cv2

    bar = np.full((height, width, 3), 24, dtype=np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    line_height = height / max(len(lines), 1)
    for row, text in enumerate(lines):
        scale = 1.0
        thickness = 1
        while scale > 0.2:
            (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
            if text_w <= width - 6 and text_h + baseline <= line_height - 2:
                break
            scale *= 0.9
        (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
        y = int(row * line_height + (line_height + text_h) / 2)
        cv2.putText(bar, text, (3, y), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return bar


def compose_grid(videos: list[np.ndarray], labels: list[list[str]], columns: int = 4) -> np.ndarray:
    """Side-by-side grid ``(F, H', W', 3)`` of equally shaped videos, each under a label bar.

    Videos of different frame counts are cut to the shortest; up to ``columns`` per row.
    """
    if not videos:
        raise ValueError("compose_grid needs at least one video")
    frames = min(len(v) for v in videos)
    height, width = videos[0].shape[1:3]
    for video in videos:
        if video.shape[1:3] != (height, width):
            raise ValueError(f"grid videos must share a size, got {video.shape[1:3]} and "
                             f"{(height, width)}")
    bar_height = max(14 * max(len(text) for text in labels), min(56, height // 4))
    tiles = []
    for video, text in zip(videos, labels):
        bar = _label_bar(width, text, bar_height)
        tiles.append(np.concatenate([np.broadcast_to(bar, (frames, *bar.shape)), video[:frames]],
                                    axis=1))
    columns = max(1, min(columns, len(tiles)))
    blank = np.zeros_like(tiles[0])
    while len(tiles) % columns:
        tiles.append(blank)
    rows = [np.concatenate(tiles[i : i + columns], axis=2) for i in range(0, len(tiles), columns)]
    return np.ascontiguousarray(np.concatenate(rows, axis=1))


# --------------------------------------------------------------------------- JSON helpers
def json_safe(value):
    """Plain JSON types: numpy/torch numbers and arrays to Python, tuples to lists, dict keys to
    strings, infinite floats to "inf"/"-inf", NaN to "nan". Raises TypeError on anything else."""
    from .metrics import json_number

    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return json_number(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if type(value).__module__.startswith("torch") and hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe({f.name: getattr(value, f.name) for f in dataclasses.fields(value)
                          if not f.name.startswith("_")})
    raise TypeError(f"{type(value).__name__} is not JSON-serializable")


def _config_json(method) -> dict | None:
    return None if method is None else json_safe(method.config())


def _schedule_json(schedule) -> dict | None:
    if schedule is None:
        return None
    return {key: getattr(schedule, key) for key in _DENSE_KEYS}


def _describe(entry: MethodEntry | None) -> str:
    if entry is None:
        return "dense attention through diffusers' stock processors (the reference)"
    text = describe_method(entry.method, entry.name, entry.preset)
    if entry.method.follows_schedule:
        text += f"; dense: {describe_schedule(entry.schedule)}"
    return text


def _describe_run(run) -> str:
    text = _describe(run.entry)
    if run is not None and run.entry is None and run.label != REFERENCE_LABEL:
        text = "diffusers' stock attention processors"
    extras = []
    if run.cache is not None:
        from ..compose import describe_cache

        extras.append(f"cache {describe_cache(run.cache[1])}")
    if run.quantize:
        extras.append(f"quantize {run.quantize}")
    if run.compiled:
        extras.append("transformer blocks compiled")
    return text + ("; " + ", ".join(extras) if extras else "")


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _ratio(numerator, denominator):
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# --------------------------------------------------------------------------- combinations
def parse_caches(args: argparse.Namespace, setup) -> list[tuple[str, Any] | None]:
    """``--cache`` values -> ``[None | (label, config)]`` (``None``: no cache); default ``[None]``."""
    caches: list[tuple[str, Any] | None] = []
    labels: set[str] = set()
    for item in args.cache or ["none"]:
        head, sep, rest = item.partition("=")
        label = None
        if sep and ":" not in head:  # LABEL=NAME[:...]
            label, item = head.strip(), rest
            _check_label(label, "--cache")
        config = build_cache(item, setup)
        if config is None:
            entry = None
            label = "none"
        else:
            from ..compose import cache_name

            label = label or cache_name(config)
            entry = (label, config)
        if label in labels:
            raise UsageError(f"--cache {item!r}: label {label!r} is used twice; name caches "
                             "LABEL=NAME:... (e.g. --cache f05=fbc:threshold=0.05)")
        labels.add(label)
        caches.append(entry)
    return caches


def parse_quantizations(args: argparse.Namespace, setup) -> list[str | None]:
    """``--quantize none,int8`` -> ``[None, "int8"]``; default ``[None]``."""
    from ..kernels.quantized import QUANTIZATIONS

    if args.quantize is None:
        return [None]
    modes = []
    for item in (part.strip().lower() for part in args.quantize.split(",")):
        if not item:
            continue
        if item not in ("none", *QUANTIZATIONS):
            raise UsageError(f"--quantize: unknown mode {item!r}; valid: none, {', '.join(QUANTIZATIONS)}")
        mode = None if item == "none" else item
        if mode not in modes:
            modes.append(mode)
    if not modes:
        raise UsageError(f"--quantize expects MODE[,MODE] (none, {', '.join(QUANTIZATIONS)}), "
                         f"got {args.quantize!r}")
    if any(modes) and setup.dtype_name not in ("bfloat16", "float16"):
        mode = next(m for m in modes if m)
        raise UsageError(f"--quantize {mode} needs --dtype bfloat16 or float16 (quantized "
                         f"attention takes 16-bit inputs), got {setup.dtype_name}")
    return modes


def build_runs(entries: list[MethodEntry], caches: list, quantizations: list,
               compiled_passes: list[bool], notices: list[str]) -> list[_Run]:
    """The reference (eager stock, no cache) first, then every combination, eager ones first."""
    from ..compose import check_quantize_method

    runs = [_Run(REFERENCE_LABEL, None)]
    for compiled in compiled_passes:
        for entry in [None, *entries]:
            for cache in caches:
                for quantize in ([None] if entry is None else quantizations):
                    if entry is None and cache is None and not compiled:
                        continue  # the reference
                    parts = [REFERENCE_LABEL if entry is None else entry.label]
                    parts += [cache[0]] if cache is not None else []
                    parts += [quantize] if quantize else []
                    parts += ["compiled"] if compiled else []
                    label = "+".join(parts)
                    if quantize is not None:
                        try:
                            check_quantize_method(entry.method, quantize)
                        except ValueError as exc:
                            notices.append(f"{label} skipped: {exc}")
                            continue
                    runs.append(_Run(label, entry, cache, quantize, compiled))
    return runs


# --------------------------------------------------------------------------- run
@dataclass
class _Run:
    label: str
    entry: MethodEntry | None
    cache: tuple[str, Any] | None = None  # (label, diffusers cache config)
    quantize: str | None = None
    compiled: bool = False
    videos: list[dict] = field(default_factory=list)
    speeds: list = field(default_factory=list)
    qualities: list = field(default_factory=list)
    reference_qualities: list = field(default_factory=list)
    densities: list[dict] = field(default_factory=list)
    checker: list = field(default_factory=list)  # fastdit.quality.score per video, or None


def _environment(device) -> dict:
    import importlib.metadata

    import torch

    import fastdit

    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.device(device).type == "cuda"
    return {
        "fastdit": fastdit.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if cuda else None,
        "cuda": torch.version.cuda if cuda else None,
    }


def _density_summary(maps: list[dict]) -> dict | None:
    """Mean over videos of the (layer, step) densities -> layers x steps matrix."""
    if not maps or not any(maps):
        return None
    layers = sorted({layer for m in maps for layer, _ in m})
    steps = sorted({step for m in maps for _, step in m}, key=lambda s: -1 if s is None else s)
    values = []
    for layer in layers:
        row = []
        for step in steps:
            found = [m[(layer, step)] for m in maps if (layer, step) in m]
            row.append(sum(found) / len(found) if found else None)
        values.append(row)
    return {"layers": layers, "steps": steps, "values": values}


def _quality_mean(qualities: list, key: str):
    values = [getattr(q, key) for q in qualities if q is not None and getattr(q, key) is not None]
    if not values:
        return None
    return math.inf if any(math.isinf(v) for v in values) else sum(values) / len(values)


def _summary(run: _Run, reference: _Run | None) -> dict:
    speeds = run.speeds
    summary = {
        "run_s": _mean([s.run_s for s in speeds]),
        "denoise_s": _mean([s.denoise_s for s in speeds]),
        "step_s": _mean([v for s in speeds for v in s.step_s]),
        "transformer_s": _mean([s.transformer_s for s in speeds]),
        "self_attention_share": _mean([s.self_attention_share for s in speeds]),
        "attention_share": _mean([s.attention_share for s in speeds]),
        "peak_memory_bytes": max((s.peak_memory_bytes for s in speeds
                                  if s.peak_memory_bytes is not None), default=None),
    }
    if reference is not None:
        base = _summary(reference, None)
        for key, time_key in (("speedup_e2e", "run_s"), ("speedup_denoise", "denoise_s"),
                              ("speedup_transformer", "transformer_s")):
            summary[key] = _ratio(base[time_key], summary[time_key])
    else:
        summary.update(speedup_e2e=1.0, speedup_denoise=1.0, speedup_transformer=1.0)
    for key in ("psnr", "ssim", "lpips"):
        summary[key] = _quality_mean(run.qualities, key)
        summary[f"{key}_vs_reference_dir"] = _quality_mean(run.reference_qualities, key)
    density = _density_summary(run.densities)
    flat = [v for row in (density or {}).get("values", []) for v in row if v is not None]
    summary["mean_density"] = sum(flat) / len(flat) if flat else None
    summary["density"] = density
    scored = [c for c in run.checker if c is not None]
    summary["checker"] = ({key: sum(bool(c[key]) for c in scored) / len(scored)
                           for key in ("colour", "shape", "motion")} if scored else None)
    return summary


def _records(result) -> tuple[Any, str | None]:
    records = result.records
    if records is None:
        return None, None
    try:
        safe = json_safe(records)
        json.dumps(safe)
    except (TypeError, ValueError) as exc:
        return None, f"records of type {type(records).__name__} are not JSON-serializable ({exc})"
    return safe, None


def _checker_enabled(model, prompts) -> bool:
    """Whether videos are scored by :func:`fastdit.quality.score`: on the embedded trained model,
    when every prompt is a caption of its grammar."""
    from ..testing.embedded import is_trained
    from ..quality import parse_caption

    if not is_trained(model):
        return False
    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def _checker_score(frames: np.ndarray, prompt: str) -> dict:
    from ..quality import score

    return {key: bool(value) for key, value in score(frames, prompt).items()}


def run_compare(args: argparse.Namespace) -> int:
    """``fastdit compare``: runs everything, writes the report directory; returns 0."""
    from . import report
    from ..compose import describe_cache
    from .metrics import compare_videos, load_lpips
    from .runner import pipeline_call_kwargs, run_generation

    # ---- everything checkable without a model, before loading one
    entries = parse_method_entries(args)
    prompts, seeds = _prompts(args), _seeds(args)
    reference_files = _reference_files(args.reference_dir, prompts, seeds)
    setup = resolve_run_setup(args)
    caches = parse_caches(args, setup)
    quantizations = parse_quantizations(args, setup)
    if args.also_compiled and args.compile:
        raise UsageError("--also-compiled runs everything eager and compiled; --compile compiles "
                         "every run: give one of them")
    if args.also_compiled and setup.device.type != "cuda":
        raise UsageError(f"--also-compiled is GPU-only (it compiles the transformer blocks for the "
                         f"GPU), got --device {setup.device}")
    if args.warmup is not None and args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    # Warm-up keeps GPU first-call costs (compilation, autotuning) out of the timings; CPU timings
    # are not speed measurements, so a CPU run skips it unless asked.
    default_warmup = DEFAULT_WARMUP if setup.device.type == "cuda" else 0
    warmup = default_warmup if args.warmup is None else args.warmup
    out_dir = Path(args.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--output-dir {out_dir} exists and is not a directory")
    if setup.is_main:  # under --ulysses, rank 0 writes the report
        reason = check_writable_file(out_dir / "results.json", "--output-dir")
        if reason is not None:
            raise UsageError(reason)
        out_dir.mkdir(parents=True, exist_ok=True)

    notices: list[str] = []
    pipe, load_s = load_for_run(args, setup)
    if setup.parallel is not None:
        from ..pipelines.base import adapter_for, denoising_models

        for model in denoising_models(pipe):
            if adapter_for(model).context_parallel_plan(model) is not None:
                raise UsageError(
                    f"--ulysses: the dense reference (diffusers' stock attention) cannot run "
                    f"{type(model).__name__} under fastdit's context-parallel plan (the text is "
                    "whole on every rank); compare in one process, or use fastdit generate --ulysses"
                )
    call_kwargs = []
    for prompt in prompts:
        kwargs, dropped = pipeline_call_kwargs(pipe, prompt, setup.settings, args.negative_prompt)
        call_kwargs.append(kwargs)
    # The same settings for every prompt: the same names are dropped for each.
    notices += [f"{type(pipe).__name__} takes no {name}; ignored" for name in dropped]
    for entry in entries:  # what the loaded pipeline tells about each method, before any run
        label = f"method {entry.label!r} ({entry.name}, from {entry.source})"
        check_method_fits(pipe, entry.method, call_kwargs[0], label)
        notices += [f"{entry.label}: {note}"
                    for note in schedule_notes(entry.schedule, pipe, call_kwargs[0], entry.label)]
    if args.no_lpips:
        lpips_scorer, lpips_reason = None, "disabled with --no-lpips"
    else:
        lpips_scorer, lpips_reason = load_lpips(setup.device)
    if lpips_scorer is None:
        notices.append(f"LPIPS skipped: {lpips_reason}")
    checked = _checker_enabled(args.model, prompts)
    if setup.tiny and not checked:
        notices.append(
            "model: the embedded tiny Wan pipeline with random weights; its videos are noise, so "
            "the quality numbers only show that the plumbing works. Quality numbers need real "
            "weights (--model with a hub id or local folder, loaded on your machine)."
        )
    if setup.device.type != "cuda":
        notices.append("device: CPU; timings say nothing about GPU speed (fastdit's kernels "
                       "run on the PyTorch reference path or Triton's interpreter here)")
    if warmup == 0 and args.warmup is not None:
        notices.append("--warmup 0: first-call costs (Triton compilation and autotuning on the "
                       "GPU, lazy initialisation) are timed, the dense reference's included")

    if checked:
        notices.append(
            "model: the embedded Wan trained on procedural clips; \"checker\" is "
            "fastdit.quality.score's reading of each video against its caption (colour, shape, "
            "motion), the dense reference's included")
    model_name = model_description(args.model)
    if setup.parallel is not None:
        notices.append(f"--ulysses {setup.parallel.degree}: every run on {setup.parallel.degree} "
                       "ranks (diffusers' Ulysses context parallelism); times and memory per rank "
                       "in each video's \"ranks\"")
    if setup.is_main:
        print(f"fastdit compare: {model_name} [{type(pipe).__name__}, {setup.device}, "
          f"{setup.dtype_name}], {len(prompts)} prompt(s) x {len(seeds)} seed(s), dense + "
          f"{', '.join(e.label for e in entries)}; loaded in {format_seconds(load_s)}", flush=True)
        for notice in notices:
            print(f"note: {notice}", flush=True)

    runs = build_runs(entries, caches, quantizations,
                      [False, True] if args.also_compiled else [bool(args.compile)], notices)
    reference_frames: dict[tuple[int, int], np.ndarray] = {}
    reference_dir_frames: dict[tuple[int, int], np.ndarray] = {}
    probe = make_probe(pipe, setup, args)
    compare_start = time.perf_counter()
    compiled = bool(args.compile)
    try:
        for run in runs:
            if run.compiled and not compiled:
                # The compiled pass of --also-compiled: compile once, after every eager run; the
                # attention modules are no longer timed (hooks inside compiled blocks).
                compile_transformers(pipe)
                compiled = True
                probe.remove()
                probe = make_probe(pipe, setup, argparse.Namespace(compile=True))
            method = run.entry.method if run.entry else None
            schedule = run.entry.schedule if run.entry else None
            extra_options = dict(cache=run.cache[1] if run.cache else None, quantize=run.quantize)
            for _ in range(warmup):
                run_generation(pipe, call_kwargs[0], probe, seeds[0], method, schedule,
                               **extra_options)
            for index in range(len(prompts)):
                for seed in seeds:
                    key = (index, seed)
                    result = run_generation(pipe, call_kwargs[index], probe, seed, method, schedule,
                                            **extra_options)
                    ranks = gather_rank_speeds(setup, result.speed)
                    if not setup.is_main:
                        continue
                    relative = os.path.join("videos", run.label, _video_name(index, seed))
                    write_video(result.frames, str(out_dir / relative), args.fps)
                    quality = reference_quality = None
                    if run is runs[0]:
                        reference_frames[key] = result.frames
                    else:
                        quality = compare_videos(reference_frames[key], result.frames,
                                                 data_range=255, device=setup.device,
                                                 lpips_scorer=lpips_scorer)
                    if key in reference_files:
                        if key not in reference_dir_frames:
                            reference_dir_frames[key] = read_video(reference_files[key])
                        expected = reference_dir_frames[key]
                        if expected.shape != result.frames.shape:
                            raise UsageError(
                                f"--reference-dir video {reference_files[key]} is "
                                f"{expected.shape[0]} frames of {expected.shape[1]}x"
                                f"{expected.shape[2]}, the generated one "
                                f"{result.frames.shape[0]} frames of "
                                f"{result.frames.shape[1]}x{result.frames.shape[2]}"
                            )
                        reference_quality = compare_videos(
                            expected, result.frames, data_range=255, device=setup.device,
                            lpips_scorer=lpips_scorer)
                    checker = (_checker_score(result.frames, prompts[index]) if checked
                               else None)
                    extra, extra_note = _records(result)
                    if extra_note and f"{run.label}: {extra_note}" not in notices:
                        notices.append(f"{run.label}: {extra_note}")
                    run.speeds.append(result.speed)
                    run.qualities.append(quality)
                    run.reference_qualities.append(reference_quality)
                    run.densities.append(result.densities)
                    run.checker.append(checker)
                    frames, height, width = result.frames.shape[:3]
                    run.videos.append({
                        "prompt_index": index, "prompt": prompts[index], "seed": seed,
                        "file": relative.replace(os.sep, "/"),
                        "frames": frames, "height": height, "width": width,
                        "speed": result.speed.as_json(),
                        "quality": quality.as_json() if quality else None,
                        "quality_vs_reference_dir": (reference_quality.as_json()
                                                     if reference_quality else None),
                        "densities": [[layer, step, density] for (layer, step), density
                                      in sorted(result.densities.items(),
                                                key=lambda kv: (kv[0][0], kv[0][1] or 0))],
                        "ranks": ranks,
                        "extra": extra,
                        "checker": checker,
                    })
                    _print_progress(run.label, index, seed, result, quality, ranks, checker)
    finally:
        probe.remove()
    if not setup.is_main:
        setup.parallel.close()
        return 0

    # ---- grid videos, from the written mp4s
    grids = []
    for index in range(len(prompts)):
        for seed in seeds:
            videos, labels = [], []
            for run in runs:
                video = next(v for v in run.videos
                             if v["prompt_index"] == index and v["seed"] == seed)
                videos.append(read_video(str(out_dir / video["file"])))
                if video["quality"] is None:
                    labels.append([run.label, "reference"])
                else:
                    psnr = video["quality"]["psnr"]
                    text = "identical" if psnr == "inf" else f"PSNR {psnr:.1f} dB"
                    labels.append([run.label, text])
            relative = f"grid/{_video_name(index, seed)}"
            write_video(compose_grid(videos, labels), str(out_dir / relative), args.fps)
            grids.append(relative)

    results = {
        "schema": SCHEMA,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "environment": _environment(setup.device),
        "settings": {
            "model": None if setup.tiny else args.model,
            "tiny": setup.tiny,
            "model_description": model_name,
            "pipeline": type(pipe).__name__,
            "transformer": type(getattr(pipe, "transformer", None)).__name__,
            "dtype": setup.dtype_name,
            **{key: setup.settings[key] for key in ("height", "width", "num_frames",
                                                     "num_inference_steps", "guidance_scale")},
            "fps": args.fps,
            "negative_prompt": args.negative_prompt,
            "warmup": warmup,
            "compile": bool(args.compile),
            "cpu_offload": bool(args.cpu_offload),
            "load_s": load_s,
            "prompts": prompts,
            "seeds": seeds,
            "reference_dir": args.reference_dir,
            "ulysses": setup.parallel.degree if setup.parallel is not None else 1,
        },
        "reference": REFERENCE_LABEL,
        "lpips": {"available": lpips_scorer is not None, "reason": lpips_reason},
        "notices": notices,
        "runs": [
            {
                "label": run.label,
                "method": run.entry.name if run.entry else "stock",
                "base": run.entry.label if run.entry else REFERENCE_LABEL,
                "cache": ({"label": run.cache[0], "config": describe_cache(run.cache[1])}
                          if run.cache else None),
                "quantize": run.quantize,
                "compiled": run.compiled,
                "class": type(run.entry.method).__name__ if run.entry else None,
                "config": _config_json(run.entry.method) if run.entry else None,
                "preset": run.entry.preset if run.entry else None,
                "schedule": _schedule_json(run.entry.schedule) if run.entry else None,
                "description": _describe_run(run),
                "videos": run.videos,
                "summary": _summary(run, None if run is runs[0] else runs[0]),
            }
            for run in runs
        ],
        "grids": grids,
        "files": {"report_md": "report.md", "report_html": "report.html",
                  "results_json": "results.json", "plots": []},
    }
    results = json_safe(results)
    written = report.write_report(results, out_dir)
    results["files"]["plots"] = [str(p.relative_to(out_dir)).replace(os.sep, "/")
                                 for p in written["plots"]]
    for notice in written["notices"]:
        results["notices"].append(notice)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=1, allow_nan=False))
    print()
    print(report.format_summary_table(results))
    for notice in written["notices"]:
        print(f"note: {notice}")
    print(f"\nwrote {out_dir}/: report.md, report.html, results.json, {len(grids)} grid "
          f"video(s), {sum(len(r.videos) for r in runs)} videos "
          f"({format_seconds(time.perf_counter() - compare_start)})", flush=True)
    if setup.parallel is not None:
        setup.parallel.close()
    return 0


def _print_progress(label: str, index: int, seed: int, result, quality, ranks=None,
                    checker=None) -> None:
    speed = result.speed
    parts = [f"[{label}] prompt {index} seed {seed}: {format_seconds(speed.run_s)}"]
    if speed.step_s:
        parts.append(f"{format_seconds(speed.denoise_s / len(speed.step_s))}/step")
    if quality is not None:
        parts.append("identical to dense" if math.isinf(quality.psnr)
                     else f"PSNR {quality.psnr:.2f} dB, SSIM {quality.ssim:.4f}")
    if result.densities:
        values = list(result.densities.values())
        parts.append(f"density {sum(values) / len(values):.3f}")
    if checker is not None:
        parts.append("checker " + " ".join(
            f"{key} {'ok' if checker[key] else 'WRONG'}" for key in ("colour", "shape", "motion")))
    for entry in ranks or ():
        memory = entry["peak_memory_bytes"]
        parts.append(f"rank {entry['rank']} {format_seconds(entry['run_s'])}"
                     + (f" {memory / 2**30:.2f} GiB" if memory is not None else ""))
    print(", ".join(parts), flush=True)
