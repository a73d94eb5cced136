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
import inspect
import math
import os
import time
from fractions import Fraction
from typing import Any

from ..methods import MethodOptionError, available, create
from ..schedule import Schedule
from ..values import parse_value

__all__ = [
    "DEFAULT_FPS",
    "DEFAULT_PROMPT",
    "DEFAULT_SEED",
    "default_prompt",
    "model_description",
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
    "format_rank_speeds",
    "format_seconds",
    "gather_rank_speeds",
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
    "check_method_fits",
    "check_model_path",
    "check_pipeline_sizes",
    "check_video_path",
    "latent_grid",
    "resolve_device",
    "schedule_notes",
    "build_cache",
]

DEFAULT_PROMPT = "A red fox runs through a snowy forest at sunrise, cinematic camera pan."
DEFAULT_FPS = 16
DEFAULT_SEED = 0


def default_prompt(model: str | None) -> str:
    """The prompt of a run without one: a caption the embedded trained model knows, else
    ``DEFAULT_PROMPT``."""
    from ..testing.embedded import embedded_prompt

    return embedded_prompt(model, DEFAULT_PROMPT)


def model_description(model: str | None) -> str:
    """How summaries and reports name ``--model`` (the embedded models by what they are)."""
    from ..testing.embedded import describe_model

    return describe_model(model)


class UsageError(ValueError):
    """A bad command line detected after argparse (exit code 2)."""


# --------------------------------------------------------------------------- value parsing
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


VIDEO_EXTENSIONS = (".mp4",)


def check_video_path(path: str, flag: str = "--output") -> None:
    """Before any work: ``path`` must name an ``.mp4`` file that can be written (:class:`UsageError`
    naming the path otherwise). Creates its folder."""
    from ..files import check_writable_file

    extension = os.path.splitext(path)[1].lower()
    if extension not in VIDEO_EXTENSIONS:
        raise UsageError(
            f"{flag} must name an .mp4 file (fastdit writes H.264/MPEG-4 mp4 videos), got {path!r}"
        )
    reason = check_writable_file(path, flag)
    if reason is not None:
        raise UsageError(reason)


def write_video(frames, path: str, fps: float = DEFAULT_FPS) -> str:
    """Write ``frames`` (``(F, H, W, 3)`` float in [0, 1] or uint8) as an mp4; returns the backend.

    imageio with the imageio-ffmpeg backend (libx264, yuv420p) first, OpenCV's ``mp4v`` writer
    if that fails. The video is written under a temporary name next to ``path`` and renamed over
    it when complete: an interrupt or a failure leaves a previous ``path`` untouched and no
    partial file. Raises :class:`OSError` when neither backend can write it, ``ValueError`` for
    frames that are not finite (NaN/inf: a failed generation, never written as a black video).
    """
    from ..files import atomic_path
    from .runner import frames_to_uint8

    frames = frames_to_uint8(frames)
    errors = []
    backends = (("imageio-ffmpeg (libx264)", _write_imageio), ("opencv (mp4v)", _write_opencv))
    with atomic_path(path) as partial:
        for name, writer in backends:
            try:
                writer(frames, partial, fps)
            except Exception as exc:  # noqa: BLE001 - any backend failure means: try the next one
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if os.path.isfile(partial) and os.path.getsize(partial) > 0:
                return name
            errors.append(f"{name}: wrote no data")
        raise OSError(f"could not write video {path!r}: " + "; ".join(errors))


# --------------------------------------------------------------------------- running a pipeline
# What generate and compare share: device/dtype and size checks, loading with the GPU-only
# options, the pipeline settings, the timing probe.
def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None):
    """``--device``: ``cpu``, ``cuda`` or ``cuda:N`` that exists here (default: cuda if available,
    else cpu); :class:`UsageError` otherwise."""
    import torch

    device = device or default_device()
    try:
        torch_device = torch.device(device)
    except RuntimeError:
        torch_device = None
    if torch_device is None or torch_device.type not in ("cpu", "cuda"):
        raise UsageError(
            "--device must be cpu, cuda or cuda:N (fastdit runs on the CPU and on NVIDIA GPUs), "
            f"got {device!r}"
        )
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device} was requested but CUDA is not available")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"so N must be in [0, {torch.cuda.device_count() - 1}]"
            )
    return torch_device


