"""Offline demo of fastdit's block-sparse attention kernel on a small Wan-like latent video.

It shows the kernel-level flow without downloading a model:

1. lay out a latent video grid (T x H x W tokens, frame-major as diffusers orders them);
2. plan a block sparsity: a banded "radial-like" map in which each query block visits the key
   blocks within one latent frame of its own, plus every key block holding frame 0;
3. run ``fastdit.kernels.block_sparse_attention`` with that plan and with the dense plan, and
   check both against plain PyTorch (masked attention, ``scaled_dot_product_attention``).

Runs on CUDA when available. Without a GPU it runs the same Triton kernel through Triton's CPU
interpreter (``TRITON_INTERPRET=1``, set here unless you set it yourself; ``TRITON_INTERPRET=0``
takes the PyTorch reference path instead). Exits 1 if an error exceeds the bf16 tolerance.

    python examples/kernel_demo.py
"""

import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled
from fastdit.kernels import BlockSparsity, block_sparse_attention, explain_backends
from fastdit.layout import LatentGrid

TOLERANCE = 2e-2  # max abs error allowed for bf16 outputs
BLOCK = 128  # tokens per query block and per key block
BATCH, HEADS, HEAD_DIM = 1, 4, 64


def frame_band_block_map(grid: LatentGrid, block: int, max_frame_gap: int = 1) -> torch.Tensor:
    """Bool ``[1, 1, nB, nB]``: keep (p, c) if the latent frames covered by query block p and
    key block c are at most ``max_frame_gap`` apart, or if key block c holds frame 0."""
    frame = grid.coords()[:, 0]  # latent frame t of every token, ascending (frame-major order)
    starts = torch.arange(0, grid.num_tokens, block)
    first = frame[starts]  # first frame each block covers
    last = frame[(starts + block - 1).clamp(max=grid.num_tokens - 1)]  # and last frame
    # Distance between the frame ranges [first_p, last_p] and [first_c, last_c] (0 if they overlap).
    gap = torch.maximum(first[:, None] - last[None, :], first[None, :] - last[:, None]).clamp(min=0)
    keep = (gap <= max_frame_gap) | (first[None, :] == 0)
    return keep[None, None]


def timed(fn, device: torch.device, repeats: int):
    """``fn()``'s result and its mean seconds per call, after one warm-up (Triton compiles)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    sync()
    return result, (time.perf_counter() - start) / repeats


def main() -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = LatentGrid(frames=21, height=6, width=10)  # 1,260 tokens: 10 blocks, the last ragged
    seq = grid.num_tokens
    gen = torch.Generator().manual_seed(0)
    # Random bf16 q, k, v in diffusers' (B, S, H, D) layout.
    q, k, v = (
        torch.randn(BATCH, seq, HEADS, HEAD_DIM, generator=gen).to(device, torch.bfloat16)
        for _ in range(3)
    )

    block_map = frame_band_block_map(grid, BLOCK).to(device)
    sparse_plan = BlockSparsity.from_block_map(block_map, BLOCK)
    dense_plan = BlockSparsity.dense(seq, seq, BLOCK, device=device)

    reasons = explain_backends(device, q.dtype, HEAD_DIM)
    backend = next(name for name, reason in reasons.items() if reason is None)
    why = f" (triton: {reasons['triton']})" if backend != "triton" else ""
    print(f"grid {grid.frames}x{grid.height}x{grid.width} = {seq} tokens on {device}")
    print(f"backend: {backend}{why}")
    print(f"radial-like plan, density {sparse_plan.density:.3f} (# = key block visited):")
    for row in block_map[0, 0].tolist():
        print("    " + "".join("#" if kept else "." for kept in row))

    # Ground truth in fp32 from the same bf16 inputs, (B, H, S, D) as SDPA wants.
    qf, kf, vf = (x.float().transpose(1, 2) for x in (q, k, v))
    block_of = torch.arange(seq, device=device) // BLOCK
    token_mask = block_map[0, 0][block_of][:, block_of]  # [S, S]: the block map, token by token
    truth = {
        "radial-like": F.scaled_dot_product_attention(qf, kf, vf, attn_mask=token_mask),
        "dense": F.scaled_dot_product_attention(qf, kf, vf),
    }

    repeats = 20 if device.type == "cuda" else 2
    rows, failed = [], False
    for name, plan in (("radial-like", sparse_plan), ("dense", dense_plan)):
        out, seconds = timed(lambda p=plan: block_sparse_attention(q, k, v, p), device, repeats)
        error = (out.float().transpose(1, 2) - truth[name]).abs().max().item()
        failed |= not error <= TOLERANCE
        blocks = f"{plan.num_q_blocks}x{plan.num_kv_blocks}"
        rows.append((name, seq, blocks, plan.density, error, seconds * 1e3))

    header = ("plan", "tokens", "blocks", "density", "max |err|", "ms/call")
    print("\n{:<12} {:>6} {:>7} {:>8} {:>10} {:>9}".format(*header))
    for name, tokens, blocks, density, error, ms in rows:
        print(f"{name:<12} {tokens:>6} {blocks:>7} {density:>8.3f} {error:>10.2e} {ms:>9.2f}")
    print(f"\nerrors against fp32 PyTorch attention with the same mask; bf16 tolerance {TOLERANCE}")
    if failed:
        print("FAILED: an error exceeds the tolerance", file=sys.stderr)
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
