"""How much degradation the quality checker (``fastdit.quality.score``) tolerates: ground-truth
clips of :mod:`fastdit.quality.clips` (33 x 256 x 256, the tiny model's default size) blurred
(average-pooled by 2-16x and upsampled), with Gaussian noise, or desaturated, each with its PSNR
and the checker's colour/shape/motion accuracy. It tells what a VAE's reconstruction (or a
generation) must keep for the checker to read it: CPU, about 2 minutes.

    python -m benchmarks.checker_robustness [--clips 24] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if not __package__:
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import add_out_argument  # noqa: E402
from fastdit.files import atomic_write_text  # noqa: E402
from fastdit.quality import render, sample_specs, score  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=24)
    parser.add_argument("--seed", type=int, default=123)
    add_out_argument(parser)
    args = parser.parse_args(argv)
    specs = sample_specs(args.clips, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    clean = render(specs, 33, 256, 256, generator=generator)  # (B, F, H, W, 3) in [0, 1]

    def measure(name, video):
        rows = [score(v.numpy(), spec.caption) for v, spec in zip(video, specs)]
        accuracy = {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "shape", "motion")}
        mse = ((video - clean) ** 2).mean().item()
        psnr = 10 * math.log10(1 / mse) if mse > 0 else float("inf")
        print(f"{name:<18} PSNR {psnr:5.1f} dB  {accuracy}", flush=True)
        return dict(degradation=name, psnr=psnr, **accuracy)

    results = [measure("none", clean)]
    frames = clean.permute(0, 1, 4, 2, 3).reshape(-1, 3, 256, 256)
    for factor in (2, 4, 8, 16):
        blurred = F.interpolate(F.avg_pool2d(frames, factor), scale_factor=factor, mode="bilinear")
        video = blurred.reshape(clean.shape[0], 33, 3, 256, 256).permute(0, 1, 3, 4, 2)
        results.append(measure(f"blur {factor}x", video.clamp(0, 1)))
    for sigma in (0.05, 0.1, 0.2):
        noisy = clean + sigma * torch.randn(clean.shape, generator=generator)
        results.append(measure(f"noise sigma {sigma}", noisy.clamp(0, 1)))
    for amount in (0.2, 0.4):
        results.append(measure(f"desaturate {amount}", clean + amount * (clean.mean(-1, keepdim=True) - clean)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checker_robustness.json"
    atomic_write_text(path, json.dumps(dict(clips=args.clips, seed=args.seed, rows=results), indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
