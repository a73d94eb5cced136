"""``fastdit calibrate``: dense runs of a pipeline -> a PARO plan file (the calibration itself is
:func:`fastdit.calibrate`, in :mod:`fastdit.methods.paro.calibrate`; the parser is built in
:mod:`.main`)."""

from __future__ import annotations

import argparse
import os
import time

from .common import (
    UsageError,
    check_model_path,
    check_pipeline_sizes,
    check_supported_pipeline,
    default_prompt,
    format_seconds,
    model_description,
    resolve_device_dtype,
    validate_sizes,
)

__all__ = ["DEFAULT_PLAN_OUTPUT", "cmd_calibrate"]

DEFAULT_PLAN_OUTPUT = "paro_plan.safetensors"


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e5 else f"{num_bytes / 1e3:.1f} kB"


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``fastdit calibrate``: dense runs -> PARO plan file."""
    from ..testing.embedded import embedded_defaults
    from ..testing.tiny import is_tiny, load_pipeline

    tiny = is_tiny(args.model)
    TINY_DEFAULTS = embedded_defaults(args.model) if tiny else {}
    validate_sizes(args.height, args.width, args.num_frames if tiny else None)
    steps = args.steps or (TINY_DEFAULTS["num_inference_steps"] if tiny else 50)
    if args.buckets > steps:
        raise UsageError(f"--buckets must be <= --steps, got buckets={args.buckets} for steps={steps}")
    calibration_steps = None
    if args.calibration_steps is not None:
        if not args.buckets <= args.calibration_steps <= steps:
            raise UsageError(
                f"--calibration-steps must lie in [--buckets, --steps] = [{args.buckets}, {steps}] so that "
                f"every timestep bucket gets collected steps, got {args.calibration_steps}"
            )
        from ..methods.paro.calibrate import spread_steps

        calibration_steps = spread_steps(steps, args.calibration_steps)
    device, dtype_name, dtype = resolve_device_dtype(args.device, args.dtype)
    check_model_path(args.model)
    from ..files import check_writable_file

    reason = check_writable_file(args.output, "--output")  # before the calibration, not after
    if reason is not None:
        raise UsageError(reason)
    settings = {
        "height": args.height, "width": args.width, "num_frames": args.num_frames,
        "guidance_scale": args.guidance_scale,
    }
    if tiny:
        settings = {k: (TINY_DEFAULTS[k] if v is None else v) for k, v in settings.items()}
    if args.negative_prompt is not None:
        settings["negative_prompt"] = args.negative_prompt

    import fastdit

    start = time.perf_counter()
    pipe = load_pipeline(args.model, dtype=dtype, device=device)
    check_supported_pipeline(pipe)
    check_pipeline_sizes(pipe, args.height, args.width, args.num_frames)
    load_time = time.perf_counter() - start
    plan = fastdit.calibrate(
        pipe, args.prompt or [default_prompt(args.model)], steps, density=args.density, recall=args.recall,
        num_buckets=args.buckets, block_size=args.block_size, output=args.output, seed=args.seed,
        calibration_steps=calibration_steps,
        **{k: v for k, v in settings.items() if v is not None},
    )
    size = os.path.getsize(args.output)
    model_name = model_description(args.model)
    lines = [
        "", "fastdit calibrate",
        f"  model        {model_name} [{type(pipe).__name__}, {device}, {dtype_name}]",
        f"  plan         {plan.summary()}",
        f"  time         {format_seconds(plan.metadata['calibration']['seconds'])} calibration, of which "
        f"{format_seconds(plan.metadata['calibration']['collect_seconds'])} collecting block mass on "
        f"{len(plan.metadata['calibration']['collected_steps'])} of {steps} steps x "
        f"{plan.metadata['calibration']['prompts']} prompt(s) (load {format_seconds(load_time)})",
        f"  output       {args.output}: {_size(size)} ({_size(plan.packed_size())} of bit-packed "
        "masks before deflate)",
        f"  use          fastdit generate --attention paro --attention-opt plan={args.output}",
    ]
    print("\n".join(lines), flush=True)
    return 0

