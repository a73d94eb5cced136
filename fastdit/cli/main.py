"""The ``fastdit`` command line (``python -m fastdit``): generate, compare, bench, info.

* ``generate`` loads a pipeline (by default the embedded, offline tiny Wan model with random
  weights), installs an attention method with :func:`fastdit.apply`, runs it with diffusers'
  progress bar, writes an mp4 and prints a one-screen summary.
* ``compare`` runs the same prompts and seeds through dense attention and several methods and
  writes a report directory (:mod:`fastdit.cli.compare`, :mod:`fastdit.cli.metrics`,
  :mod:`fastdit.cli.report`).
* ``calibrate`` writes the plan file PARO runs on (:func:`fastdit.calibrate`).
* ``bench`` is the kernel micro-benchmark (:mod:`fastdit.cli.bench`; GPU only, ``--smoke`` on CPU).
* ``info`` prints versions, optional packages, which kernel backends can run and why not, and the
  supported models, methods and presets.

Subcommands are argparse subparsers, each with a ``func`` default. Loading, sizes, device/dtype,
``--compile``/``--cpu-offload`` and timing (:mod:`fastdit.cli.runner`) are shared by generate and
compare.

Several GPUs: ``torchrun --nproc-per-node N -m fastdit generate|compare ... --ulysses N`` runs the
transformer under diffusers' Ulysses context parallelism (:mod:`fastdit.parallel`); every rank
runs the pipeline, rank 0 alone prints and writes files, and the summary lists each rank's time
and peak memory.

Exit codes: 0 success, 1 runtime error (model could not be loaded, video could not be written,
the generation produced NaN/inf, any other failure), 2 bad command line (argparse errors, unknown
method/option/preset, bad option values, sizes the model cannot take, a method configuration the
model's latent grid cannot take, a plan file calibrated for another model, an unsupported model
class, a missing file or model path given on the command line, an output path that cannot be
written, a device fastdit cannot run on, a GPU-only option without a GPU), 130 interrupted.
Errors are one line (``fastdit COMMAND: error: ...`` for bad input, ``error: ...`` otherwise);
``--debug`` (before or after the command) prints the traceback too. Bad input is found before
any model loads wherever it can be known then.
"""

from __future__ import annotations

import argparse
import math
import sys

from . import calibrate, generate, info
from .common import (
    DEFAULT_FPS,
    DEFAULT_PROMPT,
    DEFAULT_SEED,
    UsageError,
    method_names,
    parse_amount,
)

__all__ = ["build_parser", "main"]

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_OUTPUT = "out.mp4"


SEED_RANGE = (0, 2**64 - 1)  # what torch.Generator.manual_seed takes without wrapping


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int seed, got {text!r}") from None
    low, high = SEED_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"a seed must be an int in [0, 2**64 - 1], got {text}")
    return value


def _number(text: str, kind: type, accepts, expected: str):
    """``kind(text)`` when ``accepts`` it, else an argparse error "expected ``expected``"."""
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not accepts(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda value: value > 0, "a positive int")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda value: math.isfinite(value) and value > 0, "a positive number")


def _non_negative_float(text: str) -> float:
    return _number(text, float, lambda value: math.isfinite(value) and value >= 0, "a number >= 0")


