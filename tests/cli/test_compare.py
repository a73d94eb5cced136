"""``fastdit compare`` on the embedded tiny model (CPU, offline): report contents, parsing, errors."""

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastdit
from fastdit import cli
from fastdit.cli import common as clicommon
from fastdit.cli import compare, report
from fastdit.kernels import block_sparse_attention
from fastdit.layout import LatentGrid, SequenceLayout

SMALL = ["--height", "64", "--width", "128", "--num-frames", "9", "--steps", "2"]
# 64 x 128 px, 9 frames -> latent 3 x 8 x 16 -> tokens 3 x 4 x 8 = 96: two 64-token blocks, so
# GNA's plan below is sparse (density 0.5).
SMALL_LAYOUT = SequenceLayout(LatentGrid(3, 4, 8))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@dataclass(frozen=True)
class RecordingDense(fastdit.methods.Method):
    """A stand-in for a per-call method registered by another branch: dense plan, ``attend`` on
    fastdit's kernel, and a runtime whose ``records`` the report must carry as ``extra``."""

    block_size: int = 64

    def plan(self, layout, device=None):
        return fastdit.Dense(self.block_size).plan(layout, device)

    def new_runtime(self):
        return SimpleNamespace(records=[])

    def attend(self, query, key, value, call):
        call.runtime.records.append(
            {"layer": call.layer, "step": call.step, "context": call.context}
        )
        out = block_sparse_attention(query, key, value, call.plan.sparsity)
        return out, call.plan.density


@dataclass(frozen=True)
class PlanFileMethod(fastdit.methods.Method):
    """A method whose option names a plan file that must exist."""

    plan_file: str

    def __post_init__(self):
        if not os.path.isfile(self.plan_file):
            raise FileNotFoundError(f"plan file {self.plan_file!r} does not exist")


@pytest.fixture
def register_method():
    """``register_method(name, cls)`` registers a test method for one test."""
    names = []

    def register(name, cls):
        fastdit.methods.register(cls, name)
        names.append(name)

    yield register
    for name in names:
        fastdit.methods.unregister(name)


def _args(*argv):
    return cli.build_parser().parse_args(["compare", *argv])


def _strict_json(path):
    def reject(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=reject)


