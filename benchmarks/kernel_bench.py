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

if not __package__:  # python benchmarks/<script>.py: run as python -m benchmarks.<script>
    import runpy

    sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout first, as -m has it
    runpy.run_module(f"benchmarks.{Path(__file__).stem}", run_name="__main__", alter_sys=True)
    sys.exit()

from benchmarks.harness import default_out  # noqa: E402
from fastdit.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(default_out=default_out()))