def resolve_device_dtype(device: str | None, dtype: str | None):
    import torch

    torch_device = resolve_device(device)
    if dtype is None:
        dtype = "bfloat16" if torch_device.type == "cuda" else "float32"
    return torch_device, dtype, getattr(torch, dtype)


def validate_sizes(height, width, num_frames) -> None:
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
    parallel: Any = None  # fastdit.parallel.ProcessGroupRun under --ulysses N > 1

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes files (rank 0, or the only process)."""
        return self.parallel is None or self.parallel.is_main


def check_model_path(model: str | None) -> None:
    """A ``--model`` that names a local path must be a pipeline folder: a usage error before
    anything loads (a hub id is looked up when loading)."""
    from ..testing.tiny import is_tiny, looks_like_path

    if is_tiny(model) or not isinstance(model, str):
        return
    expanded = os.path.expanduser(model)
    if not os.path.exists(expanded):
        if looks_like_path(model):
            raise UsageError(f"--model path {model!r} does not exist")
        return
    if not os.path.isdir(expanded):
        raise UsageError(
            f"--model {model!r} is a file; expected a diffusers pipeline folder (with "
            "model_index.json) or a hub id"
        )
    if not os.path.isfile(os.path.join(expanded, "model_index.json")):
        raise UsageError(
            f"--model folder {model!r} has no model_index.json; expected a diffusers pipeline folder"
        )


def resolve_run_setup(args: argparse.Namespace) -> RunSetup:
    """Everything that can be checked without a model, checked before loading one."""
    from ..testing.embedded import embedded_defaults
    from ..testing.tiny import is_tiny

    tiny = is_tiny(args.model)
    # Frame rules differ by family (Wan 4k+1, LTX 8k+1, Mochi 6k+1): checked here for the embedded
    # Wan model, after loading (check_pipeline_sizes) for any other.
    validate_sizes(args.height, args.width, args.num_frames if tiny else None)
    check_model_path(args.model)
    device, dtype_name, dtype = resolve_device_dtype(args.device, args.dtype)
    check_gpu_only_options(args, device)
    parallel = _launch_parallel(args)
    if parallel is not None:
        device = parallel.device
    settings = {
        "height": args.height,
        "width": args.width,
        "num_frames": args.num_frames,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    if tiny:
        defaults = embedded_defaults(args.model)
        settings = {k: (defaults[k] if v is None else v) for k, v in settings.items()}
    return RunSetup(device, dtype_name, dtype, tiny, settings, parallel)


def _launch_parallel(args: argparse.Namespace):
    """The process group of ``--ulysses N`` (N > 1), or ``None`` for one process."""
    degree = getattr(args, "ulysses", 1)
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if degree == 1:
        if world > 1:
            raise UsageError(
                f"this process is one of WORLD_SIZE={world} started by torchrun: pass --ulysses "
                f"{world} to run one generation on {world} GPUs (without it every process would "
                "run and write the same thing)"
            )
        return None
    if args.cpu_offload:
        raise UsageError("--cpu-offload cannot be combined with --ulysses (each rank holds the whole model)")
    from ..parallel import launch

    try:
        return launch(degree, args.device)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def check_supported_pipeline(pipe) -> None:
    """A pipeline whose transformer fastdit cannot adapt is a usage error (exit 2)."""
    from ..pipelines.base import adapter_for, denoising_models

    try:
        for model in denoising_models(pipe):
            adapter_for(model)
    except ValueError as exc:
        raise UsageError(f"unsupported model: {exc}") from None


def _call_default(pipe, name: str):
    """The default of ``pipe.__call__``'s parameter ``name`` (``None`` if it has none)."""
    try:
        parameter = inspect.signature(pipe.__call__).parameters.get(name)
    except (TypeError, ValueError):
        return None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def latent_grid(pipe, call_kwargs: dict):
    """The latent token grid ``(T, H, W)`` the transformer of a video pipeline sees for these
    call arguments (the pipeline's defaults for the ones left out), or ``None`` when it cannot
    be told (an image UNet, a pipeline without these attributes)."""
    from ..layout import LatentGrid

    config = getattr(getattr(pipe, "transformer", None), "config", None)
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, int):  # HunyuanVideo: patch_size and patch_size_t
        patch = (getattr(config, "patch_size_t", 1) or 1, patch, patch)
    t_scale = getattr(pipe, "vae_scale_factor_temporal", None)
    s_scale = getattr(pipe, "vae_scale_factor_spatial", None)
    sizes = [call_kwargs.get(name, _call_default(pipe, name)) for name in ("num_frames", "height", "width")]
    if patch is None or len(patch) != 3 or None in (t_scale, s_scale, *sizes):
        return None
    num_frames, height, width = sizes
    latent = ((num_frames - 1) // t_scale + 1, height // s_scale, width // s_scale)
    try:
        return LatentGrid(*(extent // p for extent, p in zip(latent, patch)))
    except ValueError:
        return None


def check_method_fits(pipe, method, call_kwargs: dict, label: str) -> None:
    """What a loaded pipeline tells about a method before it runs, as usage errors: a method with
    calibrated data (PARO) must match the pipeline's models (``check_models``), and a method
    with a ``check_grid(grid)`` (GNA's window, PARO's calibrated size) must accept the latent
    grid of these call arguments. ``label`` names the method in messages (``--attention gna``)."""
    from ..pipelines.base import adapter_for, denoising_models

    models = denoising_models(pipe)
    layers = [len(adapter_for(model).self_attention_modules(model)) for model in models]
    try:
        method.check_models(models, layers)
    except ValueError as exc:
        raise UsageError(f"{label}: {exc}") from None
    grid = latent_grid(pipe, call_kwargs)
    if grid is not None:
        try:
            method.check_grid(grid)
        except ValueError as exc:
            raise UsageError(
                f"{label} cannot run on this video's latent grid {grid.shape} (T, H, W): {exc}"
            ) from None


def schedule_notes(schedule, pipe, call_kwargs: dict, label: str) -> list[str]:
    """Notes for a dense schedule that leaves the method nothing to run: every step dense
    (``--dense-steps 9 --steps 2``) or every layer dense."""
    from ..pipelines.base import adapter_for, denoising_models

    if schedule is None:
        return []
    notes = []
    num_steps = call_kwargs.get("num_inference_steps", _call_default(pipe, "num_inference_steps"))
    steps_only = dataclasses.replace(schedule, dense_layers=0)
    if isinstance(num_steps, int) and num_steps > 0 and all(
        steps_only.is_dense(step, num_steps, 0, 1) for step in range(num_steps)
    ):
        notes.append(
            f"the dense schedule (dense_steps={schedule.dense_steps}, dense_last_steps="
            f"{schedule.dense_last_steps}) covers all {num_steps} steps: {label} never runs, the "
            "whole generation is dense"
        )
    try:
        model = denoising_models(pipe)[0]
        num_layers = len(adapter_for(model).self_attention_modules(model))
    except ValueError:
        return notes
    layers_only = dataclasses.replace(schedule, dense_steps=0, dense_last_steps=0)
    if num_layers and all(layers_only.is_dense(None, None, layer, num_layers) for layer in range(num_layers)):
        notes.append(
            f"dense_layers={schedule.dense_layers} covers all {num_layers} self-attention layers: "
            f"{label} never runs, the whole generation is dense"
        )
    return notes


def compile_transformers(pipe) -> None:
    """Regional ``torch.compile`` of each transformer's repeated blocks (diffusers'
    ``compile_repeated_blocks``). The transformer's own forward stays eager, so fastdit's
    transformer hook (grid, step) and the timing hooks run outside the compiled blocks; the
    block-level token-permutation hooks of permuting methods (GNA) are traced with their block,
    and fastdit's attention processors run eagerly between the compiled graphs.
    GPU only, and not exercised by the CPU test suite."""
    from .runner import transformer_models

    for model in transformer_models(pipe):
        if not (getattr(model, "_repeated_blocks", None) and hasattr(model, "compile_repeated_blocks")):
            raise UsageError(
                f"--compile: {type(model).__name__} declares no repeated blocks to compile "
                "(diffusers' _repeated_blocks)"
            )
        model.compile_repeated_blocks()


def check_pipeline_sizes(pipe, height, width, num_frames) -> None:
    """The sizes the loaded pipeline's family takes (its adapter's ``check_sizes``; Wan's rule for
    adapters that do not override it), a usage error otherwise."""
    from ..pipelines.base import ModelAdapter, adapter_for, denoising_models

    for model in denoising_models(pipe):
        adapter = adapter_for(model)
        if type(adapter).check_sizes is ModelAdapter.check_sizes:
            validate_sizes(height, width, num_frames)
            continue
        try:
            adapter.check_sizes(pipe, height, width, num_frames)
        except ValueError as exc:
            raise UsageError(str(exc)) from None


def load_for_run(args: argparse.Namespace, setup: RunSetup):
    """Load the pipeline of ``--model``, check fastdit supports it, apply ``--cpu-offload`` and
    ``--compile``. Returns ``(pipe, load seconds)``."""
    from ..testing.tiny import load_pipeline

    start = time.perf_counter()
    pipe = load_pipeline(
        args.model, dtype=setup.dtype, device="cpu" if args.cpu_offload else setup.device
    )
    check_supported_pipeline(pipe)
    check_pipeline_sizes(pipe, setup.settings["height"], setup.settings["width"], setup.settings["num_frames"])
    if setup.parallel is not None:
        from ..parallel import enable

        try:
            enable(pipe, setup.parallel.degree)
        except ValueError as exc:
            raise UsageError(f"--ulysses {setup.parallel.degree}: {exc}") from None
        if not setup.is_main:
            pipe.set_progress_bar_config(disable=True)
    if args.cpu_offload:
        pipe.enable_model_cpu_offload(device=setup.device)
    if args.compile:
        compile_transformers(pipe)
    return pipe, time.perf_counter() - start


def make_probe(pipe, setup: RunSetup, args: argparse.Namespace):
    from .runner import SpeedProbe

    return SpeedProbe(
        pipe, setup.device, time_attention=not args.compile,
        attention_note="not measured under --compile (hooks inside compiled blocks)",
    )


def format_seconds(value: float) -> str:
    """``0.25`` -> ``250 ms``, ``3.5`` -> ``3.50 s``."""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def gather_rank_speeds(setup: RunSetup, speed, load_s: float | None = None) -> list[dict] | None:
    """Every rank's time and peak memory of one run, on every rank (``None`` in one process)."""
    if setup.parallel is None:
        return None
    mine = {
        "rank": setup.parallel.rank, "device": str(setup.device), "load_s": load_s,
        "run_s": speed.run_s, "denoise_s": speed.denoise_s, "transformer_s": speed.transformer_s,
        "peak_memory_bytes": speed.peak_memory_bytes,
    }
    return setup.parallel.gather(mine)


def format_rank_speeds(setup: RunSetup, ranks: list[dict] | None) -> list[str]:
    """Summary lines: the Ulysses degree, then one line per rank."""
    if not ranks:
        return []
    run = setup.parallel
    lines = [f"  parallel     Ulysses context parallelism over {run.degree} ranks ({run.backend})"]
    for entry in ranks:
        parts = [f"run {format_seconds(entry['run_s'])}"]
        if entry["denoise_s"] is not None:
            parts.append(f"denoise {format_seconds(entry['denoise_s'])}")
        parts.append(f"transformer {format_seconds(entry['transformer_s'])}")
        if entry["peak_memory_bytes"] is not None:
            parts.append(f"peak memory {entry['peak_memory_bytes'] / 2**30:.2f} GiB")
        lines.append(f"  rank {entry['rank']:<7} {', '.join(parts)} ({entry['device']})")
    return lines


def build_cache(spec: str | None, setup: RunSetup | None = None, flag: str = "--cache"):
    """The diffusers cache config of a ``--cache`` value (``None`` for none); MagCache's step
    count defaults to the run's ``--steps``."""
    from ..compose import build_cache_config, parse_cache_spec

    if spec is None or spec.strip().lower() == "none":
        return None
    steps = setup.settings.get("num_inference_steps") if setup is not None else None
    try:
        name, options = parse_cache_spec(spec)
        if name == "magcache" and "num_inference_steps" not in options and steps is None:
            raise ValueError("cache magcache needs the run's step count: give --steps (or "
                             "magcache:num_inference_steps=N)")
        return build_cache_config(name, options, num_inference_steps=steps)
    except ValueError as exc:
        message = str(exc)
        raise UsageError(message if message.startswith("--cache") else f"{flag} {spec!r}: {message}") from None
