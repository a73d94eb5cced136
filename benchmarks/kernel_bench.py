"""Micro-benchmark: fastdit block-sparse attention against dense SDPA, FlexAttention and xformers.

A thin wrapper of :mod:`fastdit.cli.bench` (``fastdit bench``), which documents what is measured, the
targets and the flags; this script benchmarks the checkout it lives in (installed or not) and
writes into ``benchmarks/results`` by default:

    python benchmarks/kernel_bench.py                      # both shapes: ~80 s on an H100
    python benchmarks/kernel_bench.py --smoke              # tiny shapes, any device (CPU: fp32)
    python benchmarks/kernel_bench.py --replot benchmarks/results/kernel_bench_<gpu>_<date>.json

``benchmarks/e2e_bench.py``, ``int8_bench.py`` and ``paro_e2e_bench.py`` import helpers from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# Benchmark the checkout this script lives in, installed or not.
sys.path.insert(0, str(REPO_ROOT))

# The helpers benchmarks/e2e_bench.py, int8_bench.py and paro_e2e_bench.py import from here, and
# the main entry point.
from fastdit.cli.bench import (  # noqa: E402,F401
    BLOCK_SIZE,
    SHAPES,
    SMOKE_SHAPES,
    Shape,
    Timing,
    banded_block_map,
    benchmark_ms,
    collect_metadata,
    describe_error,
    fastdit_backend,
    format_number,
    git_commit,
    main,
    output_stem,
    parse_list,
    random_block_map,
    write_outputs,
)

if __name__ == "__main__":
    sys.exit(main(default_out=REPO_ROOT / "benchmarks" / "results"))