# --------------------------------------------------------------------------- end to end
def test_compare_end_to_end_writes_the_report(tmp_path, capsys, monkeypatch, register_method):
    """Dense + GNA + a registered per-call method, against a reference directory too."""
    register_method("recorder", RecordingDense)
    # CPU tensors take fastdit's PyTorch reference path (the kernels have their own tests).
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reference_dir = tmp_path / "reference"
    noise = np.random.default_rng(0).integers(0, 256, size=(9, 64, 128, 3), dtype=np.uint8)
    clicommon.write_video(noise, str(reference_dir / "p0_s0.mp4"), fps=8)
    out = tmp_path / "report"
    argv = ["compare", *SMALL, "--warmup", "0", "--methods", "g=gna,rec=recorder",
            "--method-opt", "g:window=1,3,3", "--method-opt", "g:block_size=64",
            "--prompt", "a cat walks on the beach", "--reference-dir", str(reference_dir),
            "-o", str(out)]
    assert cli.main(argv) == 0
    stdout = capsys.readouterr().out

    # ---- the files
    labels = ["dense", "g", "rec"]
    for label in labels:
        assert compare.read_video(str(out / "videos" / label / "p0_s0.mp4")).shape == (9, 64, 128, 3)
    grid = compare.read_video(str(out / "grid" / "p0_s0.mp4"))
    assert grid.shape[0] == 9 and grid.shape[2] == 3 * 128 and grid.shape[1] > 64
    for name in ("report.md", "report.html", "results.json"):
        assert (out / name).stat().st_size > 0
    plots = sorted(p.name for p in (out / "plots").glob("*.png")) if HAS_MATPLOTLIB else []
    if HAS_MATPLOTLIB:
        assert plots == ["density.png", "psnr_per_frame.png", "speedup_vs_psnr.png",
                         "time_breakdown.png"]
        for plot in plots:
            assert (out / "plots" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # ---- results.json
    results = _strict_json(out / "results.json")
    assert results["schema"] == "fastdit-compare/1" and results["reference"] == "dense"
    assert [run["label"] for run in results["runs"]] == labels
    assert [run["method"] for run in results["runs"]] == ["stock", "gna", "recorder"]
    settings = results["settings"]
    assert (settings["height"], settings["width"], settings["num_frames"]) == (64, 128, 9)
    assert settings["num_inference_steps"] == 2 and settings["seeds"] == [0] and settings["tiny"]
    assert results["lpips"]["available"] is (results["lpips"]["reason"] is None)
    if not results["lpips"]["available"]:
        assert any(n.startswith("LPIPS skipped") for n in results["notices"])
    assert sorted(results["files"]["plots"]) == [f"plots/{p}" for p in plots]

    gna_density = fastdit.GNA(window=(1, 3, 3), block_size=64).plan(SMALL_LAYOUT, "cpu").density
    assert gna_density == 0.5
    for run in results["runs"]:
        (video,) = run["videos"]
        speed = video["speed"]
        assert len(speed["step_s"]) == 2 and speed["transformer_calls"] == 4  # 2 steps x CFG
        assert 0 < speed["transformer_s"] < speed["run_s"]
        assert 0 < speed["self_attention_share"] <= speed["attention_share"] <= 1
        assert speed["peak_memory_bytes"] is None  # CPU
        assert video["file"] == f"videos/{run['label']}/p0_s0.mp4"
        other = video["quality_vs_reference_dir"]
        assert other["psnr"] < 20 and other["ssim"] < 0.5  # against pure noise
        if run["label"] == "dense":
            assert video["quality"] is None and video["densities"] == []
            assert run["summary"]["speedup_e2e"] == 1.0
            continue
        quality = video["quality"]
        assert len(quality["psnr_per_frame"]) == len(quality["ssim_per_frame"]) == 9
        finite = [p for p in quality["psnr_per_frame"] if p != "inf"]
        mse = [255.0**2 / 10 ** (p / 10) for p in finite] + [0.0] * (9 - len(finite))
        # The video PSNR is that of the mean MSE over frames.
        assert quality["psnr"] == pytest.approx(10 * math.log10(255.0**2 / np.mean(mse)))
        assert 0 < quality["ssim"] <= 1
        assert quality["ssim"] == pytest.approx(np.mean(quality["ssim_per_frame"]))
        assert run["summary"]["psnr"] == quality["psnr"]
        layers_steps = {(layer, step) for layer, step, _ in video["densities"]}
        assert layers_steps == {(0, 0), (0, 1), (1, 0), (1, 1)}
        expected = gna_density if run["label"] == "g" else 1.0
        assert all(d == pytest.approx(expected) for _, _, d in video["densities"])
        assert run["summary"]["density"]["layers"] == [0, 1]
        assert run["summary"]["density"]["steps"] == [0, 1]
        assert run["summary"]["mean_density"] == pytest.approx(expected)
        assert run["summary"]["speedup_e2e"] == pytest.approx(
            results["runs"][0]["summary"]["run_s"] / run["summary"]["run_s"])
    gna = results["runs"][1]
    assert gna["config"]["window"] == [1, 3, 3] and gna["config"]["block_size"] == 64
    assert gna["class"] == "GNA" and gna["videos"][0]["extra"] is None
    records = results["runs"][2]["videos"][0]["extra"]
    # The last generation's calls: 2 layers x 2 steps x (cond, uncond).
    assert len(records) == 8
    assert {(r["layer"], r["step"], r["context"]) for r in records} == {
        (layer, step, context) for layer in (0, 1) for step in (0, 1)
        for context in ("cond", "uncond")
    }

    # ---- the documents
    markdown = (out / "report.md").read_text()
    for needle in ("| run | method | end-to-end", "| g | gna |", "| rec | recorder |",
                   "grid/p0_s0.mp4", "random weights", "PSNR vs ref dir"):
        assert needle in markdown, needle
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots)
    assert page.count("<img") == len(plots) and "src='plots/" not in page  # embedded, not linked
    assert "<code>g</code>: gna(window=(1, 3, 3)" in page and "<table>" in page
    assert "end-to-end" in stdout and "rec " in stdout and "wrote" in stdout


