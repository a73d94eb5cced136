"""Sweep the INT8 attention kernel's launch configurations on a GPU.

At the core kernel benchmark's shapes (bf16 inputs, head_dim 128, 128-token blocks, a random plan
at ``--density``), times with ``triton.testing.do_bench``:

* ``bf16``: the bf16 block-sparse kernel as shipped (the baseline);
* ``key-mean`` and ``quantize``: K's smoothing mean alone, and the whole quantization (mean, K and
  Q launches);
* ``int8-kernel``: the INT8 kernel alone on inputs quantized beforehand, for every candidate
  (BLOCK_M, BLOCK_N, num_warps, num_stages) on the first shape, and the shipped plus the best
  ``--top`` of them on later shapes.

Every row also reports the output's cosine similarity and relative L1 against the bf16 kernel.
The best configuration goes into ``_INT8_CONFIGS`` in ``fastdit/kernels/triton/int8_attention.py`` by hand.

Other levers were measured with the version of this script in commit bd24815
(``benchmarks/results/h100_2026-11-23/tune_int8_run{1,2}_*.json``) and are not shipped: P's exponentials two per
instruction in bf16x2 or f16x2 (``ex2.approx``) and P truncated to bf16 by a byte permute were
0-4% slower than fp32 ``exp2`` with a rounding conversion, in both kernels; a warp-specialized main
loop (``tl.range(..., warp_specialize=True)``) does not compile on Hopper with Triton 3.6. The
magic-number int32 -> fp32 conversion (1-3% faster) is shipped.

    python -m benchmarks.tune_int8 --shapes wan13b-480p,wan14b-720p --out tune_int8.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import triton

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from fastdit.kernels import BlockSparsity, block_sparse_attention, quantize_qk_int8  # noqa: E402
from fastdit.kernels.triton import triton_common  # noqa: E402
from fastdit.kernels.triton import int8_attention as int8_module  # noqa: E402
from fastdit.kernels.quantized import sampled_key_mean  # noqa: E402
from benchmarks.harness import SHAPES  # noqa: E402  (the core kernel benchmark's shapes)
from benchmarks.harness import accuracy  # noqa: E402  (cosine and relative L1, fp64 in chunks)

BLOCK = 128
HEAD_DIM = 128
ALL_CONFIGS = [
    (bm, bn, w, s)
    for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (2, 3, 4))
    if not (bm == 64 and w == 8)
]


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="wan13b-480p")
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--top", type=int, default=3, help="configs carried to later shapes")
    parser.add_argument("--configs", default="all",
                        help="'all' or BLOCK_M:BLOCK_N:warps:stages,... for the first shape")
    parser.add_argument("--out", type=Path, default=Path("tune_int8.json"))
    args = parser.parse_args()
    rows: list[dict] = []
    start = time.perf_counter()

    def record(**row) -> None:
        rows.append(row)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
              flush=True)

    for shape in args.shapes.split(","):
        seq, heads = SHAPES[shape].seq_len, SHAPES[shape].heads
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(1, seq, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=gen)
                   for _ in range(3))
        blocks = math.ceil(seq / BLOCK)
        block_map = torch.rand(1, heads, blocks, blocks, device="cuda", generator=gen) < args.density
        block_map |= torch.eye(blocks, dtype=torch.bool, device="cuda")
        plan = BlockSparsity.from_block_map(block_map, BLOCK)
        pairs = plan.computed_pairs(seq, seq)
        flop = 4.0 * pairs * HEAD_DIM
        base = dict(shape=shape, density=round(plan.density, 4))

        reference = block_sparse_attention(q, k, v, plan)
        bf16_ms = bench(lambda: block_sparse_attention(q, k, v, plan))
        record(**base, kind="bf16", ms=bf16_ms, tflops=flop / bf16_ms / 1e9)

        record(**base, kind="key-mean", ms=bench(lambda: sampled_key_mean(k, "bshd", None)))
        record(**base, kind="quantize", ms=bench(lambda: quantize_qk_int8(q, k, block_size=BLOCK)))
        quantized = quantize_qk_int8(q, k, block_size=BLOCK)

        def int8_call():
            return int8_module.triton_int8_block_sparse_attention(
                quantized, v, plan, layout="bshd", return_lse=False, key_lengths=None, interpret=False
            )[0]

        key = (HEAD_DIM, BLOCK, BLOCK)
        shipped = int8_module._INT8_CONFIGS[key]

        def time_config(config):
            int8_module._INT8_CONFIGS[key] = config
            triton_common.working_launch_configs.clear()
            labels = dict(config=list(config))
            try:
                out = int8_call()
                used = next(c for k, c in triton_common.working_launch_configs.items() if k[0] == "int8")
                if used != config:
                    record(**base, kind="int8-kernel", **labels, error=f"did not fit, shrunk to {used}")
                    return None
                ms = bench(int8_call)
                cos, l1 = accuracy(out, reference)
                record(**base, kind="int8-kernel", **labels, ms=ms, tflops=flop / ms / 1e9,
                       speedup_vs_bf16=bf16_ms / ms, cosine=cos, rel_l1=l1)
                return ms
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a row
                record(**base, kind="int8-kernel", **labels,
                       error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
                return None

        if shape == args.shapes.split(",")[0]:
            sweep = ALL_CONFIGS if args.configs == "all" else [
                tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")
            ]
        else:
            sweep = [shipped] + best_configs
        timed = []
        for config in dict.fromkeys(sweep):
            ms = time_config(config)
            if ms is not None:
                timed.append((ms, config))
        if shape == args.shapes.split(",")[0]:
            best_configs = [config for _, config in sorted(timed)][: args.top]
        int8_module._INT8_CONFIGS[key] = shipped
        del q, k, v, quantized, reference
        torch.cuda.empty_cache()

    metadata = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    date=time.strftime("%Y-%m-%d"), density=args.density,
                    elapsed_s=round(time.perf_counter() - start, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(metadata=metadata, rows=rows), indent=1))
    best = sorted((r for r in rows if r["kind"] == "int8-kernel" and r.get("ms")),
                  key=lambda r: (r["shape"], r["ms"]))
    print("\nbest int8-kernel rows per shape:")
    for shape in args.shapes.split(","):
        for r in [r for r in best if r["shape"] == shape][:5]:
            print(f"  {shape} {r['config']} {r['ms']:.3f} ms "
                  f"x{r['speedup_vs_bf16']:.3f} vs bf16 cos {r['cosine']:.5f} L1 {r['rel_l1']:.4f}")
    print(f"elapsed {metadata['elapsed_s']} s")


if __name__ == "__main__":
    main()
