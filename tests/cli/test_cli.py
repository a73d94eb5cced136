"""The embedded tiny Wan pipeline and the ``fastdit generate`` command line (CPU, offline)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastdit
from fastdit import cli
from fastdit.cli import common as clicommon
from fastdit.testing.tiny import (
    TINY_DEFAULTS,
    TINY_TRANSFORMER_CONFIG,
    build_tiny_tokenizer,
    build_tiny_wan_pipeline,
    load_pipeline,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_wan_pipeline(seed=0)


def _generate(pipe, seed, **overrides):
    kwargs = dict(height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=5.0)
    kwargs.update(overrides)
    with torch.inference_mode():
        out = pipe(
            "a cat walks on the beach",
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **kwargs,
        )
    return out.frames[0]


def _read_video(path):
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path), format="FFMPEG")
    try:
        frames = [frame for frame in reader]
    finally:
        reader.close()
    return np.stack(frames)


# --------------------------------------------------------------------------- tiny pipeline
def test_tiny_pipeline_components(tiny_pipe):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    assert isinstance(tiny_pipe, WanPipeline)
    config = tiny_pipe.transformer.config
    assert tuple(config.patch_size) == (1, 2, 2)
    assert config.num_layers == TINY_TRANSFORMER_CONFIG["num_layers"] == 2
    assert config.in_channels == tiny_pipe.vae.config.z_dim == 16
    assert config.text_dim == tiny_pipe.text_encoder.config.d_model
    assert len(tiny_pipe.vae.config.latents_mean) == len(tiny_pipe.vae.config.latents_std) == 16
    assert tiny_pipe.vae_scale_factor_temporal == 4 and tiny_pipe.vae_scale_factor_spatial == 8
    assert isinstance(tiny_pipe.scheduler, UniPCMultistepScheduler)
    assert tiny_pipe.scheduler.config.prediction_type == "flow_prediction"
    assert tiny_pipe.text_encoder.config.vocab_size == len(tiny_pipe.tokenizer)


def test_tiny_tokenizer_word_level():
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer("A Cat walks, slowly zzzunknown.").input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id in ids
    assert tokenizer.convert_ids_to_tokens(ids[:4]) == ["a", "cat", "walks", ","]
    padded = tokenizer("a cat", padding="max_length", max_length=8, return_tensors="pt")
    assert padded.input_ids.shape == (1, 8)
    assert padded.attention_mask.sum().item() == 3  # a, cat, </s>


def test_tiny_weights_deterministic():
    a = build_tiny_wan_pipeline(seed=3).transformer.state_dict()
    b = build_tiny_wan_pipeline(seed=3).transformer.state_dict()
    c = build_tiny_wan_pipeline(seed=4).transformer.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_tiny_generation_shape_and_determinism(tiny_pipe):
    first = _generate(tiny_pipe, seed=0)
    assert first.shape == (9, 64, 64, 3)
    assert np.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    assert np.array_equal(first, _generate(tiny_pipe, seed=0))
    assert not np.array_equal(first, _generate(tiny_pipe, seed=1))


def test_load_pipeline_tiny_and_missing_path(monkeypatch, tmp_path):
    assert load_pipeline(None).transformer.config.num_layers == 2
    assert load_pipeline("tiny").vae.config.z_dim == 16
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_pipeline(missing)
    with pytest.raises(OSError, match="model_index.json"):
        load_pipeline(str(tmp_path))  # exists, but is not a diffusers pipeline folder


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize(
    "text, value",
    [
        ("0.2", 0.2),
        ("128", 128),
        ("3,5,5", (3, 5, 5)),
        ("true", True),
        ("False", False),
        ("none", None),
        ("abc", "abc"),
    ],
)
def test_parse_value(text, value):
    assert clicommon.parse_value(text) == value
    assert type(clicommon.parse_value(text)) is type(value)


def test_parse_attention_opts_and_amounts():
    assert clicommon.parse_attention_opts(["decay=0.2", "window=3,5,5", "block-size=64"]) == {
        "decay": 0.2,
        "window": (3, 5, 5),
        "block_size": 64,
    }
    for bad in (["decay"], ["=1"], ["decay="], ["decay=1", "decay=2"]):
        with pytest.raises(clicommon.UsageError):
            clicommon.parse_attention_opts(bad)
    assert clicommon.parse_amount("12") == 12 and isinstance(clicommon.parse_amount("12"), int)
    assert clicommon.parse_amount("0.25") == clicommon.parse_amount("1/4") == 0.25
    for bad in ("1.5", "-1/4", "x", "1/0"):
        with pytest.raises(Exception, match="expected|fraction"):
            clicommon.parse_amount(bad)


def test_build_method_configs():
    radial = clicommon.build_method("radial", {"decay": 0.5, "block_size": 64})
    assert (radial.decay, radial.block_size) == (0.5, 64)
    preset = clicommon.build_method("radial", {}, "wan2.1-14b")
    assert preset.dense_steps > 0
    schedule = clicommon.build_schedule(preset, dense_layers=0.5)
    assert (schedule.dense_steps, schedule.dense_layers) == (preset.dense_steps, 0.5)
    assert clicommon.build_schedule(radial) is None
    gna = clicommon.build_method("gna", {"window": (3, 5, 5)})
    assert gna.window == (3, 5, 5)
    with pytest.raises(clicommon.UsageError, match="window"):
        clicommon.build_method("gna", {})
    with pytest.raises(clicommon.UsageError, match="'nope'.*valid options: decay"):
        clicommon.build_method("radial", {"nope": 1})
    with pytest.raises(clicommon.UsageError, match="'bogus'.*wan2.1-14b"):
        clicommon.build_method("radial", {}, "bogus")
    with pytest.raises(clicommon.UsageError, match="'sparse'.*dense, radial, gna"):
        clicommon.build_method("sparse", {})


# --------------------------------------------------------------------------- command line
def test_help_lists_every_flag_with_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    flags = [
        "--model", "--prompt", "--negative-prompt", "--height", "--width", "--num-frames",
        "--steps", "--guidance-scale", "--seed", "--fps", "--dtype", "--device", "--attention",
        "--attention-opt", "--preset", "--dense-steps", "--dense-layers", "--output", "-o",
    ]  # fmt: skip
    for flag in flags:
        assert f"{flag} " in text or f"{flag}," in text, flag
    for expected in ("default: 16", "default: out.mp4", "default: 96", "default: 160",
                     "default: 17", "default: 4", "default: 5.0", "default: 0)",
                     "bfloat16 on cuda, float32 on cpu", "default: dense", "cuda if available"):
        assert expected in text, expected
    # Every option of generate says what its default is.
    generate = cli.build_parser()._subparsers._group_actions[0].choices["generate"]
    for action in generate._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in action.help, action.option_strings


def test_generate_module_writes_mp4(tmp_path):
    """``python -m fastdit generate`` end to end, in a fresh interpreter."""
    out = tmp_path / "sub" / "out.mp4"
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    env.pop("TRITON_INTERPRET", None)  # CPU tensors take fastdit's reference path: faster here
    result = subprocess.run(
        [sys.executable, "-m", "fastdit", "generate", "-o", str(out), "--steps", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    frames = _read_video(out)
    size = (TINY_DEFAULTS["num_frames"], TINY_DEFAULTS["height"], TINY_DEFAULTS["width"])
    assert frames.shape == (*size, 3)
    for line in ("fastdit generate", "total time", "per step", "x 2 steps", "attention", str(out)):
        assert line in result.stdout, (line, result.stdout)
    assert "Traceback" not in result.stderr


def test_generate_in_process(tmp_path, capsys):
    out = tmp_path / "small.mp4"
    assert cli.main(["generate", *SMALL, "--seed", "1", "--fps", "8", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "9 frames 64x64 px @ 8 fps, seed 1" in stdout
    assert "latent 3x8x8 -> tokens 3x4x4 = 48" in stdout
    assert "in 4 forwards, self-attention" in stdout  # 2 steps x (cond, uncond)
    assert f"output       {out}" in stdout
    assert _read_video(out).shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    "extra, shown",
    [
        (["--attention", "radial", "--attention-opt", "block_size=64", "--dense-layers", "1"],
         "radial(decay=0.2, block_size=64"),
        (["--preset", "distilled-4step", "--attention-opt", "block_size=64"],
         "preset distilled-4step"),
        (["--attention", "gna", "--attention-opt", "window=3,3,3",
          "--attention-opt", "block_size=64"], "gna(window=(3, 3, 3)"),
    ],
)  # fmt: skip
def test_generate_with_sparse_attention(tmp_path, capsys, extra, shown):
    out = tmp_path / "sparse.mp4"
    assert cli.main(["generate", *SMALL, *extra, "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert shown in stdout
    assert "density" in stdout
    assert _read_video(out).shape == (9, 64, 64, 3)


@pytest.mark.parametrize(
    "argv, code, needle",
    [
        (["--attention", "sparse"], 2, "'sparse'"),
        (["--attention-opt", "foo=1"], 2, "'foo'"),
        (["--attention", "radial", "--attention-opt", "decay=-1"], 2, "decay=-1"),
        (["--attention", "radial", "--attention-opt", "nope=3"], 2, "valid options: decay"),
        (["--preset", "bogus"], 2, "'bogus'"),
        (["--attention", "gna"], 2, "window"),
        (["--height", "100"], 2, "height=100"),
        (["--width", "72"], 2, "width=72"),
        (["--num-frames", "10"], 2, "num_frames=10"),
        (["--dense-steps", "1.5"], 2, "'1.5'"),
        (["--steps", "0"], 2, "'0'"),
    ],
)
def test_bad_input_exits_with_message(tmp_path, capsys, argv, code, needle):
    out = tmp_path / "never.mp4"
    try:
        rc = cli.main(["generate", *argv, "-o", str(out)])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == code
    assert "error:" in err and needle in err, err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_model_path_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "models" / "wan-does-not-exist")
    # A path given on the command line that does not exist is bad input (exit 2), found before
    # anything loads.
    assert cli.main(["generate", "--model", missing, "-o", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdit generate: error:") and missing in err and "Traceback" not in err


def test_write_video_falls_back_to_opencv(tmp_path, monkeypatch):
    import cv2

    def broken(*args, **kwargs):
        raise OSError("no ffmpeg here")

    monkeypatch.setattr(clicommon, "_write_imageio", broken)
    frames = np.random.default_rng(0).random((5, 32, 48, 3), dtype=np.float32)
    path = tmp_path / "cv.mp4"
    assert clicommon.write_video(frames, str(path), fps=8) == "opencv (mp4v)"
    capture = cv2.VideoCapture(str(path))
    try:
        count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
        size = (height, int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)))
    finally:
        capture.release()
    assert (count, size) == (5, (32, 48))

    monkeypatch.setattr(clicommon, "_write_opencv", broken)
    with pytest.raises(OSError, match="could not write video"):
        clicommon.write_video(frames, str(tmp_path / "none.mp4"))


def test_info_reports_versions_backends_and_reasons(capsys, monkeypatch):
    from fastdit.cli.main import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out
    assert "block-sparse attention (128 blocks)    -> reference" in out
    assert "triton skipped: tensors are on the CPU and TRITON_INTERPRET=1 is not set" in out
    assert "flash4 skipped: needs a CUDA device, got cpu" in out
    assert "block mass                             -> reference" in out
    assert "WanTransformer3DModel" in out and "radial" in out
    assert "optional packages:" in out and "matplotlib" in out and "lpips" in out
    assert "radial     Radial: decay=0.2, block_size=128" in out
    assert "gna        GNA: window (required)" in out
    assert "presets: wan2.1-14b, hunyuanvideo" in out
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "dense attention                        -> triton" in out
    assert "INT8 attention                         -> triton" in out
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", "0")
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("warp-specialized: no, turned off (FASTDIT_WARP_SPECIALIZE=0)") == 10
    monkeypatch.setenv("FASTDIT_WARP_SPECIALIZE", "1")
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("warp-specialized: its loop (interpreter)") == 7  # 128 blocks, any mode
    assert "warp-specialized: no, needs 128-token query and key blocks" in out
    assert "warp-specialized: no, key padding: the loop reads" in out
    assert "warp-specialized: no, window-mask partial blocks" in out


def test_info_rejects_cuda_without_a_gpu(capsys):
    import torch

    from fastdit.cli.main import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["info", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