# --------------------------------------------------------------------------- method entries
def test_default_entries_and_options():
    entries = compare.parse_method_entries(_args())
    assert [(e.label, e.name) for e in entries] == [("radial", "radial"), ("gna", "gna")]
    assert entries[1].method.window == compare.DEFAULT_METHOD_OPTIONS["gna"]["window"]
    assert entries[0].schedule is None

    entries = compare.parse_method_entries(_args(
        "--methods", "radial,g7=gna,dense", "--method-opt", "g7:window=3,3,5",
        "--method-opt", "radial:decay=0.5", "--preset", "radial:distilled-4step",
        "--dense-layers", "1"))
    assert [e.label for e in entries] == ["radial", "g7", "fastdit-dense"]
    radial, g7, dense = entries
    assert radial.method.decay == 0.5 and radial.preset == "distilled-4step"
    assert radial.schedule.dense_steps == fastdit.Radial.preset("distilled-4step").dense_steps
    assert radial.schedule.dense_layers == 1 and g7.schedule.dense_layers == 1
    assert g7.method.window == (3, 3, 5)
    assert isinstance(dense.method, fastdit.Dense) and dense.schedule is None

    # One method: options and presets need no label.
    (only,) = compare.parse_method_entries(_args("--methods", "radial", "--method-opt",
                                                 "block_size=64", "--preset", "wan2.1-14b"))
    assert only.method.block_size == 64 and only.preset == "wan2.1-14b"


