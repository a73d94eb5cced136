"""``fastdit generate``: load a pipeline, install an attention method with :func:`fastdit.apply`,
run it with diffusers' progress bar, write an mp4 and print a one-screen summary (the parser is
built in :mod:`.main`)."""

from __future__ import annotations

import argparse

from .common import (
    RunSetup,
    UsageError,
    build_cache,
    build_method,
    build_schedule,
    check_method_fits,
    check_video_path,
    default_prompt,
    describe_method,
    describe_schedule,
    format_rank_speeds,
    format_seconds,
    gather_rank_speeds,
    load_for_run,
    make_probe,
    model_description,
    parse_attention_opts,
    resolve_run_setup,
    schedule_notes,
    write_video,
)

__all__ = ["check_quantize_option", "cmd_generate"]


def _latent_description(pipe, height, width, num_frames) -> str | None:
    transformer = getattr(pipe, "transformer", None)
    patch = getattr(getattr(transformer, "config", None), "patch_size", None)
    t_scale = getattr(pipe, "vae_scale_factor_temporal", None)
    s_scale = getattr(pipe, "vae_scale_factor_spatial", None)
    if None in (patch, t_scale, s_scale, height, width, num_frames) or len(patch) != 3:
        return None
    latent = ((num_frames - 1) // t_scale + 1, height // s_scale, width // s_scale)
    grid = (latent[0] // patch[0], latent[1] // patch[1], latent[2] // patch[2])
    tokens = grid[0] * grid[1] * grid[2]
    return (
        f"latent {latent[0]}x{latent[1]}x{latent[2]} -> tokens {grid[0]}x{grid[1]}x{grid[2]} "
        f"= {tokens}"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .runner import pipeline_call_kwargs, run_generation

    attention = args.attention or ("radial" if args.preset else "dense")
    options = parse_attention_opts(args.attention_opt)
    method = build_method(attention, options, args.preset)
    schedule = None
    if not method.follows_schedule:
        if any(v is not None for v in (args.dense_steps, args.dense_last_steps, args.dense_layers)):
            print(f"note: --dense-steps/--dense-layers have no effect with --attention {attention}")
    else:
        schedule = build_schedule(
            method, args.dense_steps, args.dense_last_steps, args.dense_layers
        )
    setup = resolve_run_setup(args)
    check_video_path(args.output)
    cache = build_cache(args.cache, setup)
    check_quantize_option(method, args.quantize, setup)
    pipe, load_time = load_for_run(args, setup)
    prompt = default_prompt(args.model) if args.prompt is None else args.prompt
    call_kwargs, dropped = pipeline_call_kwargs(pipe, prompt, setup.settings, args.negative_prompt)
    for name in dropped:
        print(f"note: {type(pipe).__name__} takes no {name}; ignored")
    check_method_fits(pipe, method, call_kwargs, f"--attention {attention}")
    for note in schedule_notes(schedule, pipe, call_kwargs, f"--attention {attention}"):
        print(f"note: {note}")
    probe = make_probe(pipe, setup, args)
    try:
        result = run_generation(pipe, call_kwargs, probe, args.seed, method, schedule,
                                cache=cache, quantize=args.quantize)
    finally:
        probe.remove()
    ranks = gather_rank_speeds(setup, result.speed, load_time)
    if not setup.is_main:  # rank 0 writes and prints
        setup.parallel.close()
        return 0
    backend = write_video(result.frames, args.output, args.fps)

    # ---- one-screen summary
    speed = result.speed
    num_frames, height, width = result.frames.shape[:3]
    lines = ["", "fastdit generate"]
    model_name = model_description(args.model)
    lines.append(f"  model        {model_name} [{type(pipe).__name__}, {setup.device}, "
                 f"{setup.dtype_name}]")
    video = f"{num_frames} frames {height}x{width} px @ {args.fps:g} fps, seed {args.seed}"
    latent = _latent_description(pipe, height, width, num_frames)
    lines.append(f"  prompt       {prompt!r}")
    lines.append(f"  video        {video}")
    if latent:
        lines.append(f"  grid         {latent}")
    lines.append(f"  attention    {describe_method(method, attention, args.preset)}")
    if method.follows_schedule:
        lines.append(f"  dense        {describe_schedule(schedule)}")
    if cache is not None or args.quantize:
        from ..compose import describe_cache

        lines.append(f"  cache        {describe_cache(cache)}; quantize {args.quantize or 'none'}")
    run_time = speed.run_s
    if speed.step_s:
        denoise = speed.denoise_s
        lines.append(
            f"  total time   {format_seconds(load_time + run_time)} (load {format_seconds(load_time)}, "
            f"run {format_seconds(run_time)}: denoise {format_seconds(denoise)}, "
            f"text+decode {format_seconds(run_time - denoise)})"
        )
        lines.append(f"  per step     {format_seconds(denoise / len(speed.step_s))} x "
                     f"{len(speed.step_s)} steps")
    else:
        lines.append(
            f"  total time   {format_seconds(load_time + run_time)} (load {format_seconds(load_time)}, "
            f"run {format_seconds(run_time)})"
        )
    if speed.transformer_calls:
        share = speed.self_attention_share
        attention_text = (f", self-attention {share:.0%} of it" if share is not None
                          else f" ({speed.attention_note})" if speed.attention_note else "")
        lines.append(f"  transformer  {format_seconds(speed.transformer_s)} in "
                     f"{speed.transformer_calls} forwards{attention_text}")
    if result.density_summary:
        density_lines = result.density_summary.rstrip().splitlines()
        lines.append(f"  density      {density_lines[0]}")
        lines.extend(f"               {line}" for line in density_lines[1:])
    if speed.peak_memory_bytes is not None:
        import torch

        gpu = torch.cuda.get_device_name(setup.device)
        lines.append(f"  peak memory  {speed.peak_memory_bytes / 2**30:.2f} GiB ({gpu})")
    lines.extend(format_rank_speeds(setup, ranks))
    lines.append(f"  output       {args.output} ({backend})")
    print("\n".join(lines), flush=True)
    if setup.parallel is not None:
        setup.parallel.close()
    return 0


def check_quantize_option(method, quantize: str | None, setup: RunSetup, where: str = "--quantize") -> None:
    """``--quantize`` against the method and the run's dtype, before loading a model."""
    from ..compose import check_quantize_method

    if quantize is None:
        return
    try:
        check_quantize_method(method, quantize)
    except ValueError as exc:
        raise UsageError(f"{where} {quantize}: {exc}") from None
    if setup.dtype_name not in ("bfloat16", "float16"):
        raise UsageError(
            f"{where} {quantize} needs --dtype bfloat16 or float16 (P.V runs in 16 bits), got "
            f"{setup.dtype_name}"
        )

