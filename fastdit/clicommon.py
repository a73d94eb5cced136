"""What the command-line tools share (``fastdit generate``, ``compare``, ``calibrate``, ``bench``).

Constants, the usage error (exit code 2), value parsing, building a method and its dense schedule
from flags (the methods come from :func:`fastdit.methods.available`, so a registered method or a
plugin's is usable by name), describing them, writing videos, and preparing a pipeline run
(device/dtype and size checks, loading with the GPU-only options, the timing probe). The command
modules import this one, never each other's helpers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from fractions import Fraction
from typing import Any

from .methods import MethodOptionError, available, create
from .schedule import Schedule

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_PROMPT",
    "DEFAULT_SEED",
    "TINY_DESCRIPTION",
    "RunSetup",
    "UsageError",
    "build_method",
    "build_schedule",
    "check_gpu_only_options",
    "check_supported_pipeline",
    "compile_transformers",
    "default_device",
    "describe_method",
    "describe_schedule",
    "format_seconds",
    "load_for_run",
    "make_probe",
    "method_names",
    "parse_amount",
    "parse_attention_opts",
    "parse_value",
    "resolve_device_dtype",
    "resolve_run_setup",
    "validate_sizes",
    "write_video",
]

DEFAULT_PROMPT = "A red fox runs through a snowy forest at sunrise, cinematic camera pan."
DEFAULT_FPS = 16
DEFAULT_SEED = 0
TINY_DESCRIPTION = "tiny (embedded, random weights, offline)"


class UsageError(ValueError):
    """A bad command line detected after argparse (exit code 2)."""


# --------------------------------------------------------------------------- value parsing
def parse_value(text: str) -> Any:
    """``"0.2"`` -> 0.2, ``"128"`` -> 128, ``"3,5,5"`` -> (3, 5, 5), ``"true"`` -> True,
    ``"none"`` -> None; anything else stays a string."""
    text = text.strip()
    if "," in text:
        return tuple(parse_value(item) for item in text.split(",") if item.strip())
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def parse_attention_opts(items: list[str] | None) -> dict[str, Any]:
    """``["decay=0.2", "window=3,5,5"]`` -> ``{"decay": 0.2, "window": (3, 5, 5)}``."""
    options: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key or not value.strip():
            raise UsageError(f"--attention-opt expects KEY=VALUE (e.g. decay=0.2), got {item!r}")
        if key in options:
            raise UsageError(f"--attention-opt {key} is given more than once")
        options[key] = parse_value(value)
    return options


def parse_amount(text: str) -> int | float:
    """A step/layer amount: ``"12"`` -> 12 (a count); ``"0.25"``/``"1/4"`` -> 0.25 (a fraction)."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(Fraction(text))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected an int count or a fraction in [0, 1] (0.25 or 1/4), got {text!r}"
        ) from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a fraction must be in [0, 1], got {text!r}")
    return value


# --------------------------------------------------------------------------- methods
def method_names() -> tuple[str, ...]:
    """The registered method names (``--attention``, ``--methods``): fastdit's own, then those of
    installed plugins (:func:`fastdit.methods.available`)."""
    return tuple(available())


def build_method(
    attention: str,
    options: dict[str, Any] | None = None,
    preset: str | None = None,
    *,
    method_flag: str = "--attention",
    option_flag: str = "--attention-opt",
):
    """The method for ``--attention``/``--attention-opt``/``--preset``
    (:func:`fastdit.methods.create`).

    ``method_flag``/``option_flag`` name the flags in messages (``fastdit compare`` passes its
    own). Raises :class:`UsageError` naming the bad method, option, preset or file and listing
    valid ones; an option naming a file that does not exist (a plan file) is a usage error too.
    """
    try:
        return create(attention, options, preset, method_flag=method_flag, option_flag=option_flag)
    except MethodOptionError as exc:
        raise UsageError(str(exc)) from None
    # TypeError: a value of a kind the method did not check; OSError: a file option (a plan file)
    # that cannot be read.
    except (TypeError, ValueError, OSError) as exc:
        raise UsageError(f"bad {option_flag} for {method_flag} {attention}: {exc}") from None


