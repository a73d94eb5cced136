"""The whole training history of a tiny model trained in several calls, as one plot.

Each call of ``train_tiny_wan.py`` plots only its own losses (``loss.png``); a model continued
with ``--resume-from`` has its history spread over the calls' ``metrics.json``. This draws the
VAE's loss, the transformer's loss over all calls (on the cumulative step axis, a line where each
call starts) and the checker's held-out scores after each call::

    python training/plot_history.py docs/tiny_wan/training_history.png \\
        RUN4/vae_stage/metrics.json RUN4/dit_stage/metrics.json RUN5/resume*/metrics.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from fastdit.cli.report import agg_pyplot  # noqa: E402
from fastdit.files import atomic_path  # noqa: E402

ATTRIBUTES = ("colour", "shape", "motion")


def smooth(values, width=50):
    values = np.asarray(values, dtype=np.float64)
    if len(values) < width:
        return values
    return np.convolve(values, np.ones(width) / width, mode="valid")


def read_history(paths):
    """VAE losses, transformer runs [(first step, default-size steps, losses)] and held-out
    scores [(cumulative steps, accuracy)] from the calls' metrics files, in order."""
    vae, runs, scores = [], [], []
    for path in paths:
        with open(path) as f:
            metrics = json.load(f)
        losses = metrics.get("losses", {})
        vae = vae or metrics.get("vae_losses", []) or losses.get("vae", [])  # a call that
        # trained the transformer after the VAE in one run repeats its VAE losses
        transformer = losses.get("transformer", [])
        if not transformer:
            continue
        offset = losses.get("transformer_step_offset")
        if offset is None:  # a first run: steps follow the previous runs'
            offset = runs[-1][0] + len(runs[-1][2]) if runs else 0
        long = losses.get("transformer_long_step", [False] * len(transformer))
        steps = np.array([i for i, is_long in enumerate(long) if not is_long]) + offset
        default = [loss for loss, is_long in zip(transformer, long) if not is_long]
        runs.append((offset, steps, default))
        accuracy = metrics.get("eval", {}).get("heldout", {}).get("accuracy")
        if accuracy is None:
            raise SystemExit(f"{path}: no held-out accuracy (eval.heldout.accuracy)")
        scores.append((offset + len(transformer), accuracy))
    if not runs:
        raise SystemExit("no transformer losses in " + ", ".join(paths))
    return vae, runs, scores


def plot(vae, runs, scores, path):
    plt = agg_pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    if vae:
        axes[0].plot(vae, alpha=0.3, color="C0")
        axes[0].plot(smooth(vae), color="C0")
    axes[0].set(title="VAE (L1 + MSE + KL)", xlabel="step", ylabel="loss", yscale="log")
    for index, (offset, steps, default) in enumerate(runs):
        axes[1].plot(steps, default, alpha=0.25, color="C1")
        smoothed = smooth(default)
        axes[1].plot(steps[len(steps) - len(smoothed):], smoothed, color="C1")
        if index:
            axes[1].axvline(offset, color="gray", linewidth=0.8, linestyle="--")
    axes[1].set(title=f"transformer, {len(runs)} calls (flow matching MSE)", xlabel="step",
                ylabel="MSE", yscale="log")
    steps = [step for step, _ in scores]
    for index, attribute in enumerate(ATTRIBUTES):
        axes[2].plot(steps, [100 * accuracy[attribute] for _, accuracy in scores], marker="o",
                     color=f"C{index + 2}", label=attribute)
    axes[2].axhline(80, color="gray", linewidth=0.8, linestyle="--")
    axes[2].set(title="checker on 16 held-out captions", xlabel="transformer steps",
                ylabel="% read right", ylim=(0, 105))
    axes[2].legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100, format=os.path.splitext(path)[1][1:] or "png")
    plt.close(figure)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the plot (.png)")
    parser.add_argument("metrics", nargs="+", help="the calls' metrics.json, in training order")
    args = parser.parse_args(argv)
    vae, runs, scores = read_history(args.metrics)
    plot(vae, runs, scores, args.output)
    for step, accuracy in scores:
        print(f"after step {step}: held-out " + ", ".join(
            f"{attribute} {100 * accuracy[attribute]:.0f}%" for attribute in ATTRIBUTES))


if __name__ == "__main__":
    main()
