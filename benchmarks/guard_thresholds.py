"""The numbers behind the CI quality guard's thresholds (``tests/quality/test_quality_trained.py``).

    python -m benchmarks.guard_thresholds --seeds 1000-1016        # about 20 s a seed, quiet CPU

For each seed it runs exactly what the guard runs once (the dense generation on the packaged
model, then each method and ``RANDOM_PLANS`` random-block plans at the method's density, every
transformer call on the dense trajectory) and records the per-call prediction SNR of the method
and of its random control (the plans' mean, as the guard compares; each plan's value too). It appends one JSON line per (seed, method) to ``--out``/guard_rows.jsonl (so an
interrupted run keeps its seeds and a second run adds to them) and prints, per method, what the
test's comment quotes: SNR min / mean (sd), the random control's max, and the gap min / mean
(sd). Thresholds are then chosen by hand: ``MIN_SNR_DB`` below every SNR and above every random
control, ``MARGIN_DB`` below every gap, each several standard deviations from the mean.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

import numpy as np
import torch

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit("run it from the repository root as: python -m benchmarks.guard_thresholds")

from benchmarks.harness import default_out  # noqa: E402


def parse_seeds(text: str) -> list[int]:
    """``1000-1016`` or ``1,5,9`` (or both, comma-separated)."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    return seeds


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method: SNR min/mean/sd, random control max/mean, gap min/mean/sd, seeds, density."""
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["name"]].append(row)
    summary = {}
    for name, method_rows in sorted(by_method.items()):
        snr = np.array([row["snr"] for row in method_rows])
        control = np.array([row["random"] for row in method_rows])
        gap = snr - control
        sd = (lambda x: float(x.std(ddof=1)) if len(x) > 1 else float("nan"))
        summary[name] = dict(
            seeds=len(method_rows), density=float(np.mean([row["density"] for row in method_rows])),
            snr_min=float(snr.min()), snr_mean=float(snr.mean()), snr_sd=sd(snr),
            random_max=float(control.max()), random_mean=float(control.mean()),
            gap_min=float(gap.min()), gap_mean=float(gap.mean()), gap_sd=sd(gap),
        )
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1000-1016", help="e.g. 1000-1016 or 1,2,3")
    parser.add_argument("--out", default=str(default_out() / "guard_thresholds"),
                        help="results folder (default: benchmarks/results/<gpu>_<date>/"
                        "guard_thresholds)")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # the guard's path: fastdit's PyTorch reference
    import tests.quality.test_quality_trained as guard
    from fastdit.testing.tiny import load_pipeline

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "guard_rows.jsonl")
    pipe = load_pipeline("tiny", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for seed in parse_seeds(args.seeds):
        start = time.time()
        dense = guard._predictions(pipe, seed)[0]
        for name in sorted(guard.METHODS):
            method = guard.METHODS[name]()
            predictions, densities = guard._predictions(pipe, seed, method, forced=dense)
            calls = guard._sparse_calls(method, densities, len(dense))
            density = guard._sparse_density(method, densities)
            controls = guard.random_control_snrs(pipe, seed, dense, method, density, calls)
            row = dict(seed=seed, name=name, density=density,
                       snr=guard.snr_db(dense, predictions, calls),
                       random=float(np.mean(controls)), random_plans=controls)
            with open(path, "a") as f:  # one line at a time: an interrupted run keeps its rows
                f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: {time.time() - start:.0f} s", flush=True)
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for name, s in summarize(rows).items():
        print(f"{name:7s} ({s['seeds']} seeds, density {s['density']:.3f}): SNR {s['snr_min']:.2f} / "
              f"{s['snr_mean']:.2f} ({s['snr_sd']:.2f}); random max {s['random_max']:.2f}; gap "
              f"{s['gap_min']:.2f} / {s['gap_mean']:.2f} ({s['gap_sd']:.2f})")


if __name__ == "__main__":
    main()
