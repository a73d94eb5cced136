"""Micro-benchmark: fastdit block-sparse attention against dense SDPA, FlexAttention and xformers.

``fastdit bench`` (:mod:`fastdit.cli.bench`, which documents what is measured, the targets and the
flags) on this checkout, writing into this run's results folder (``benchmarks/results/<gpu>_<date>``):

    python -m benchmarks.kernel_bench                      # both shapes: ~80 s on an H100
    python -m benchmarks.kernel_bench --smoke              # tiny shapes, any device (CPU: fp32)
    python -m benchmarks.kernel_bench --replot benchmarks/results/<gpu>_<date>/kernel_bench_<gpu>_<date>.json
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a file: the imports below need the package (see benchmarks/harness.py)
    sys.exit(f"run it from the repository root as: python -m benchmarks.{Path(__file__).stem}")

from benchmarks.harness import default_out  # noqa: E402
from fastdit.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=default_out()))
