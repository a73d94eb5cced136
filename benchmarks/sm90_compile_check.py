"""Compile fastdit's attention kernels for Hopper (sm_90) on any machine: no GPU needed.

Triton's NVIDIA backend and its bundled ``ptxas`` run on a CPU, so a kernel compiles for a GPU
target without one. This script drives fastdit's launchers with CPU tensors of the Wan2.1-14B
720p shape (75,600 tokens, head_dim 128, 128-token blocks: the constexprs, launch
configurations and tensor-descriptor path of a GPU run) and compiles where they would launch.
For each mode and ``triton_common.WARP_SPECIALIZE`` off and on it reports: compiled, or the
compiler's error; the warps (a warp-specialized 4-warp kernel has 12: a TMA producer group and
two consumer groups); shared memory; the PTX's ``setmaxnreg`` count (warp groups trading
registers) and a hash of its instructions without debug lines (equal hashes: the same code, so
a change that must not alter a kernel can be checked here). It says whether Triton's Hopper pass
takes a kernel, not whether the kernel is right or fast: ``benchmarks/fp8_tune.py`` checks and
times it on a GPU. Each case runs in its own process (Triton's Hopper pass can abort).

    python -m benchmarks.sm90_compile_check                    # 4 modes, off and on, ~1 min
    python -m benchmarks.sm90_compile_check --modes int8-fp8 --fp8-config 128,128,4,3

Writes ``sm90_compile_check_triton<version>_<date>.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

import torch  # noqa: E402
import triton  # noqa: E402

from benchmarks.harness import add_out_argument  # noqa: E402
from fastdit.files import atomic_write_text  # noqa: E402

MODES = ("bf16", "int8", "int8-fp8", "fp8")
SEQ_LEN, HEADS, HEAD_DIM, BLOCK = 75_600, 2, 128, 128  # heads only multiply the grid
CASE_ROW = "CASE-ROW "


def ptx_code_hash(ptx: str) -> str:
    """A hash of the PTX's instructions: debug lines, labels and braces dropped."""
    skip = (".loc", ".file", "//", ".b8", ".b32", ".section", "$L__")
    kept = [line.strip() for line in ptx.splitlines()]
    kept = [line for line in kept if line not in ("{", "}") and not line.startswith(skip)
            and "L__tmp" not in line]
    return hashlib.sha1("\n".join(kept).encode()).hexdigest()[:12]


class CompileInsteadOfLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` compiles it for
    ``target`` with Triton's own argument binding and stores what came out in ``result``."""

    def __init__(self, kernel, target, result: dict):
        self.kernel, self.target, self.result = kernel, target, result

    def __getitem__(self, grid):
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        def compile_kernel(*args, **kwargs):
            kernel = self.kernel
            backend = make_backend(self.target)
            binder = create_function_from_signature(kernel.signature, kernel.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = kernel._pack_args(
                backend, kwargs, bound, specialization, options)
            start = time.perf_counter()
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                      target=self.target, options=options.__dict__)
            ptx = compiled.asm["ptx"]
            self.result.update(
                status="ok", compile_s=round(time.perf_counter() - start, 1),
                warps=compiled.metadata.num_warps, shared_bytes=compiled.metadata.shared,
                setmaxnreg=ptx.count("setmaxnreg"), ptx_code=ptx_code_hash(ptx),
                launch=[kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["num_warps"],
                        kwargs["num_stages"]],
            )

        return compile_kernel


def compile_case(mode: str, switch: bool, fp8_config) -> dict:
    """Compile ``mode``'s kernel with WARP_SPECIALIZE ``switch`` (in this process)."""
    from triton.backends.compiler import GPUTarget

    from fastdit.kernels import BlockSparsity
    from fastdit.kernels.quantized import QuantizedQK, QuantizedV
    from fastdit.kernels.triton import attention, int8_attention, triton_common

    result = dict(mode=mode, warp_specialize=switch, triton=triton.__version__)
    target = GPUTarget("cuda", 90, 32)
    attention._block_sparse_attn_fwd = CompileInsteadOfLaunch(
        attention._block_sparse_attn_fwd, target, result)
    int8_attention._int8_block_sparse_attn_fwd = CompileInsteadOfLaunch(
        int8_attention._int8_block_sparse_attn_fwd, target, result)
    # CPU tensors take the tensor-descriptor path here, as Hopper's would.
    triton_common.tma_device = int8_attention.tma_device = lambda *args, **kwargs: True
    triton_common.hopper_unsupported = lambda device: None
    # What the compiler does is the question here, also on a release the library refuses.
    triton_common.WARP_SPECIALIZE_WRONG_TRITON = {}
    os.environ[triton_common.WARP_SPECIALIZE_ENV] = "1" if switch else "0"
    int8_attention.FP8_LAUNCH_CONFIG = fp8_config
    plan = BlockSparsity.dense(SEQ_LEN, SEQ_LEN, BLOCK)
    common = dict(layout="bshd", return_lse=False, key_lengths=None, interpret=False)
    if mode == "bf16":
        q = torch.zeros(1, SEQ_LEN, HEADS, HEAD_DIM, dtype=torch.bfloat16)
        attention.triton_block_sparse_attention(q, q, q, plan, scale=HEAD_DIM**-0.5, **common)
        return result
    # Only dtypes and shapes matter for compiling: zeros in the quantization passes' layout.
    blocks = -(-SEQ_LEN // BLOCK)
    qk_dtype = torch.float8_e4m3fn if mode == "fp8" else torch.int8
    qk = torch.zeros(1, HEADS, SEQ_LEN, HEAD_DIM, dtype=qk_dtype)
    scales = torch.ones(1, HEADS, blocks)
    quantized = QuantizedQK(q=qk, q_scale=scales, k=qk, k_scale=scales,
                            k_mean=torch.zeros(1, HEADS, HEAD_DIM), lse_shift=None,
                            q_block_size=BLOCK, kv_block_size=BLOCK, scale=HEAD_DIM**-0.5)
    quantized_v = None
    if mode != "int8":
        quantized_v = QuantizedV(
            v=torch.zeros(1, HEADS, HEAD_DIM, blocks * BLOCK, dtype=torch.float8_e4m3fn),
            scale=torch.ones(1, HEADS, HEAD_DIM), transposed=True)
    v = torch.zeros(1, SEQ_LEN, HEADS, HEAD_DIM, dtype=torch.bfloat16)
    int8_attention.triton_int8_block_sparse_attention(quantized, v, plan, quantized_v=quantized_v,
                                                      **common)
    return result


def run_case(mode: str, switch: bool, fp8_config, timeout_s: float) -> dict:
    """:func:`compile_case` in a child process: its row, or an error row if it fails or dies."""
    command = [sys.executable, "-m", "benchmarks.sm90_compile_check", "--case", mode,
               "--warp-specialize" if switch else "--no-warp-specialize"]
    if fp8_config:
        command += ["--fp8-config", ",".join(map(str, fp8_config))]
    row = dict(mode=mode, warp_specialize=switch, triton=triton.__version__)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(row, status="error", error=f"no result after {timeout_s:.0f} s")
    for line in done.stdout.splitlines():
        if line.startswith(CASE_ROW):
            return json.loads(line[len(CASE_ROW):])
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    messages = [line for line in lines
                if any(word in line for word in ("rror", "ssert", "UNREACHABLE"))]
    return dict(row, status="error", error=f"exit {done.returncode}: "
                + " | ".join((messages or lines)[-3:])[-500:])


def format_row(row: dict) -> str:
    switch = "ws on " if row["warp_specialize"] else "ws off"
    launch = "x".join(map(str, row["launch"])) if row.get("launch") else "-"
    if row["status"] != "ok":
        return f"{row['mode']:>9} {switch} {row['status']:>6} {row.get('error', '')}"
    return (f"{row['mode']:>9} {switch} {row['status']:>6} launch {launch:>12} warps "
            f"{row['warps']:>2} shared {row['shared_bytes']:>6} B "
            f"setmaxnreg {row['setmaxnreg']:>2} "
            f"ptx {row['ptx_code']} ({row['compile_s']} s)")


def parse_config(text: str) -> tuple[int, int, int, int]:
    values = tuple(int(x) for x in text.split(","))
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"want BLOCK_M,BLOCK_N,num_warps,num_stages, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    parser.add_argument("--fp8-config", type=parse_config, default=None,
                        help="FP8_LAUNCH_CONFIG for int8-fp8 and fp8: BLOCK_M,BLOCK_N,warps,stages")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per case")
    parser.add_argument("--case", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--warp-specialize", action=argparse.BooleanOptionalAction,
                        default=False, help=argparse.SUPPRESS)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    if args.case:
        print(CASE_ROW + json.dumps(compile_case(args.case, args.warp_specialize, args.fp8_config)),
              flush=True)
        return 0
    modes = [m for m in args.modes.split(",") if m]
    if not modes or not set(modes) <= set(MODES):
        parser.error(f"--modes must be a subset of {','.join(MODES)}, got {args.modes!r}")
    print(f"triton {triton.__version__}, target cuda sm_90", flush=True)
    rows = []
    for mode in modes:
        for switch in (False, True):
            fp8_config = args.fp8_config if mode in ("int8-fp8", "fp8") else None
            rows.append(run_case(mode, switch, fp8_config, args.timeout_s))
            print(format_row(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"sm90_compile_check_triton{triton.__version__}_"
                       f"{datetime.date.today().isoformat()}.json")
    atomic_write_text(path, json.dumps(dict(triton=triton.__version__, fp8_config=args.fp8_config,
                                    rows=rows), indent=1))
    print(f"wrote {path}")
    return 0 if all(row["status"] == "ok" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