def build_schedule(method, dense_steps=None, dense_last_steps=None, dense_layers=None):
    """The dense schedule: command-line amounts override the ones the method carries (presets).

    Returns ``None`` when nothing runs dense (the method's own schedule is then all-sparse).
    """
    carried = Schedule.from_method(method) if method is not None else Schedule()
    given = dict(dense_steps=dense_steps, dense_last_steps=dense_last_steps, dense_layers=dense_layers)
    try:
        schedule = dataclasses.replace(carried, **{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not (schedule.dense_steps or schedule.dense_last_steps or schedule.dense_layers):
        return None
    return schedule


def describe_method(method, attention: str, preset: str | None) -> str:
    """``radial(decay=0.2, block_size=128, sink=True) [preset wan2.1-14b]``: the options the
    method holds, its dense schedule left out."""
    options = [f"{k}={v!r}" for k, v in method.config().items() if not k.startswith("dense_")]
    text = f"{attention}({', '.join(options)})"
    return f"{text} [preset {preset}]" if preset else text


def describe_schedule(schedule) -> str:
    """``dense steps 12, dense layers 1``, or that nothing runs dense."""
    if schedule is None:
        return "none (every step and layer uses the method)"
    parts = [
        f"{name.replace('_', ' ')} {getattr(schedule, name)}"
        for name in ("dense_steps", "dense_last_steps", "dense_layers")
        if getattr(schedule, name, 0)
    ]
    return ", ".join(parts)


# --------------------------------------------------------------------------- video
def _write_imageio(frames, path: str, fps: float) -> None:
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        quality=8,
    )
    try:
        for frame in frames:
            writer.append_data(frame)
    finally:
        writer.close()


def _write_opencv(frames, path: str, fps: float) -> None:
    import cv2

    height, width = frames.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise OSError(f"OpenCV could not open {path!r} for writing")
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def write_video(frames, path: str, fps: float = DEFAULT_FPS) -> str:
    """Write ``frames`` (``(F, H, W, 3)`` float in [0, 1] or uint8) as an mp4; returns the backend.

    imageio with the imageio-ffmpeg backend (libx264, yuv420p) first, OpenCV's ``mp4v`` writer
    if that fails. Raises :class:`OSError` when neither can write ``path``.
    """
    from .runner import frames_to_uint8

    frames = frames_to_uint8(frames)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    errors = []
    backends = (("imageio-ffmpeg (libx264)", _write_imageio), ("opencv (mp4v)", _write_opencv))
    for name, writer in backends:
        try:
            writer(frames, path, fps)
        except Exception as exc:  # noqa: BLE001 - any backend failure means: try the next one
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            return name
        errors.append(f"{name}: wrote no data")
    raise OSError(f"could not write video {path!r}: " + "; ".join(errors))


# --------------------------------------------------------------------------- running a pipeline
# What generate and compare share: device/dtype and size checks, loading with the GPU-only
# options, the pipeline settings, the timing probe.
def default_device() -> str:
    """``cuda`` when a GPU is available, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_dtype(device: str | None, dtype: str | None):
    """``(torch device, dtype name, torch dtype)`` of ``--device``/``--dtype`` (bf16 on cuda,
    fp32 on cpu by default)."""
    import torch

    device = device or default_device()
    try:
        torch_device = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"bad --device {device!r}: {exc}") from None
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} was requested but CUDA is not available")
    if dtype is None:
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    return torch_device, dtype, getattr(torch, dtype)


def validate_sizes(height, width, num_frames) -> None:
    """``--height``/``--width`` multiples of 16, ``--num-frames`` of the form 4k+1."""
    bad = [
        f"{name}={value}"
        for name, value in (("height", height), ("width", width))
        if value is not None and (value % 16 or value <= 0)
    ]
    if bad:
        raise UsageError(
            f"--height and --width must be positive multiples of 16, got {' and '.join(bad)}"
        )
    if num_frames is not None and num_frames % 4 != 1:
        down, up = (num_frames - 1) // 4 * 4 + 1, ((num_frames - 1) // 4 + 1) * 4 + 1
        near = f"{down} or {up}" if down >= 1 else f"{up}"
        raise UsageError(
            "--num-frames must be of the form 4k+1 (1, 5, 9, ..., 81), "
            f"got num_frames={num_frames}; try {near}"
        )


def check_gpu_only_options(args: argparse.Namespace, device) -> None:
    """``--compile`` and ``--cpu-offload`` are GPU-only; ``--cpu-offload`` needs accelerate."""
    import importlib.util

    for flag, wanted, why in (
        ("--compile", args.compile, "it compiles the transformer blocks for the GPU"),
        ("--cpu-offload", args.cpu_offload, "it offloads models from a GPU to the CPU"),
    ):
        if wanted and device.type != "cuda":
            raise UsageError(f"{flag} is GPU-only ({why}), got --device {device}")
    if args.cpu_offload and importlib.util.find_spec("accelerate") is None:
        raise UsageError("--cpu-offload needs the accelerate package: pip install accelerate")


@dataclasses.dataclass
class RunSetup:
    """Resolved device, dtype and pipeline settings of a generate/compare command line."""

    device: Any
    dtype_name: str
    dtype: Any
    tiny: bool
    settings: dict[str, Any]  # pipeline keyword -> value (None: the pipeline's default)


def resolve_run_setup(args: argparse.Namespace) -> RunSetup:
    """Everything that can be checked without a model, checked before loading one."""
    from .pipelines.tiny import TINY_DEFAULTS, is_tiny

    validate_sizes(args.height, args.width, args.num_frames)
    device, dtype_name, dtype = resolve_device_dtype(args.device, args.dtype)
    check_gpu_only_options(args, device)
    settings = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    tiny = is_tiny(args.model)
    if tiny:
        settings = {k: (TINY_DEFAULTS[k] if v is None else v) for k, v in settings.items()}
    return RunSetup(device, dtype_name, dtype, tiny, settings)


def check_supported_pipeline(pipe) -> None:
    """A pipeline whose transformer fastdit cannot adapt is a usage error (exit 2)."""
    from .integration import denoising_models
    from .pipelines.base import adapter_for

    try:
        for model in denoising_models(pipe):
            adapter_for(model)
    except ValueError as exc:
        raise UsageError(f"unsupported model: {exc}") from None


def compile_transformers(pipe) -> None:
    """Regional ``torch.compile`` of each transformer's repeated blocks (diffusers'
    ``compile_repeated_blocks``). The transformer's own forward stays eager, so fastdit's
    transformer hook (grid, step) and the timing hooks run outside the compiled blocks; the
    block-level token-permutation hooks of permuting methods (GNA) are traced with their block.
    GPU only, and not exercised by the CPU test suite."""
    from .runner import transformer_models

    for model in transformer_models(pipe):
        if not (getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks")):
            raise UsageError(
                f"--compile: {type(model).__name__} declares no repeated blocks to compile "
                "(diffusers' _repeated_blocks)"
            )
        model.compile_repeated_blocks()


def load_for_run(args: argparse.Namespace, setup: RunSetup):
    """Load the pipeline of ``--model``, check fastdit supports it, apply ``--cpu-offload`` and
    ``--compile``. Returns ``(pipe, load seconds)``."""
    from .pipelines.tiny import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(
        args.model, dtype=setup.dtype, device="cpu" if args.cpu_offload else setup.device
    )
    check_supported_pipeline(pipe)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=setup.device)
    if args.compile:
        compile_transformers(pipe)
    return pipe, time.perf_counter() - start


def make_probe(pipe, setup: RunSetup, args: argparse.Namespace):
    """The timing hooks of a run (attention time is not measured under ``--compile``)."""
    from .runner import SpeedProbe

    return SpeedProbe(
        pipe, setup.device, time_attention=not args.compile,
        attention_note="not measured under --compile (hooks inside compiled blocks)",
    )


def format_seconds(value: float) -> str:
    """``0.25`` -> ``250 ms``, ``3.5`` -> ``3.50 s``."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"
