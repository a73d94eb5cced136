"""fastdit's benchmark scripts, one per benchmark, sharing :mod:`benchmarks.harness`; run them as
modules from the repository root (``python -m benchmarks.e2e_bench ...``)."""
