"""The packaged trained model (``--model tiny``): loading, defaults, the default-model rule, the CLI
on it (``compare``'s checker column), and the RandomBlocks control plan."""

from __future__ import annotations

import json

import pytest
import torch

from fastdit import cli
from fastdit.layout import LatentGrid, SequenceLayout
from fastdit.testing import embedded
from fastdit.quality.controls import RandomBlocks


def test_packaged_model_loads_offline_with_its_defaults(monkeypatch):
    from diffusers import WanPipeline

    from fastdit.testing.tiny import load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline("tiny")
    assert isinstance(pipe, WanPipeline)
    settings = embedded.trained_settings()
    with open(embedded.EMBEDDED_MODEL_DIR / "fastdit_defaults.json") as handle:
        assert json.load(handle)["prompt"] == settings["prompt"]
    assert embedded.embedded_defaults("tiny") == {
        key: settings[key] for key in embedded.TRAINED_DEFAULTS}
    assert embedded.embedded_prompt("tiny", "x") == settings["prompt"]
    # every file of the folder is package data, and the folder stays within 25 MB
    files = [p for p in embedded.EMBEDDED_MODEL_DIR.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= {".json", ".safetensors"}
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20


def test_default_model_rule(monkeypatch, tmp_path):
    monkeypatch.delenv(embedded.DEFAULT_MODEL_ENV, raising=False)
    assert embedded.default_model() == "tiny"
    assert embedded.is_trained(None) and embedded.is_embedded(None)
    monkeypatch.setattr(embedded, "EMBEDDED_MODEL_DIR", tmp_path / "absent")
    assert embedded.default_model() == "tiny-random"  # a package without its data
    with pytest.raises(OSError, match="model_index.json"):
        embedded.load_trained_pipeline()
    monkeypatch.setenv(embedded.DEFAULT_MODEL_ENV, "tiny")
    assert embedded.default_model() == "tiny"
    monkeypatch.setenv(embedded.DEFAULT_MODEL_ENV, "Wan-AI/Wan2.1")
    with pytest.raises(ValueError, match="FASTDIT_DEFAULT_MODEL must be 'tiny' or 'tiny-random'"):
        embedded.default_model()
    assert not embedded.is_embedded("Wan-AI/Wan2.1") and not embedded.is_trained("tiny-random")
    with pytest.raises(ValueError, match="not an embedded model"):
        embedded.embedded_defaults("Wan-AI/Wan2.1")


def test_compare_on_the_packaged_model_scores_each_video(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path: seconds, not minutes
    out = tmp_path / "report"
    assert cli.main(["compare", "--model", "tiny", "--methods", "radial", "--method-opt",
                     "block_size=64", "--steps", "2", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "checker colour/shape/motion" in stdout
    results = json.loads((out / "results.json").read_text())
    settings = embedded.trained_settings()
    assert results["settings"]["prompts"] == [settings["prompt"]]
    assert (results["settings"]["height"], results["settings"]["num_frames"]) == (
        settings["height"], settings["num_frames"])
    for run in results["runs"]:
        checker = run["videos"][0]["checker"]
        assert set(checker) == {"colour", "shape", "motion"}
        assert run["summary"]["checker"] == {k: float(v) for k, v in checker.items()}
    assert "checker colour/shape/motion" in (out / "report.md").read_text()


def test_random_blocks_plan(rng):
    grid = LatentGrid(frames=9, height=8, width=8)
    layout = SequenceLayout(grid)
    density = float(torch.rand((), generator=rng)) * 0.9 + 0.05
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    plan = RandomBlocks(density=density, block_size=64, seed=seed).plan(layout)
    blocks = 9  # 576 tokens in 64-token blocks
    keep = min(blocks, max(1, round(density * blocks)))
    block_map = plan.sparsity.to_block_map()[0, 0]
    assert block_map.shape == (blocks, blocks)
    assert block_map.sum(dim=1).tolist() == [keep] * blocks
    same = RandomBlocks(density=density, block_size=64, seed=seed).plan(layout)
    assert torch.equal(same.sparsity.to_block_map(), plan.sparsity.to_block_map())
    for bad in (0, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="density must be a number in"):
            RandomBlocks(density=bad)
    with pytest.raises(ValueError, match="block_size must be one of"):
        RandomBlocks(density=0.5, block_size=32)
