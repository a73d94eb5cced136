"""Sweep launch configurations of the block-sparse attention kernel on a GPU.

For each head-dim / block-size key of ``_CONFIGS`` in ``fastdit/kernels/triton/attention.py``,
times every candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) on a dense and a 25 % random plan at
the Wan2.1-1.3B 480p shape (bf16) and prints TFLOP/s; the best go into ``_CONFIGS`` by hand.
Run: ``python -m benchmarks.tune_attention [--head-dims 128 --block-sizes 128]``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os

import torch
import triton

from fastdit.kernels import BlockSparsity, block_sparse_attention
from fastdit.kernels.triton import attention as kernel_module
from fastdit.kernels.triton import triton_common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", default="128,64")
    parser.add_argument("--block-sizes", default="128,64")
    parser.add_argument("--seq", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    args = parser.parse_args()
    rows = []
    for head_dim, block in itertools.product(
        [int(x) for x in args.head_dims.split(",")], [int(x) for x in args.block_sizes.split(",")]
    ):
        q, k, v = (
            torch.randn(1, args.seq, args.heads, head_dim, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)
        )
        num_blocks = triton.cdiv(args.seq, block)
        plans = {
            "dense": BlockSparsity.dense(args.seq, args.seq, block, device="cuda"),
            "random25": BlockSparsity.from_block_map(
                torch.rand(1, args.heads, num_blocks, num_blocks, device="cuda") < 0.25, block
            ),
        }
        key = (max(16, triton.next_power_of_2(head_dim)), block, block, 2)
        original = kernel_module._CONFIGS.get(key)
        tma_views = kernel_module._tma_views
        candidates = [
            (bm, bn, w, s)
            for bm in (64, 128)
            for bn in (32, 64, 128)
            for w in (4, 8)
            if not (bm == 64 and w == 8)
            for s in (2, 3)
            if bm <= block and bn <= block
        ]
        for (plan_name, plan), loads in itertools.product(plans.items(), ("tma", "pointer")):
            # "pointer" disables the tensor-descriptor path to measure what it brings.
            kernel_module._tma_views = tma_views if loads == "tma" else (lambda *a: None)
            pairs = plan.computed_pairs(args.seq, args.seq) * (args.heads // plan.kv_counts.shape[1])
            for config in candidates:
                kernel_module._CONFIGS[key] = config
                triton_common.working_launch_configs.clear()
                try:
                    ms = triton.testing.do_bench(
                        lambda: block_sparse_attention(q, k, v, plan), warmup=10, rep=40,
                        return_mode="median",
                    )
                except Exception as error:  # out of resources for this config
                    print(f"D={head_dim} block={block} {plan_name} {config}: {type(error).__name__}")
                    continue
                tflops = 4 * pairs * head_dim / ms / 1e9
                rows.append({"head_dim": head_dim, "block": block, "plan": plan_name,
                             "loads": loads, "config": config, "ms": ms, "tflops": tflops})
            best = max((r for r in rows if r["head_dim"] == head_dim and r["block"] == block
                        and r["plan"] == plan_name and r["loads"] == loads),
                       key=lambda r: r["tflops"])
            print(f"D={head_dim} block={block} {plan_name} {loads}: best {best['config']} "
                  f"{best['ms']:.2f} ms {best['tflops']:.0f} TFLOP/s (current {original})", flush=True)
        kernel_module._CONFIGS[key] = original
        kernel_module._tma_views = tma_views
        triton_common.working_launch_configs.clear()
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "tune_attention.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
