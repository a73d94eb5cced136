"""Per latent frame, how far each method's transformer prediction is from dense: is the first
frame (a latent frame of its own in Wan's causal VAE) where the sparse methods lose most?

    python -m benchmarks.frame_snr --seeds 1000,1001          # about 20 s a seed, quiet CPU

The CI quality guard's setup (``tests/quality/test_quality_trained.py``: the packaged model, 33
frames of 128x128 px, 6 steps, every transformer call on the dense trajectory, each method at
its defaults with 64-token blocks), with the prediction SNR against dense split by latent frame
(9 of them), over the calls the method's schedule leaves sparse; then the same for one random-block
plan at the method's density. Prints one line per method and seed.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit("run it from the repository root as: python -m benchmarks.frame_snr")

from benchmarks.guard_thresholds import parse_seeds  # noqa: E402


def frame_snr_db(reference: list[torch.Tensor], test: list[torch.Tensor], calls: list[int]) -> list[float]:
    """The guard's SNR (dB) per latent frame (dim 2 of ``[B, C, T, H, W]``) over ``calls``."""
    values = []
    for frame in range(reference[0].shape[2]):
        error = sum(float((test[i][:, :, frame] - reference[i][:, :, frame]).square().sum()) for i in calls)
        signal = sum(float(reference[i][:, :, frame].square().sum()) for i in calls)
        values.append(float(-10 * np.log10(max(error, 1e-30) / signal)))
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="1000,1001", help="e.g. 1000-1003 or 1000,1005")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # the guard's path: fastdit's PyTorch reference
    import fastdit
    import tests.quality.test_quality_trained as guard
    from fastdit.quality.controls import RandomBlocks
    from fastdit.testing.tiny import load_pipeline

    pipe = load_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for seed in parse_seeds(args.seeds):
        dense = guard._predictions(pipe, seed)[0]
        print(f"seed {seed}: prediction SNR dB against dense, latent frames 0..{dense[0].shape[2] - 1}")
        for name in sorted(guard.METHODS):
            method = guard.METHODS[name]()
            predictions, densities = guard._predictions(pipe, seed, method, forced=dense)
            calls = guard._sparse_calls(method, densities, len(dense))
            density = guard._sparse_density(method, densities)
            control = RandomBlocks(density=density, block_size=guard.BLOCK, seed=seed)
            random_predictions, _ = guard._predictions(
                pipe, seed, control, fastdit.Schedule.from_method(method), forced=dense)
            for label, values in ((name, frame_snr_db(dense, predictions, calls)),
                                  ("  random", frame_snr_db(dense, random_predictions, calls))):
                print(f"  {label:<9} density {density:.3f}: " + " ".join(f"{v:5.1f}" for v in values),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
