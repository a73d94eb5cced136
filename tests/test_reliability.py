"""Nothing silent, nothing lost: non-finite generations, partial files, bad inputs, bounded caches."""

import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch

import fastdit
from fastdit import cli, natten
from fastdit.cli import common as clicommon
from fastdit.cli import info as cli_info
from fastdit.files import atomic_path, atomic_write_text
from fastdit.hooks import HookSet, function_hook
from fastdit.kernels import BlockSparsity, block_sparse_attention
from fastdit.layout import LatentGrid, SequenceLayout
from fastdit.methods.base import PLAN_CACHE_SIZE, PlanCache
from fastdit.testing.tiny import build_tiny_wan_pipeline
from fastdit.cli.runner import NonFiniteError, SpeedProbe, frames_to_uint8, run_generation

SMALL = ["--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2"]
SMALL_CALL = dict(prompt="a cat", height=64, width=64, num_frames=9, num_inference_steps=2,
                  guidance_scale=5.0, output_type="np")


@pytest.fixture(scope="module")
def tiny_pipe():
    return build_tiny_wan_pipeline(seed=0)


def _run_cli(argv):
    try:
        return cli.main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def _no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model must not be loaded for a bad command line")

    monkeypatch.setattr("fastdit.testing.tiny.load_pipeline", refuse)


class NaNFromCall:
    """Forward hook making an attention module's output NaN from its ``first``-th call on."""

    def __init__(self, first: int) -> None:
        self.first, self.calls = first, 0

    def __call__(self, module, args, output):
        self.calls += 1
        if self.calls > self.first:
            return output * float("nan")
        return output