def test_config_file_entries(tmp_path):
    config = tmp_path / "methods.json"
    config.write_text(json.dumps({"methods": [
        {"method": "gna", "label": "wide", "options": {"window": [1, 5, 5], "block_size": 64},
         "dense_steps": 1},
        {"method": "radial", "preset": "wan2.1-14b"},
    ]}))
    entries = compare.parse_method_entries(_args("--config", str(config), "--methods", "radial2=radial",
                                                 "--dense-layers", "0.5"))
    assert [e.label for e in entries] == ["wide", "radial", "radial2"]
    wide, radial, _ = entries
    assert wide.method.window == (1, 5, 5) and wide.method.block_size == 64
    assert (wide.schedule.dense_steps, wide.schedule.dense_layers) == (1, 0.5)
    assert radial.schedule.dense_steps == fastdit.Radial.preset("wan2.1-14b").dense_steps
    # --config alone: no default entries are added.
    assert len(compare.parse_method_entries(_args("--config", str(config)))) == 2


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"methods": []}', "at least one entry"),
        ('{"methods": [{"label": "x"}]}', '"method" key'),
        ('{"methods": [{"method": "radial", "window": 3}]}', "unknown keys ['window']"),
        ('{"methods": [{"method": "nope"}]}', "unknown method 'nope'"),
        ('{"methods": [{"method": "radial", "options": {"decay": "x"}}]}', "decay"),
        ('{"methods": [{"method": "radial", "dense_steps": "2"}]}', "dense_steps"),
        ('{"other": 1}', "unknown top-level keys"),
    ],
)
def test_bad_config_files(tmp_path, content, needle):
    config = tmp_path / "bad.json"
    config.write_text(content)
    with pytest.raises(clicommon.UsageError, match=None) as info:
        compare.parse_method_entries(_args("--config", str(config)))
    assert needle in str(info.value) and str(config) in str(info.value)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "sparse"], "unknown method 'sparse'"),
        (["--methods", "radial", "--method-opt", "radial:nope=1"], "'nope'"),
        (["--methods", "radial", "--method-opt", "radial:decay=-1"], "decay=-1"),
        (["--methods", "gna"], "requires --method-opt window=..."),
        (["--methods", "radial,radial"], "used twice"),
        (["--methods", "a b=radial"], "label 'a b'"),
        (["--methods", "dense=radial"], "stock dense reference"),
        (["--methods", "radial,gna", "--method-opt", "window=3,3,3"], "LABEL:"),
        (["--method-opt", "g7:window=1,3,3"], "no method labelled 'g7'"),
        (["--method-opt", "gna:window"], "[LABEL:]KEY=VALUE"),
        (["--method-opt", "radial:decay=1", "--method-opt", "radial:decay=2"],
         "radial:decay is given more than once"),
        (["--preset", "bogus"], "unknown radial preset 'bogus'"),
        (["--methods", "gna", "--method-opt", "window=1,3,3", "--preset", "gna:x"],
         "has no presets"),
        (["--methods", "gna,g=gna", "--preset", "x"], "0 compared methods have presets"),
        (["--config", "missing.json"], "no such file"),
        (["--prompts-file", "missing.txt"], "no such file"),
        (["--reference-dir", "missing-dir"], "no such directory"),
        (["--height", "100"], "height=100"),
        (["--num-frames", "10"], "num_frames=10"),
        (["--compile"], "--compile is GPU-only"),
        (["--cpu-offload"], "--cpu-offload is GPU-only"),
        (["--warmup", "-1"], "--warmup must be >= 0"),
        (["--dense-steps", "-2"], "dense_steps=-2"),
        (["--seed", "x"], "'x'"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "nope"],
         "cuda" if not torch.cuda.is_available() else "nope"),
    ],
)
def test_bad_input_exits_2_before_loading(tmp_path, capsys, monkeypatch, argv, needle):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command line")

    monkeypatch.setattr("fastdit.testing.tiny.load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "never"
    try:
        rc = cli.main(["compare", *argv, "-o", str(out)])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2
    assert "error:" in err and needle in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_reference_video_and_empty_prompts_file(tmp_path, capsys):
    (tmp_path / "ref").mkdir()
    clicommon.write_video(np.zeros((5, 16, 16, 3), np.uint8), str(tmp_path / "ref" / "p0_s0.mp4"))
    assert cli.main(["compare", "--seed", "0,1", "--reference-dir", str(tmp_path / "ref"),
                     "-o", str(tmp_path / "out")]) == 2
    assert "missing p0_s1.mp4" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# only a comment\n\n")
    assert cli.main(["compare", "--prompts-file", str(prompts), "-o", str(tmp_path / "o")]) == 2
    assert "holds no prompt" in capsys.readouterr().err


def test_prompts_and_seeds(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs\n# skipped\n\n  a cat sits  \n")
    args = _args("--prompt", "a bird flies", "--prompts-file", str(prompts), "--seed", "3,1",
                 "--seeds", "1", "--seed", "7")
    assert compare._prompts(args) == ["a bird flies", "a dog runs", "a cat sits"]
    assert compare._seeds(args) == [3, 1, 7]
    assert compare._prompts(_args()) == [clicommon.DEFAULT_PROMPT]
    assert compare._seeds(_args()) == [clicommon.DEFAULT_SEED]


def test_missing_plan_file_of_a_registered_method(tmp_path, capsys, register_method):
    register_method("planned", PlanFileMethod)
    missing = str(tmp_path / "plans" / "wan.pt")
    for argv in (["compare", "--methods", "planned", "--method-opt", f"plan_file={missing}",
                  "-o", str(tmp_path / "out")],
                 ["generate", "--attention", "planned", "--attention-opt", f"plan_file={missing}",
                  "-o", str(tmp_path / "x.mp4")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and missing in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["compare", "generate"])
def test_unsupported_model_class_exits_2(tmp_path, capsys, monkeypatch, command):
    fake = SimpleNamespace(transformer=torch.nn.Linear(2, 2))
    monkeypatch.setattr("fastdit.testing.tiny.load_pipeline", lambda *a, **k: fake)
    assert cli.main([command, "-o", str(tmp_path / ("x.mp4" if command == "generate" else "x"))]) == 2
    err = capsys.readouterr().err
    assert "unsupported model" in err and "Linear" in err and "WanTransformer3DModel" in err


def test_generate_gpu_only_options_on_cpu(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for flag in ("--compile", "--cpu-offload"):
        assert cli.main(["generate", flag, "-o", str(tmp_path / "x.mp4")]) == 2
        assert f"{flag} is GPU-only" in capsys.readouterr().err


def test_help_documents_every_flag_with_its_default(capsys):
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name in ("generate", "compare", "bench", "info"):
        for action in subparsers[name]._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or ""), (name, action.option_strings)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--help"])
    assert exit_info.value.code == 0
    # argparse wraps lines after hyphens too ("compare-" / "report"): join those back.
    text = re.sub(r"-\s+", "-", " ".join(capsys.readouterr().out.split()))
    for flag in ("--methods", "--method-opt", "--preset", "--config", "--prompts-file",
                 "--seed", "--output-dir", "--reference-dir", "--warmup", "--no-lpips",
                 "--compile", "--cpu-offload", "--model", "--steps", "--dtype", "--device"):
        assert flag in text, flag
    for expected in ("default: radial,gna", "gna:window=1,5,5", "default: compare-report",
                     "default: 1)", "default: 0)"):
        assert expected in text, expected


# --------------------------------------------------------------------------- pieces
def test_compose_grid_places_videos_under_labels(rng):
    gen = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))
    videos = [gen.integers(0, 256, size=(4 + i, 20, 30, 3), dtype=np.uint8) for i in range(5)]
    grid = compare.compose_grid(videos, [[f"m{i}", "PSNR 30.0 dB"] for i in range(5)], columns=2)
    bar = grid.shape[1] // 3 - 20
    assert grid.shape == (4, 3 * (bar + 20), 2 * 30, 3) and bar >= 28
    for index, video in enumerate(videos):
        row, column = divmod(index, 2)
        top, left = row * (bar + 20), column * 30
        np.testing.assert_array_equal(grid[:, top + bar : top + bar + 20, left : left + 30],
                                      video[:4])
        label = grid[0, top : top + bar, left : left + 30]
        assert (label == 24).mean() > 0.5 and label.max() > 200  # dark bar, white text
    assert not grid[:, 2 * (bar + 20) :, 30:].any()  # the empty sixth cell
    with pytest.raises(ValueError, match="share a size"):
        compare.compose_grid([videos[0], videos[1][:, :10]], [["a"], ["b"]])


def test_json_safe():
    value = {"a": (1, np.float32(2.5)), 3: [math.inf, -math.inf, float("nan")],
             "t": torch.tensor([1.0, 2.0]), "n": np.arange(2), "none": None}
    assert compare.json_safe(value) == {"a": [1, 2.5], "3": ["inf", "-inf", "nan"],
                                        "t": [1.0, 2.0], "n": [0, 1], "none": None}
    with pytest.raises(TypeError, match="object"):
        compare.json_safe({"x": object()})


def _synthetic_results(psnr_radial="inf"):
    def video(label, psnr, frames=3):
        quality = None if psnr is None else {
            "psnr": psnr, "ssim": 1.0 if psnr == "inf" else 0.9, "lpips": None,
            "psnr_per_frame": [psnr] * frames, "ssim_per_frame": [0.9] * frames,
            "lpips_per_frame": None}
        return {"prompt_index": 0, "prompt": "p", "seed": 0, "file": f"videos/{label}/p0_s0.mp4",
                "frames": frames, "height": 16, "width": 16,
                "speed": {"run_s": 2.0, "transformer_s": 1.0},
                "quality": quality, "quality_vs_reference_dir": None, "densities": [],
                "extra": None}

    def run(label, method, psnr, density):
        return {
            "label": label, "method": method, "description": f"{label} run",
            "videos": [video(label, psnr)],
            "summary": {"run_s": 2.0, "denoise_s": 1.5, "step_s": 0.5, "transformer_s": 1.0,
                        "self_attention_share": 0.5, "attention_share": 0.6,
                        "peak_memory_bytes": None, "speedup_e2e": 1.25,
                        "speedup_transformer": 1.5, "speedup_denoise": 1.4, "psnr": psnr,
                        "ssim": 0.9, "lpips": None, "mean_density": density,
                        "density": None if density is None else {
                            "layers": [0, 1], "steps": [0, 1, None],
                            "values": [[density, density, None], [1.0, density, density]]}},
        }

    return {
        "schema": compare.SCHEMA, "created": "2026-01-01T00:00:00",
        "environment": {"fastdit": "0", "torch": "t", "triton": "x", "diffusers": "d",
                        "device": "cpu", "gpu": None, "cuda": None},
        "settings": {"model": None, "pipeline": "WanPipeline", "transformer": "Wan", "dtype": "f",
                     "height": 16, "width": 16, "num_frames": 3, "num_inference_steps": 2,
                     "guidance_scale": None, "compile": False, "cpu_offload": False,
                     "prompts": ["p"], "seeds": [0], "warmup": 0, "reference_dir": None},
        "notices": ["a notice"], "grids": ["grid/p0_s0.mp4"],
        "runs": [run("dense", "stock", None, None), run("radial", "radial", psnr_radial, 0.4),
                 run("gna", "gna", 31.5, 0.3)],
    }


def test_report_renders_inf_and_plots(tmp_path):
    results = _synthetic_results()
    written = report.write_report(results, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    assert "| radial | radial | 2.00 s | 1.25x | 500 ms | 1.00 s | 1.50x | 50% | 0.400 | n/a | inf |" in markdown
    assert "| gna | gna |" in markdown and "| 31.50 |" in markdown
    table = report.format_summary_table(results)
    assert table.splitlines()[0].startswith("run") and "inf" in table
    page = (tmp_path / "report.html").read_text()
    if HAS_MATPLOTLIB:
        assert [p.name for p in written["plots"]] == [f"{n}.png" for n in report.PLOT_NAMES]
        assert page.count("data:image/png;base64,") == 4 and written["notices"] == []
    assert "a notice" in page and "a notice" in markdown


def test_report_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "agg_pyplot", lambda: None)
    written = report.write_report(_synthetic_results(psnr_radial=20.0), tmp_path)
    assert written["plots"] == [] and "matplotlib is not installed" in written["notices"][0]
    assert not (tmp_path / "plots").exists()
    assert "matplotlib is not installed" in (tmp_path / "report.md").read_text()
    assert "data:image/png" not in (tmp_path / "report.html").read_text()
