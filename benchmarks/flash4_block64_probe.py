"""Probe: FlashAttention-4's block-sparse path at 64-token blocks on sm90, against fastdit's Triton
kernel on the same plan (AdaSpa plans 64-token blocks; the flash4 backend takes 128-token key
blocks only). Prints ms and the output difference between the two; GPU only.

    python -m benchmarks.flash4_block64_probe
"""

from __future__ import annotations

import math
import sys

import torch

from fastdit.cli import peers
from fastdit.kernels import BlockSparsity, block_sparse_attention


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    generator = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'shape':<16}{'block':>6}{'density':>9}{'triton ms':>11}{'FA4 ms':>9}{'FA4/triton':>11}"
          f"{'max diff':>10}")
    for seq, heads in ((32_760, 12), (75_600, 40)):
        q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16,
                               generator=generator) for _ in range(3))
        for block in (64, 128):
            num = math.ceil(seq / block)
            block_map = torch.rand(1, heads, num, num, device="cuda", generator=generator) < 0.2
            block_map[..., -1] = True  # the ragged last key block
            plan = BlockSparsity.from_block_map(block_map, block)
            triton_out = block_sparse_attention(q, k, v, plan, backend="triton")
            triton_ms = do_bench(lambda: block_sparse_attention(q, k, v, plan, backend="triton"),
                                 return_mode="median")
            try:
                fa4 = peers.fa4_block_sparse_attention(plan, 1)
                fa4_out = fa4(q, k, v)
                fa4_ms = do_bench(lambda: fa4(q, k, v), return_mode="median")
                diff = (fa4_out.float() - triton_out.float()).abs().max().item()
                cells = f"{fa4_ms:>9.3f}{fa4_ms / triton_ms:>11.3f}{diff:>10.2e}"
            except Exception as exc:  # report, go on
                cells = f"  FA4 failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            print(f"S={seq} H={heads:<4}{block:>6}{plan.density:>9.3f}{triton_ms:>11.3f}{cells}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