# --------------------------------------------------------------------------- non-finite values
def test_non_finite_latents_fail_naming_the_step_and_layer(tiny_pipe, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fastdit's reference path: faster here
    # Two steps with CFG: calls 0, 1 are step 0 (cond, uncond), call 2 is step 1's first.
    # A diffusers ModelHook (as fastdit's own hooks are), so the watch, registered later and
    # outside it, sees the output it made NaN.
    handle = HookSet()
    nan_from_call = NaNFromCall(2)
    handle.add(tiny_pipe.transformer.blocks[1].attn1, "test.nan",
               function_hook(post_forward=lambda module, output: nan_from_call(module, (), output)))
    probe = SpeedProbe(tiny_pipe, torch.device("cpu"))
    try:
        with pytest.raises(NonFiniteError) as info:
            run_generation(tiny_pipe, SMALL_CALL, probe, seed=0, method=fastdit.Dense(block_size=64))
    finally:
        handle.remove()
        probe.remove()
    message = str(info.value)
    assert "denoising step 1 (0-based) of 2" in message, message
    assert "transformer.blocks.1.attn1" in message, message
    # Everything fastdit and the watch installed is gone again.
    assert not hasattr(tiny_pipe.transformer, "_diffusers_hook") or not tiny_pipe.transformer._diffusers_hook.hooks
    assert all(not m._forward_hooks for m in tiny_pipe.transformer.modules())


def test_non_finite_frames_are_an_error_not_a_black_video():
    frames = np.random.default_rng(0).random((3, 4, 4, 3), dtype=np.float32)
    frames[1, 2, 2, 0] = np.nan
    with pytest.raises(NonFiniteError, match="1 non-finite values .* first in frame 1"):
        frames_to_uint8(frames)
    frames[1, 2, 2, 0] = np.inf
    with pytest.raises(NonFiniteError):
        frames_to_uint8(frames)


def test_nan_generation_exits_1_and_keeps_the_previous_video(tmp_path, capsys, monkeypatch):
    from fastdit.testing import tiny

    def nan_pipeline(*args, **kwargs):
        pipe = build_tiny_wan_pipeline(seed=0)
        pipe.transformer.blocks[0].attn1.register_forward_hook(NaNFromCall(0))
        return pipe

    monkeypatch.setattr(tiny, "load_pipeline", nan_pipeline)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "video.mp4"
    out.write_bytes(b"the previous good video")
    assert cli.main(["generate", *SMALL, "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert "non-finite" in err and "denoising step 0" in err and "Traceback" not in err, err
    assert out.read_bytes() == b"the previous good video"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


# --------------------------------------------------------------------------- whole files only
def _partial_writer(marker):
    def write(frames, path, fps):
        with open(path, "wb") as handle:
            handle.write(b"half a video")
        raise marker

    return write


@pytest.mark.parametrize("failure", [OSError("disk full"), KeyboardInterrupt()])
def test_failed_video_write_leaves_the_previous_file_and_no_partial(tmp_path, monkeypatch, failure):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous")
    monkeypatch.setattr(clicommon, "_write_imageio", _partial_writer(failure))
    monkeypatch.setattr(clicommon, "_write_opencv", _partial_writer(OSError("no codec")))
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    with pytest.raises((OSError, KeyboardInterrupt)):
        clicommon.write_video(frames, str(out))
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_video_written_whole_replaces_the_previous_file(tmp_path):
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous")
    clicommon.write_video(np.zeros((3, 16, 16, 3), np.uint8), str(out))
    assert out.read_bytes() != b"previous" and out.stat().st_size > 100
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_text_write_interrupted_midway(tmp_path, monkeypatch):
    import fastdit.files as files

    target = tmp_path / "results.json"
    target.write_text('{"previous": true}')

    class FullDisk:
        def __init__(self, path, mode):
            self.handle = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(target, json.dumps({"new": list(range(100))}))
    assert target.read_text() == '{"previous": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "x.png") as partial:
        assert partial.endswith(".png") and os.path.dirname(partial) == str(tmp_path)
        1 / 0
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_report_plot_failing_midway_keeps_the_previous_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from tests.cli.test_compare import _synthetic_results

    from fastdit.cli import report

    plots = tmp_path / "plots"
    plots.mkdir()
    previous = plots / "psnr_per_frame.png"
    previous.write_bytes(b"previous plot")
    original = Figure.savefig

    def savefig(self, fname, *args, **kwargs):
        if "psnr_per_frame" in os.path.basename(str(fname)):
            with open(fname, "wb") as handle:
                handle.write(b"half")
            raise OSError(28, "No space left on device")
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    with pytest.raises(OSError):
        report.write_report(_synthetic_results(psnr_radial=20.0), tmp_path)
    assert previous.read_bytes() == b"previous plot"
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


# --------------------------------------------------------------------------- public API inputs
@pytest.mark.parametrize(
    "method, needle",
    [(None, "got NoneType None"),
     (fastdit.Radial, r"the class Radial: call it"), (object(), "plan\\(layout, device\\)")],
)
def test_apply_refuses_what_is_not_a_method(tiny_pipe, method, needle):
    before = dict(tiny_pipe.transformer.attn_processors)
    with pytest.raises(TypeError, match=needle):
        fastdit.apply(tiny_pipe, method)
    after = tiny_pipe.transformer.attn_processors
    assert all(after[name] is processor for name, processor in before.items())
    assert not hasattr(tiny_pipe.transformer, "_diffusers_hook") or "fastdit" not in tiny_pipe.transformer._diffusers_hook.hooks
    with pytest.raises(TypeError, match="schedule must be a fastdit.Schedule"):
        fastdit.apply(tiny_pipe, fastdit.Dense(), schedule=3)
    # A method may be given by its registered name (issue 14); an unknown name says which exist.
    with pytest.raises(ValueError, match="unknown method 'not-a-method'; valid methods: dense"):
        fastdit.apply(tiny_pipe, "not-a-method")


def test_head_dim_zero_is_a_clear_error():
    q = torch.zeros(1, 8, 2, 0)
    plan = BlockSparsity.dense(8, 8, 64)
    with pytest.raises(ValueError, match=r"head_dim must be >= 1, got 0"):
        block_sparse_attention(q, q, q, plan)


def test_block_sparsity_validates_its_contents():
    counts = torch.tensor([[[2, 1, 0]]], dtype=torch.int32)
    indices = torch.tensor([[[[0, 2], [1, 0], [0, 0]]]], dtype=torch.int32)
    BlockSparsity(counts, indices, 64, 64, 3)  # valid
    cases = [
        (counts, indices.clone().index_put_((torch.tensor([0]),) * 3 + (torch.tensor([1]),), torch.tensor(3, dtype=torch.int32)),
         r"must lie in \[0, num_kv_blocks=3\).*got 3 at \(batch 0, head 0, query block 0\), slot 1"),
        (counts, torch.where(indices == 0, -1, indices).to(torch.int32), r"got -1"),
        (torch.tensor([[[3, 1, 0]]], dtype=torch.int32), indices, r"kv_counts must lie in \[0, max_kv=2\].*got 3"),
        (torch.tensor([[[2, -1, 0]]], dtype=torch.int32), indices, r"got -1 at \(batch 0, head 0, query block 1\)"),
        (counts, torch.tensor([[[[2, 0], [1, 0], [0, 0]]]], dtype=torch.int32), r"ascending and unique, got \[2, 0\]"),
        (counts, torch.tensor([[[[1, 1], [1, 0], [0, 0]]]], dtype=torch.int32), r"ascending and unique, got \[1, 1\]"),
        (counts, torch.tensor([[[[0, 2], [1, 0], [0, 7]]]], dtype=torch.int32), r"padding entries too"),
    ]
    for bad_counts, bad_indices, needle in cases:
        with pytest.raises(ValueError, match=needle):
            BlockSparsity(bad_counts, bad_indices, 64, 64, 3)
        BlockSparsity(bad_counts, bad_indices, 64, 64, 3, validate=False)  # the caller vouches
    with pytest.raises(TypeError, match="num_kv_blocks must be an int"):
        BlockSparsity(counts, indices, 64, 64, 3.0)


# --------------------------------------------------------------------------- PARO plan files
def _plan_file(tmp_path, rng, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tests.methods.test_paro import make_plan

    path = tmp_path / "plan.safetensors"
    make_plan(rng, SequenceLayout(LatentGrid(2, 6, 10))).save(path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    metadata = json.loads(header["fastdit_paro_plan"])
    edited = edit(metadata)
    text = edited if isinstance(edited, str) else json.dumps(edited)
    path.unlink()
    save_file(tensors, str(path), metadata={"fastdit_paro_plan": text})
    return path


def _without(key):
    return lambda meta: {k: v for k, v in meta.items() if k != key}


def _with(key, value):
    return lambda meta: dict(meta, **{key: value})


@pytest.mark.parametrize(
    "edit, needle",
    [
        (_without("target"), r"metadata 'target' must be .*got nothing \(the key is missing\)"),
        (_with("block_size", 0), r"metadata 'block_size' must be one of \(64, 128\), got 0"),
        (_with("num_heads", "3"), r"metadata 'num_heads' must be an int >= 1, got '3'"),
        (_with("transformer_layers", [2, 0]), r"'transformer_layers' must be a non-empty list"),
        (_with("layout", {"grid": [2, 6]}), r"metadata 'layout' must be"),
        (_with("target", {"density": 3}), r"metadata 'target' must be"),
        (lambda meta: [meta], r"metadata must be a JSON object, got list"),
        (lambda meta: json.dumps(meta)[:-5], r"metadata is not valid JSON"),
    ],
)
def test_edited_paro_plan_files_name_the_file_and_the_problem(tmp_path, rng, edit, needle):
    from fastdit.methods.paro import ParoPlan

    path = _plan_file(tmp_path, rng, edit)
    with pytest.raises(ValueError, match=needle) as info:
        ParoPlan.load(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match=needle):  # through the method and the command line too
        fastdit.PARO(plan=path)


def test_paro_plan_path_that_is_a_directory(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    rc = _run_cli(["generate", "--attention", "paro", "--attention-opt", f"plan={tmp_path}",
                   "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2 and "is a directory, not a plan file" in err and str(tmp_path) in err, err


# --------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "--device", "meta"], "--device must be cpu, cuda or cuda:N"),
        (["generate", "--device", "mps"], "got 'mps'"),
        (["calibrate", "--device", "meta"], "got 'meta'"),
        (["info", "--device", "nonsense"], "got 'nonsense'"),
        (["generate", "--seed", str(2**64)], f"[0, 2**64 - 1], got {2**64}"),
        (["generate", "--seed", "-1"], "[0, 2**64 - 1], got -1"),
        (["compare", "--seed", "0,-1"], "got -1"),
        (["generate", "-o", "x.gif"], "must name an .mp4 file"),
        (["generate", "-o", "noextension"], "'noextension'"),
        (["generate", "-o", "adir.mp4"], "is an existing directory"),
        (["generate", "-o", "/proc/fastdit-test/x.mp4"], "cannot be written"),
        (["generate", "--model", "./models/missing-wan"], "--model path './models/missing-wan' does not exist"),
        (["generate", "--model", "emptydir"], "has no model_index.json"),
        (["calibrate", "--model", "/no/such/wan"], "does not exist"),
        (["calibrate", "-o", "/proc/fastdit-test/p.safetensors"], "cannot be written"),
        (["compare", "-o", "/proc/fastdit-test"], "cannot be written"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_loading(tmp_path, capsys, monkeypatch, argv, needle):
    _no_loading(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir.mp4").mkdir()
    (tmp_path / "emptydir").mkdir()
    rc = _run_cli(argv)
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert needle in err and "Traceback" not in err, err
    assert needle in err.strip().splitlines()[-1], err  # one line (argparse's usage before it)


def test_calibrate_creates_the_output_folder_before_calibrating(tmp_path, monkeypatch):
    def check_folder(*args, **kwargs):
        assert (tmp_path / "new" / "dir").is_dir()
        raise KeyboardInterrupt  # stop here: the folder existed before the model loaded

    monkeypatch.setattr("fastdit.testing.tiny.load_pipeline", check_folder)
    assert cli.main(["calibrate", "-o", str(tmp_path / "new" / "dir" / "p.safetensors")]) == 130
    assert list((tmp_path / "new" / "dir").iterdir()) == []


def test_method_that_does_not_fit_the_model_exits_2(tmp_path, capsys, rng):
    from tests.methods.test_paro import make_plan

    out = tmp_path / "x.mp4"
    # SMALL's latent grid is 3 x 4 x 4: a window of 5 frames cannot fit.
    assert cli.main(["generate", *SMALL, "--attention", "gna", "--attention-opt", "window=5,3,3",
                     "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "latent grid (3, 4, 4)" in err and "window" in err and "Traceback" not in err, err
    plan = make_plan(rng, SequenceLayout(LatentGrid(3, 4, 4)))
    plan.metadata["model_class"] = "HunyuanVideoTransformer3DModel"
    plan.save(tmp_path / "other.safetensors")
    assert cli.main(["generate", *SMALL, "--attention", "paro", "--attention-opt",
                     f"plan={tmp_path / 'other.safetensors'}", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "calibrated on HunyuanVideoTransformer3DModel" in err and "Traceback" not in err, err
    assert not out.exists()


def test_dense_schedule_covering_every_step_or_layer_is_noted(tiny_pipe):
    call = dict(SMALL_CALL)
    notes = clicommon.schedule_notes(fastdit.Schedule(dense_steps=9), tiny_pipe, call, "--attention radial")
    assert notes == ["the dense schedule (dense_steps=9, dense_last_steps=0) covers all 2 steps: "
                     "--attention radial never runs, the whole generation is dense"]
    notes = clicommon.schedule_notes(fastdit.Schedule(dense_steps=1, dense_last_steps=0.5), tiny_pipe, call, "x")
    assert len(notes) == 1 and "covers all 2 steps" in notes[0]
    notes = clicommon.schedule_notes(fastdit.Schedule(dense_layers=1.0), tiny_pipe, call, "x")
    assert notes == ["dense_layers=1.0 covers all 2 self-attention layers: x never runs, the whole "
                     "generation is dense"]
    assert clicommon.schedule_notes(fastdit.Schedule(dense_steps=1, dense_layers=1), tiny_pipe, call, "x") == []
    del call["num_inference_steps"]  # the pipeline's default (50) applies
    assert clicommon.schedule_notes(fastdit.Schedule(dense_steps=9), tiny_pipe, call, "x") == []


def test_debug_shows_the_traceback_and_unexpected_errors_are_one_line(tmp_path, capsys, monkeypatch):
    _no_loading(monkeypatch)
    for argv in (["--debug", "generate", "--device", "meta"], ["generate", "--device", "meta", "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and "--device must be cpu" in err
    monkeypatch.setattr(cli_info, "cmd_info", lambda args: (_ for _ in ()).throw(RuntimeError("boom\nsecond line")))
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: RuntimeError: boom second line (run with --debug for the traceback)"


# --------------------------------------------------------------------------- bounded plan caches
def test_plan_cache_is_bounded_lru_with_canonical_keys():
    cache = PlanCache(max_size=3)
    built = []
    for n in range(5):
        cache.get_or_build(("plan", n, torch.device("cpu")), lambda n=n: built.append(n) or n)
    assert len(cache) == 3 and [key[1] for key in cache.keys()] == [2, 3, 4]
    assert cache.get_or_build(("plan", 2, PlanCache.device(None)), lambda: -1) == 2  # a hit
    cache.get_or_build(("plan", 5, torch.device("cpu")), lambda: 5)
    assert [key[1] for key in cache.keys()] == [4, 2, 5]  # 3 was least recently used
    assert built == [0, 1, 2, 3, 4]
    assert len(copy.deepcopy(cache)) == 0 and pickle.loads(pickle.dumps(cache)).max_size == 3
    with pytest.raises(ValueError, match="max_size must be an int >= 1, got max_size=0"):
        PlanCache(0)


def _method_caches(method):
    """A method's plan caches: its own, or its module's (shared by its configurations)."""
    import sys

    module = vars(sys.modules[type(method).__module__]).values()
    return [value for value in (*vars(method).values(), *module) if isinstance(value, PlanCache)]


def test_every_method_cache_stays_bounded_over_many_shapes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the reference path: the caches are the point
    grids = [LatentGrid(1, 3, 3 + n) for n in range(PLAN_CACHE_SIZE + 8)]
    methods = [fastdit.Dense(block_size=64), fastdit.GNA((1, 3, 3), block_size=64),
               fastdit.Radial(block_size=64),
               fastdit.VMoBA(block_size=64), fastdit.AdaSpa(block_size=64),
               fastdit.Agent(block_size=64)]
    for method in methods:
        for grid in grids:
            method.plan(SequenceLayout(grid))
            if isinstance(method, fastdit.GNA):
                method.resolve_tile(grid)
        caches = _method_caches(method)
        assert caches and all(len(cache) <= PLAN_CACHE_SIZE for cache in caches), method
    x = torch.zeros(1, 4, 1, 8)
    for length in range(4, 4 + PLAN_CACHE_SIZE + 8):
        q = torch.zeros(1, length, 1, 8)
        natten.na1d(q, q, q, kernel_size=3)
    assert len(natten._methods) <= PLAN_CACHE_SIZE
    del x
    copied = copy.deepcopy(methods[1])  # a copied config rebuilds its plans
    assert copied == methods[1] and len(copied._cache) == 0
