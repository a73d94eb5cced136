"""``benchmarks/quality_speed.py --smoke`` (the quality table's configurations timed on a tiny Wan on
the CPU) and ``quality_table --speed`` (its CSV merged into the table)."""

import csv
import json

import pytest

import fastdit.methods.paro
from benchmarks import quality_speed, quality_table
from fastdit import AdaSpa, Radial
from fastdit.compose import build_cache_config, parse_cache_spec

ROWS = "dense,dense-bf16,adaspa,radial-14b+taylorseer,paro-d0.3"
STEPS = 6  # AdaSpa searches at 2 (dense + LSE) and 4 (cached LSE); TaylorSeer skips 1, 3, 5


@pytest.fixture(scope="module")
def smoke_csv(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_speed")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "0")  # fastdit's PyTorch reference path: fast on a CPU
        assert quality_speed.main(["--smoke", "--steps", str(STEPS), "--rows", ROWS,
                                   "--out", str(out)]) == 0
    (path,) = out.glob("quality_speed_cpu-smoke_*.csv")
    return path


def test_smoke_rows_are_timed_against_the_stock_baseline(smoke_csv):
    with smoke_csv.open(newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == quality_speed.SPEED_FIELDS
        rows = {row["label"]: row for row in reader}
    assert list(rows) == ["dense", "adaspa", "paro-d0.3", "dense-bf16", "radial-14b+taylorseer"]
    for label in ("dense", "dense-bf16", "adaspa", "radial-14b+taylorseer"):
        row = rows[label]
        assert row["status"] == "ok", row
        assert float(row["ms_generation"]) > 0 and float(row["speedup_vs_cudnn"]) > 0, row
        assert int(row["steps"]) == STEPS
    assert float(rows["dense"]["speedup_vs_cudnn"]) == 1.0
    assert rows["dense-bf16"]["ms_generation"] == rows["dense"]["ms_generation"]
    assert rows["dense-bf16"]["source"].startswith("reused: dense")
    # Each row's whole loop ran too (every row with --smoke): its computed steps and AdaSpa's
    # searches matched the step kinds, else the row would be an error.
    for label in ("dense", "adaspa", "radial-14b+taylorseer"):
        assert rows[label]["source"] == "phases" and float(rows[label]["loop_ms"]) > 0
    assert "1 x search-step" in rows["adaspa"]["recipe"]
    assert "1 x cached-search-step" in rows["adaspa"]["recipe"]
    assert int(rows["adaspa"]["computed_steps"]) == STEPS
    assert int(rows["radial-14b+taylorseer"]["computed_steps"]) == 3
    assert "3 x skip" in rows["radial-14b+taylorseer"]["recipe"]
    # PARO has no plan for this grid: one is calibrated in process on the random-weight model,
    # saved beside the CSV, and the row says so.
    paro = rows["paro-d0.3"]
    assert paro["status"] == "ok" and float(paro["ms_generation"]) > 0, paro
    assert quality_speed.PARO_RANDOM_WEIGHTS in paro["config"]
    assert float(paro["density"]) < 1.0
    plan = fastdit.methods.paro.ParoPlan.load(smoke_csv.parent / "paro_d0.3_random_weights.safetensors")
    assert plan.metadata["target"] == {"density": 0.3}
    assert plan.metadata["calibration"]["collected_steps"] == [0, 2, 3, 5]  # spread over 6 steps
    saved = json.loads(smoke_csv.with_suffix(".json").read_text())
    kinds = saved["kinds"]["adaspa"]["kinds"]
    assert kinds == ["dense-step", "dense-step", "search-step", "sparse-step",
                     "cached-search-step", "sparse-step"]


def test_step_kinds_follow_the_schedule_and_the_cache():
    steps, layers = 20, 30
    assert quality_speed.step_kinds(None, None, steps, layers) == ["stock"] * steps
    preset = Radial.preset("wan2.1-14b", dense_steps=5)
    kinds = quality_speed.step_kinds(preset, None, steps, layers)
    assert kinds == ["dense-step"] * 5 + ["sparse-step"] * 15
    cache = build_cache_config(*parse_cache_spec(quality_table.taylorseer_spec(steps)),
                               num_inference_steps=steps)
    kinds = quality_speed.step_kinds(preset, cache, steps, layers)
    assert [s for s, k in enumerate(kinds) if k == "skip"] == [4, 6, 8, 10, 12, 14, 16, 18]
    assert kinds[:4] == ["dense-step"] * 4 and kinds[5] == "sparse-step"
    # AdaSpa's first search (step 4 of 20) skipped by the cache: it runs at the next computed step.
    kinds = quality_speed.step_kinds(AdaSpa(), cache, steps, layers)
    assert kinds[4] == "skip" and kinds[5] == "search-step"
    assert kinds.count("search-step") == 1 and kinds.count("cached-search-step") == 1
    assert quality_speed.step_kinds(Radial(), build_cache_config("fbc", {}), steps, layers) is None


def test_speed_merges_into_the_quality_table(smoke_csv, tmp_path):
    entry = dict(group="g", note="", quantize=None, cache=None, bf16=False, videos=1, density=1.0,
                 psnr=None, ssim=None, colour=1.0, shape=1.0, motion=1.0, seconds=1.0, method="m")
    table = [dict(entry, label=label) for label in ("dense", "adaspa", "paro-d0.3", "gna-3x9x9")]
    quality_table.write_table_files(table, dict(model="tiny"), {}, str(tmp_path))
    quality_table.main(["--speed", str(smoke_csv), "--out", str(tmp_path)])
    with (tmp_path / "quality_table.csv").open(newline="") as handle:
        merged = {row["label"]: row for row in csv.DictReader(handle)}
    assert float(merged["dense"]["gpu_speedup_vs_cudnn"]) == 1.0
    assert float(merged["adaspa"]["gpu_ms"]) > 0
    assert float(merged["paro-d0.3"]["gpu_ms"]) > 0
    assert merged["paro-d0.3"]["gpu_speed_note"] == "PARO plan calibrated on this random-weight model"
    assert merged["gna-3x9x9"]["gpu_speed_note"] == "not in the speed run"
    markdown = (tmp_path / "quality_table.md").read_text()
    assert "ms / 6-step generation (x stock cuDNN, density there)" in markdown
    assert "(1.00x, 1.000)" in markdown and "— (not in the speed run)" in markdown
    saved = json.loads((tmp_path / "quality_table.json").read_text())
    assert saved["settings"]["gpu_speed"]["steps"] == str(STEPS)
    # Merging again replaces the columns instead of stacking them.
    quality_table.main(["--speed", str(smoke_csv), "--out", str(tmp_path)])
    assert (tmp_path / "quality_table.md").read_text() == markdown


def test_speed_of_several_runs_merges_their_timed_rows(smoke_csv, tmp_path):
    # A second run (dense always runs) fills the rows the first left untimed; the first run's
    # timed rows stay; runs of another GPU or date are refused.
    with smoke_csv.open(newline="") as handle:
        lines = list(csv.DictReader(handle))

    def write(name, rows):
        path = tmp_path / name
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=quality_speed.SPEED_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        return str(path)

    untimed = dict(status="not timed", ms_generation="", reason="not timed: skipped")
    first = write("first.csv", [dict(line, **untimed) if line["label"] == "adaspa" else line
                                for line in lines])
    second = write("second.csv", [dict(line, ms_generation="123.0", speedup_vs_cudnn="2.5")
                                  for line in lines if line["label"] in ("dense", "adaspa")])
    speed = quality_table.read_speed([first, second])
    assert speed["rows"]["adaspa"]["ms_generation"] == "123.0"  # filled by the second run
    assert speed["rows"]["dense"]["ms_generation"] == lines[0]["ms_generation"]  # the first's
    assert speed["rows"]["paro-d0.3"]["ms_generation"] == next(
        line for line in lines if line["label"] == "paro-d0.3")["ms_generation"]
    assert speed["source"] == [first, second]
    other = write("other.csv", [dict(line, gpu="another") for line in lines])
    with pytest.raises(SystemExit, match=r"differs from .* in \['gpu'\]"):
        quality_table.read_speed([first, other])
