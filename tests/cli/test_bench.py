"""``fastdit bench`` (the kernel micro-benchmark) on the CPU: refusal without --smoke, smoke runs
through the PyTorch reference and Triton's interpreter, outputs, bad arguments, the scripts."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdit import cli

REPO = Path(__file__).resolve().parents[2]
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
TINY = ["bench", "--smoke", "--shapes", "smoke-300", "--min-reps", "1", "--input-sets", "1",
        "--plan-repeats", "1"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")


def _outputs(out: Path):
    (json_path,) = out.glob("kernel_bench_cpu-smoke_*.json")
    saved = json.loads(json_path.read_text())
    with json_path.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return json_path, saved, rows


@no_gpu
def test_bench_refuses_without_a_gpu(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA device" in err and "--smoke" in err
    assert not list(tmp_path.iterdir())


@no_gpu
def test_bench_smoke_reference_path(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    argv = [*TINY, "--masks", "banded,random", "--densities", "0.5",
            "--backends", "fastdit,cudnn,flash,xformers", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out
    json_path, saved, rows = _outputs(tmp_path)
    reasons = saved["metadata"]["fastdit_backends"]["block-sparse attention (128 blocks)"]
    assert reasons["triton"].startswith("tensors are on the CPU")
    assert reasons["flash4"] == "needs a CUDA device, got cpu"
    by_backend = {(r["backend"], r["mask"], r["layout"]): r for r in rows}
    for key in [("fastdit", "dense", "bshd"), ("fastdit", "dense", "bhsd"),
                ("fastdit", "banded", "bshd"), ("fastdit", "random", "bshd")]:
        row = by_backend[key]
        assert row["status"] == "ok", row
        assert float(row["rel_err_vs_ref"]) < 1e-4 and float(row["ms"]) > 0
        assert row["executor"] == "reference"
    assert float(by_backend[("fastdit", "banded", "bshd")]["density"]) < 1
    for backend in ("cudnn", "flash"):
        assert by_backend[(backend, "dense", "bhsd")]["status"] == "skipped"
    xformers = by_backend[("xformers", "dense", "bshd")]
    assert xformers["status"] == "skipped" and "xformers" in xformers["error"]
    assert json_path.with_suffix(".png").exists() == HAS_MATPLOTLIB
    assert "== smoke-300: S=300 H=1 D=32 float32 ==" in stdout and "== targets ==" in stdout
    assert "PASS  smoke-300    all     correctness" in stdout

    # --replot redraws and reprints an earlier run.
    json_path.with_suffix(".png").unlink(missing_ok=True)
    assert cli.main(["bench", "--replot", str(json_path)]) == 0
    assert "== smoke-300" in capsys.readouterr().out
    assert json_path.with_suffix(".png").exists() == HAS_MATPLOTLIB


def test_bench_smoke_triton_interpreter(tmp_path, capsys, monkeypatch):
    """The Triton kernel itself (interpreted on the CPU) through the benchmark."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    argv = [*TINY, "--masks", "banded", "--densities", "0.5", "--backends", "fastdit",
            "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    _, saved, rows = _outputs(tmp_path)
    assert saved["metadata"]["fastdit_backends"]["dense attention"]["triton"] is None
    assert {r["executor"] for r in rows} == {"triton"}  # the kernel ran
    assert [r["status"] for r in rows] == ["ok", "ok", "ok"]
    assert max(float(r["rel_err_vs_ref"]) for r in rows) < 1e-4


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--smoke", "--densities", "2"], "(0, 1]"),
        (["--smoke", "--densities", "x"], "numbers in (0, 1]"),
        (["--smoke", "--shapes", "wan13b-480p"], "unknown ['wan13b-480p']"),
        (["--backends", "cudnn,nope"], "unknown ['nope']"),
        (["--replot", "missing.json"], "no such file"),
        (["--min-reps", "-1"], "'-1'"),
    ],
)
def test_bench_bad_arguments(tmp_path, capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(["bench", *argv, "--out", str(tmp_path / "out")])
    except SystemExit as exc:
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_benchmark_scripts_still_import_and_refuse(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), TRITON_INTERPRET="0")
    for script in ("kernel_bench", "e2e_bench"):
        result = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", "--help"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "--smoke" in result.stdout
    # Run as a file, a script says how to run it instead of failing on an import.
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "e2e_bench.py"), "--help"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "python -m benchmarks.e2e_bench" in result.stderr, result.stderr
    if not torch.cuda.is_available():
        result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_bench"],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "needs a CUDA device" in result.stderr