# --------------------------------------------------------------------------- commands
def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import run_compare

    return run_compare(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


# --------------------------------------------------------------------------- parser
class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout; every flag's help states its default itself."""


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [_seed(item.strip()) for item in text.split(",") if item.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(
            f"expected an int or a comma list of ints (0,1,2) in [0, 2**64 - 1], got {text!r} ({exc})"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {text!r}")
    return seeds


def _help_model() -> str:
    """The default model the help texts describe (a bad FASTDIT_DEFAULT_MODEL is reported when a
    command runs, not while the parser is built)."""
    from ..testing.embedded import TRAINED_MODEL, default_model

    try:
        return default_model()
    except ValueError:
        return TRAINED_MODEL


def _add_run_arguments(parser: argparse.ArgumentParser, *, compare: bool) -> None:
    """The flags generate and compare share (model, prompt, sizes, device, schedule, GPU options)."""
    from ..testing.embedded import embedded_defaults, embedded_prompt

    model = _help_model()
    defaults = embedded_defaults(model)
    tiny_note = "default: {} for the embedded " + model + " model, else the pipeline's own default"
    prompt = embedded_prompt(model, DEFAULT_PROMPT)
    add = parser.add_argument
    add(
        "--model",
        default=None,
        help="hub id or local diffusers pipeline folder, 'tiny' (the embedded Wan trained on "
        "procedural clips) or 'tiny-random' (the embedded Wan with random weights, for plumbing "
        f"tests) (default: {model}; the FASTDIT_DEFAULT_MODEL environment variable sets it)",
    )
    if compare:
        add("--prompt", action="append", default=None,
            help=f"text prompt, repeatable (default: {prompt!r} when neither --prompt "
            "nor --prompts-file is given)")
        add("--prompts-file", default=None, metavar="FILE",
            help="text file with one prompt per line (blank lines and lines starting with # are "
            "skipped), added after the --prompt ones (default: none)")
    else:
        add("--prompt", default=None,
            help=f"text prompt (default: {prompt!r} for the embedded model, else "
            f"{DEFAULT_PROMPT!r})")
    add("--negative-prompt", default=None, help="negative prompt (default: the pipeline's own)")
    for flag, key, kind in (
        ("--height", "height", int),
        ("--width", "width", int),
        ("--num-frames", "num_frames", _positive_int),
        ("--steps", "num_inference_steps", _positive_int),
        ("--guidance-scale", "guidance_scale", _non_negative_float),
    ):
        text = {
            "height": "video height in px, a multiple of 16 (LTX-Video: 32)",
            "width": "video width in px, a multiple of 16 (LTX-Video: 32)",
            "num_frames": "number of frames, 4k+1 (LTX-Video 8k+1, Mochi 6k+1; images: none)",
            "num_inference_steps": "number of denoising steps",
            "guidance_scale": "classifier-free guidance scale (<= 1 disables it)",
        }[key]
        add(flag, type=kind, default=None, dest=flag[2:].replace("-", "_"),
            help=f"{text} ({tiny_note.format(defaults[key])})")
    if compare:
        add("--seed", "--seeds", dest="seeds", action="append", type=_seed_list, default=None,
            metavar="SEED[,SEED...]",
            help=f"seeds of the initial noise, repeatable or a comma list: every prompt runs "
            f"with every seed (default: {DEFAULT_SEED})")
    else:
        add("--seed", type=_seed, default=DEFAULT_SEED,
            help=f"random seed of the initial noise, in [0, 2**64 - 1] (default: {DEFAULT_SEED})")
    add("--fps", type=_positive_float, default=DEFAULT_FPS,
        help=f"frame rate of the written video (default: {DEFAULT_FPS})")
    add("--dtype", choices=DTYPES, default=None,
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    add("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    every = " for every method" if compare else ""
    add("--dense-steps", type=parse_amount, default=None, metavar="N|FRACTION",
        help=f"first denoising steps run dense{every}: a count (12) or a fraction (0.25, 1/4) "
        "(default: the preset's, else 0)")
    add("--dense-last-steps", type=parse_amount, default=None, metavar="N|FRACTION",
        help=f"last denoising steps run dense{every} (default: the preset's, else 0)")
    add("--dense-layers", type=parse_amount, default=None, metavar="N|FRACTION",
        help=f"first transformer blocks run dense{every} (default: the preset's, else 0)")
    add("--compile", action="store_true",
        help="torch.compile the transformer blocks (regional compilation); GPU only; attention "
        "time is then not measured (default: off)")
    add("--cpu-offload", action="store_true",
        help="keep models on the CPU and move each to the GPU while it runs "
        "(diffusers' enable_model_cpu_offload, needs accelerate); GPU only (default: off)")
    add("--ulysses", type=_positive_int, default=1, metavar="N",
        help="run the transformer on N GPUs with diffusers' Ulysses context parallelism; start "
        "N processes with torchrun --nproc-per-node N; rank 0 writes the files (default: 1)")
    _add_composition_arguments(parser, compare=compare)


# --------------------------------------------------------------------------- caches, quantization
# --cache and --quantize (fastdit.compose): a diffusers step cache and the INT8 kernel on top of
# the attention method.
def _add_composition_arguments(parser: argparse.ArgumentParser, *, compare: bool) -> None:
    from ..compose import CACHES

    names = ", ".join(f"{short} ({cls})" for short, cls in CACHES.items())
    add = parser.add_argument
    if compare:
        add("--cache", action="append", default=None, metavar="[LABEL=]NAME[:KEY=VALUE,...]",
            help=f"a diffusers step cache every compared run also runs with, repeatable; 'none' is "
            f"the run without one. NAME: {names}; options are the config's fields, e.g. "
            "fbc:threshold=0.05 or taylorseer:cache_interval=2,disable_cache_before_step=10,"
            "use_lite_mode=true (default: none)")
        add("--quantize", default=None, metavar="MODE[,MODE]",
            help="kernel quantizations every fastdit method runs with, comma list of none, int8 "
            "and int8-fp8 (bf16/fp16 only; not Agent, not PARO, which has its own option) "
            "(default: none)")
        add("--also-compiled", action="store_true",
            help="run every combination a second time with the transformer blocks compiled "
            "(regional torch.compile), after all eager runs; GPU only (default: off)")
    else:
        add("--cache", default=None, metavar="NAME[:KEY=VALUE,...]",
            help=f"a diffusers step cache on top of the method: {names}; options are the "
            "config's fields, e.g. fbc:threshold=0.05 (default: none)")
        add("--quantize", choices=("int8", "int8-fp8"), default=None,
            help="run the sparse attention on the quantized kernel: int8 (INT8 Q.K, 16-bit P.V) "
            "or int8-fp8 (INT8 Q.K, FP8 P.V; compute capability >= 8.9, else int8) (bf16/fp16 "
            "only; Dense, Radial, GNA, VMoBA, AdaSpa) (default: none)")


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog="fastdit",
        description="Fast block-sparse attention for diffusers video models.",
        formatter_class=_HelpFormatter,
    )
    try:
        from .. import __version__
    except ImportError:  # pragma: no cover - a partially installed package
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"fastdit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an error, not only its one-line message "
                        "(default: off)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    gen = commands.add_parser(
        "generate",
        help="generate a video with a sparse attention method",
        description=(
            "Generate a video with a diffusers pipeline, running attention through fastdit.\n\n"
            "Examples:\n"
            "  fastdit generate -o out.mp4                     # embedded trained model, offline\n"
            "  fastdit generate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --attention radial \\\n"
            "      --preset wan2.1-14b --prompt 'a cat surfing'\n"
            "  fastdit generate --attention gna --attention-opt window=3,5,5"
        ),
        formatter_class=_HelpFormatter,
    )
    gen.set_defaults(func=generate.cmd_generate)
    _add_run_arguments(gen, compare=False)
    add = gen.add_argument
    add("--attention", choices=method_names(), default=None,
        help="attention method run by fastdit's kernels (default: dense, or radial with --preset)")
    add("--attention-opt", action="append", default=None, metavar="KEY=VALUE",
        help="method option, repeatable; ints, floats, bools and comma tuples are parsed, e.g. "
        "decay=0.2, block_size=64, window=3,5,5 (default: the method's defaults)")
    add("--preset", default=None,
        help="Radial preset (wan2.1-14b, hunyuanvideo, wan2.2-a14b, distilled-4step); implies "
        "--attention radial and its dense schedule (default: none)")
    add("--output", "-o", default=DEFAULT_OUTPUT,
        help=f"output mp4 path (default: {DEFAULT_OUTPUT})")

    from .compare import (
        DEFAULT_METHOD_OPTIONS,
        DEFAULT_METHODS,
        DEFAULT_OUTPUT_DIR,
        DEFAULT_WARMUP,
        TRAINED_DEFAULT_METHODS,
    )

    default_opts = " ".join(
        f"{label}:{key}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
        for label, options in DEFAULT_METHOD_OPTIONS.items() for key, value in options.items()
    )
    cmp = commands.add_parser(
        "compare",
        help="run dense and several methods on the same prompts and seeds; write a report",
        description=(
            "Run the same prompts and seeds through dense attention (diffusers' stock\n"
            "processors: the reference) and each method, then write a report directory: every\n"
            "video, side-by-side grid videos, PSNR/SSIM (and LPIPS when available locally) per\n"
            "video and frame, speed (end to end, transformer, per step, attention share,\n"
            "density per layer and step, peak memory), report.md, report.html, results.json.\n\n"
            "Examples:\n"
            "  fastdit compare                                  # embedded model, methods vs dense\n"
            "  fastdit compare --methods radial,gna,g3=gna --method-opt gna:window=1,5,5 \\\n"
            "      --method-opt g3:window=3,5,5\n"
            "  fastdit compare --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --methods radial \\\n"
            "      --preset radial:wan2.1-14b --prompts-file prompts.txt --seed 0,1\n\n"
            "A method entry is NAME or LABEL=NAME (LABEL: letters, digits, '.', '_', '-'); the\n"
            "config file is JSON: {\"methods\": [{\"method\": \"gna\", \"label\": \"g\",\n"
            "\"options\": {\"window\": [1, 5, 5]}, \"preset\": null, \"dense_steps\": 0,\n"
            "\"dense_last_steps\": 0, \"dense_layers\": 0}]} (every key but method optional)."
        ),
        formatter_class=_HelpFormatter,
    )
    cmp.set_defaults(func=cmd_compare)
    _add_run_arguments(cmp, compare=True)
    add = cmp.add_argument
    add("--methods", default=None, metavar="ENTRY[,ENTRY...]",
        help=f"methods compared with dense, comma list of NAME or LABEL=NAME with NAME one of "
        f"{', '.join(method_names())} ('dense' is fastdit's own dense kernel) (default: "
        f"{DEFAULT_METHODS}, with {default_opts} unless --config is given; on the embedded "
        f"trained model {TRAINED_DEFAULT_METHODS}, GNA's window fitted to the grid)")
    add("--method-opt", action="append", default=None, metavar="[LABEL:]KEY=VALUE",
        help="option of one method entry, repeatable, e.g. gna:window=3,5,5 or "
        "radial:decay=0.5; LABEL may be left out when one method is compared (default: the "
        "method's defaults)")
    add("--preset", action="append", default=None, metavar="[LABEL:]NAME",
        help="preset of a method entry, e.g. radial:wan2.1-14b; without LABEL, the one entry "
        "whose method has presets (default: none)")
    add("--config", default=None, metavar="FILE",
        help="JSON file with method entries (see above); its entries come before --methods' "
        "(default: none)")
    add("--output-dir", "-o", default=DEFAULT_OUTPUT_DIR,
        help=f"report directory, created or reused (default: {DEFAULT_OUTPUT_DIR})")
    add("--reference-dir", default=None, metavar="DIR",
        help="also compare every video with DIR/p<prompt>_s<seed>.mp4, e.g. the videos/dense "
        "folder of an earlier report (default: none)")
    add("--warmup", type=int, default=None, metavar="N",
        help="untimed generations per method before the timed ones (Triton compilation, "
        f"autotuning, lazy initialisation) (default: {DEFAULT_WARMUP} on a GPU, 0 on the CPU)")
    add("--no-lpips", action="store_true",
        help="skip LPIPS even when the lpips package and its weights are available locally "
        "(default: LPIPS when available, skipped with a notice otherwise)")

    bench_parser = commands.add_parser(
        "bench",
        help="kernel micro-benchmark: fastdit vs SDPA (cuDNN, flash), FlexAttention, xformers",
        description=bench.DESCRIPTION,
        formatter_class=_HelpFormatter,
    )
    bench.add_arguments(bench_parser, default_out=bench.DEFAULT_OUT)
    bench_parser.set_defaults(func=cmd_bench)

    info_parser = commands.add_parser(
        "info",
        help="versions, which kernel backends can run here and why not, supported models",
        description="Print versions (torch, triton, diffusers, CUDA, GPU), optional packages, "
        "each kernel backend with the reason it cannot run here if it cannot, and the supported "
        "models, methods (with their options) and presets.",
        formatter_class=_HelpFormatter,
    )
    info_parser.add_argument("--device", default=None,
                      help="device to check the backends for (default: cuda if available, else cpu)")
    info_parser.add_argument("--dtype", choices=DTYPES, default="bfloat16",
                      help="dtype to check the backends for (default: bfloat16)")
    info_parser.add_argument("--head-dim", type=_positive_int, default=128,
                      help="head dim to check the backends for (default: 128)")
    info_parser.set_defaults(func=info.cmd_info)
    _add_calibrate_parser(commands)
    for subparser in commands.choices.values():  # --debug after the command works too
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="print the traceback of an error (default: off)")
    return parser


# --------------------------------------------------------------------------- calibrate


def _fraction(text: str) -> float:
    return _number(text, float, lambda value: 0.0 < value <= 1.0, "a number in (0, 1]")


def _add_calibrate_parser(commands) -> None:
    from ..methods.paro.calibrate import DEFAULT_DENSITY
    from ..testing.embedded import embedded_defaults, embedded_prompt

    model = _help_model()
    TINY_DEFAULTS = embedded_defaults(model)

    cal = commands.add_parser(
        "calibrate",
        help="calibrate PARO: per-head axis orders and block plans from dense runs",
        description=(
            "Run a pipeline dense on a few prompts, collect block-level attention mass per layer,\n"
            "head and axis order, and write a PARO plan file (orders and per-timestep-bucket\n"
            "block plans) for `fastdit generate --attention paro --attention-opt plan=FILE`.\n\n"
            "Examples:\n"
            "  fastdit calibrate -o plan.safetensors          # embedded tiny model, offline\n"
            "  fastdit calibrate --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --height 480 --width 832 \\\n"
            "      --num-frames 81 --steps 50 --prompt 'a cat surfing' --prompt 'a city at night'"
        ),
        formatter_class=_HelpFormatter,
    )
    cal.set_defaults(func=calibrate.cmd_calibrate)
    add = cal.add_argument
    tiny_note = "default: {} for the embedded " + model + " model, else the pipeline's own default"
    add("--model", default=None,
        help="hub id or local diffusers pipeline folder, 'tiny' or 'tiny-random' (default: "
        f"{model}; the FASTDIT_DEFAULT_MODEL environment variable sets it)")
    add("--prompt", action="append", default=None,
        help=f"calibration prompt, repeatable; one generation each (default: "
        f"{embedded_prompt(model, DEFAULT_PROMPT)!r} for the embedded model, else "
        f"{DEFAULT_PROMPT!r})")
    add("--negative-prompt", default=None, help="negative prompt (default: the pipeline's own)")
    add("--height", type=int, default=None, help=f"video height in px ({tiny_note.format(TINY_DEFAULTS['height'])})")
    add("--width", type=int, default=None, help=f"video width in px ({tiny_note.format(TINY_DEFAULTS['width'])})")
    add("--num-frames", type=_positive_int, default=None,
        help=f"number of frames, 4k+1 ({tiny_note.format(TINY_DEFAULTS['num_frames'])})")
    add("--steps", type=_positive_int, default=None,
        help=f"denoising steps of the schedule the plan is for (default: {TINY_DEFAULTS['num_inference_steps']} "
        f"for the embedded {model} model, else 50)")
    add("--guidance-scale", type=_non_negative_float, default=None,
        help=f"classifier-free guidance scale ({tiny_note.format(TINY_DEFAULTS['guidance_scale'])})")
    target = cal.add_mutually_exclusive_group()
    target.add_argument("--density", type=_fraction, default=None,
                        help=f"key blocks kept per query block, a fraction (default: {DEFAULT_DENSITY})")
    target.add_argument("--recall", type=_fraction, default=None,
                        help="or: keep each query block's largest key blocks up to this fraction of "
                        "its attention mass")
    add("--buckets", type=_positive_int, default=4,
        help="timestep buckets, each with its own block plans (default: 4)")
    add("--calibration-steps", type=_positive_int, default=None,
        help="collect attention mass on this many steps, spread evenly over the schedule; the others "
        "run dense without collection (default: every step)")
    add("--block-size", type=int, choices=(64, 128), default=128, help="kernel block (default: 128)")
    add("--seed", type=_seed, default=DEFAULT_SEED,
        help=f"random seed, in [0, 2**64 - 1] (default: {DEFAULT_SEED})")
    add("--dtype", choices=DTYPES, default=None,
        help="model dtype (default: bfloat16 on cuda, float32 on cpu)")
    add("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add("--output", "-o", default=calibrate.DEFAULT_PLAN_OUTPUT,
        help=f"plan file to write (safetensors; default: {calibrate.DEFAULT_PLAN_OUTPUT})")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastdit`` and ``python -m fastdit``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)

    def fail(message: str, code: int) -> int:
        if debug:
            import traceback

            traceback.print_exc()
        print(message, file=sys.stderr)
        return code

    try:
        return args.func(args)
    except UsageError as exc:
        return fail(f"{parser.prog} {args.command}: error: {exc}", 2)
    except KeyboardInterrupt:
        return fail("error: interrupted", 130)
    except (ValueError, OSError) as exc:  # FileNotFoundError is an OSError
        return fail(f"error: {_one_line(exc)}", 1)
    except Exception as exc:  # noqa: BLE001 - one line, the traceback with --debug
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "CUDA out of memory"
            return fail(f"error: out of GPU memory ({first}); try fewer frames, a smaller size, "
                        "--dtype bfloat16 or a sparser --attention", 1)
        hint = "" if debug else " (run with --debug for the traceback)"
        return fail(f"error: {type(exc).__name__}: {_one_line(exc)}{hint}", 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
