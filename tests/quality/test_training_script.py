"""The tiny model's training script (training/train_tiny_wan.py): its VAE crops and loss weights
follow the rendered object, its stage arguments are checked, its training step's prompt path
matches the pipeline's, and --resume-from continues an exported pipeline exactly (weights, latent
normalisation, the training record), refusing other sizes."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from fastdit.quality import render, sample_specs

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "train_tiny_wan.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_tiny_wan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_object_box_covers_the_rendered_object(train, rng):
    specs = sample_specs(6, seed=int(torch.randint(2**31, (1,), generator=rng)))
    video, tracks = render(specs, 5, 64, 80, generator=torch.Generator().manual_seed(1),
                           return_tracks=True)
    # The object's pixels: where the video differs from the same clips rendered without it is not
    # available, so use the colour: object pixels have the caption's colour exactly.
    from fastdit.quality.clips import COLOURS

    box = train._object_box(tracks, 64, 80)
    for i, spec in enumerate(specs):
        colour = torch.tensor(COLOURS[spec.colour])
        inside = (video[i] - colour).abs().amax(-1) < 1e-4  # (F, H, W) fully covered pixels
        assert inside.any()
        assert box[i][inside].all(), f"object pixels outside the box in clip {i} ({spec.caption})"
        # and the box is not the whole frame: it is about 2.6 half-sizes wide
        assert box[i].float().mean() < 0.6


def test_vae_crops_centre_on_the_object_and_carry_its_weight(train, rng):
    specs = sample_specs(8, seed=int(torch.randint(2**31, (1,), generator=rng)))
    frames, height, width, crop = 5, 96, 96, 32
    clips, tracks = train._clips(specs, frames, height, width, torch.Generator().manual_seed(2),
                                 "cpu", return_tracks=True)
    sizes = train.Sizes(vae_frames=frames, height=height, width=width, vae_crop=crop)

    class Args:
        vae_object_crops = 1.0
        vae_object_weight = 5.0

    crops, weights = train._vae_crops(clips, tracks, sizes, Args, torch.Generator().manual_seed(
        int(torch.randint(2**31, (1,), generator=rng))))
    assert crops.shape == (8, 3, frames, crop, crop) and weights.shape == (8, frames, crop, crop)
    assert set(weights.unique().tolist()) <= {1.0, 5.0}
    # every crop is centred on the object in some frame: its weight shows part of the object box
    assert (weights == 5.0).flatten(1).any(1).all()
    # each crop is a window of its clip
    box = train._object_box(tracks, height, width)
    for i in range(8):
        found = False
        for top in range(height - crop + 1):
            for left in range(width - crop + 1):
                if torch.equal(clips[i, :, :, top:top + crop, left:left + crop], crops[i]):
                    expected = 1 + 4 * box[i, :, top:top + crop, left:left + crop].float()
                    found = torch.equal(weights[i], expected)
                    break
            if found:
                break
        assert found, f"crop {i} is not a window of its clip with its weights"


def test_stage_arguments(train, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--stage", "dit"])  # no --vae-from
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--vae-from", str(tmp_path)])  # not --stage dit
    args = train.parse_args(["--out", str(tmp_path), "--stage", "dit", "--vae-from", str(tmp_path)])
    assert args.stage == "dit" and args.vae_from == str(tmp_path)


def test_smoke_budgets_yield_to_the_command_line(train, tmp_path):
    args = train.parse_args(["--out", str(tmp_path), "--smoke", "--dit-seconds", "3"])
    assert args.dit_seconds == 3 and args.pool_seconds == train.SMOKE_DEFAULTS["pool_seconds"]
    for argv in (["--resume-from", str(tmp_path)],  # not --stage dit
                 ["--stage", "dit", "--resume-from", str(tmp_path), "--vae-from", str(tmp_path)]):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", str(tmp_path), *argv])
    args = train.parse_args(["--out", str(tmp_path), "--stage", "dit", "--resume-from",
                             str(tmp_path)])
    assert args.resume_from == str(tmp_path) and args.vae_from is None


def _fresh_pipeline(train, seed, sizes=None):
    torch.manual_seed(seed)
    return train.build_pipeline(sizes or train.SMOKE_SIZES, "cpu")


def test_prepared_prompt_tokens_encode_as_the_pipeline_does(train, rng):
    """The training step's prompt path (tokens prepared once, encoder on the captions' length,
    zeros after) gives what WanPipeline._get_t5_prompt_embeds gives."""
    seed = int(torch.randint(2**31, (1,), generator=rng))
    pipe = _fresh_pipeline(train, seed)
    captions = [spec.caption for spec in sample_specs(5, seed=seed)] + [""]
    ids, mask = train._tokenize(pipe.tokenizer, captions, "cpu")
    length = ids.shape[1]
    assert length == int(mask.sum(1).max()) < train.TEXT_LENGTH
    with torch.no_grad():
        ours = train._encode_tokens(pipe.text_encoder, ids, mask)
        theirs = pipe._get_t5_prompt_embeds(captions, max_sequence_length=512, device="cpu")
        assert ours.shape == theirs.shape == (6, 512, train.SMOKE_SIZES.text_dim)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
        assert not ours[:, length:].any() and (ours[:-1, 1].abs().sum(-1) > 0).all()


class _Log:
    start = 0.0

    def __call__(self, message):
        pass


@pytest.fixture(scope="module")
def exported(train, tmp_path_factory):
    """A --smoke-size pipeline with random weights and latent statistics, exported by the script
    with a training record of one run: (folder, the in-memory pipeline it was saved from)."""
    import os

    seed = int.from_bytes(os.urandom(4), "little")
    print(f"exported seed={seed}")
    pipe = _fresh_pipeline(train, seed)
    generator = torch.Generator().manual_seed(seed)
    z_dim = train.SMOKE_SIZES.z_dim
    pipe.vae.register_to_config(latents_mean=torch.randn(z_dim, generator=generator).tolist(),
                                latents_std=(torch.rand(z_dim, generator=generator) + 0.5).tolist())
    args = train.parse_args(["--out", str(tmp_path_factory.mktemp("run")), "--smoke"])
    record = train.add_transformer_run(
        train.new_training_record(7, 1.5, 20.0, "cpu"),
        dict(resumed=False, steps=11, seconds=2.5, data_seed=0, heldout_accuracy=None))
    folder = str(tmp_path_factory.mktemp("exported") / "tiny_wan")
    train.export(pipe, args.out, folder, _Log(), train.SMOKE_SIZES, args, record)
    return folder, pipe


def _resume_args(train, folder, out, *extra):
    return train.parse_args(["--out", str(out), "--smoke", "--device", "cpu", "--stage", "dit",
                             "--resume-from", folder, *extra])


def test_resume_loads_exactly_the_saved_pipeline(train, exported, tmp_path):
    from safetensors.torch import load_file

    folder, saved = exported
    args = _resume_args(train, folder, tmp_path)
    pipe, defaults, record = train.load_resumed_pipeline(
        _fresh_pipeline(train, 0), train.SMOKE_SIZES, args, torch.device("cpu"), _Log())
    for name in ("transformer", "text_encoder", "vae"):
        loaded, original = getattr(pipe, name), getattr(saved, name)
        assert all(p.dtype == torch.float32 for p in loaded.parameters())
        originals = dict(original.named_parameters())
        for key, tensor in loaded.named_parameters():
            assert torch.equal(tensor, originals[key].float()), f"{name}.{key}"
        files = [f for f in os.listdir(os.path.join(folder, name)) if f.endswith(".safetensors")]
        state = loaded.state_dict()
        for file in files:
            for key, tensor in load_file(os.path.join(folder, name, file)).items():
                assert torch.equal(state[key], tensor.float()), f"{name} file {key}"
    assert list(pipe.vae.config.latents_mean) == list(saved.vae.config.latents_mean)
    assert list(pipe.vae.config.latents_std) == list(saved.vae.config.latents_std)
    assert pipe.tokenizer.get_vocab() == saved.tokenizer.get_vocab()
    assert record["transformer_steps"] == 11 and record["vae_steps"] == 7 and record["complete"]
    assert defaults["num_frames"] == train.SMOKE_SIZES.frames


def test_resume_refuses_other_sizes(train, exported, tmp_path):
    from dataclasses import replace

    folder, _ = exported
    args = _resume_args(train, folder, tmp_path)
    device, sizes = torch.device("cpu"), train.SMOKE_SIZES
    other = replace(sizes, layers=sizes.layers + 1, text_layers=sizes.text_layers + 1)
    with pytest.raises(SystemExit) as error:
        train.load_resumed_pipeline(_fresh_pipeline(train, 0, other), other, args, device, _Log())
    message = str(error.value)
    assert (f"transformer num_layers: {sizes.layers} in the folder, {sizes.layers + 1} "
            f"here") in message
    assert (f"text_encoder num_layers: {sizes.text_layers} in the folder, "
            f"{sizes.text_layers + 1} here") in message
    longer = replace(sizes, frames=17)
    expected = r"num_frames \(fastdit_defaults.json\): 9 in the folder, 17 here"
    with pytest.raises(SystemExit, match=expected):
        train.load_resumed_pipeline(_fresh_pipeline(train, 0), longer, args, device, _Log())
    with pytest.raises(SystemExit, match="not an exported pipeline folder"):
        train.load_resumed_pipeline(_fresh_pipeline(train, 0), sizes,
                                    _resume_args(train, str(tmp_path), tmp_path), device, _Log())


def test_resumed_pool_uses_the_stored_normalisation(train, exported, tmp_path):
    folder, _ = exported
    args = _resume_args(train, folder, tmp_path, "--pool-seconds", "0", "--pool-batch", "2",
                        "--long-fraction", "0")
    pipe, _, _ = train.load_resumed_pipeline(_fresh_pipeline(train, 0), train.SMOKE_SIZES, args,
                                             torch.device("cpu"), _Log())
    stored = (list(pipe.vae.config.latents_mean), list(pipe.vae.config.latents_std))
    kept = train.build_pool(pipe, train.SMOKE_SIZES, args, torch.device("cpu"), _Log(),
                            data_seed=5, normalisation=stored)[train.SMOKE_SIZES.frames]
    assert (list(pipe.vae.config.latents_mean), list(pipe.vae.config.latents_std)) == stored
    estimated = train.build_pool(pipe, train.SMOKE_SIZES, args, torch.device("cpu"), _Log(),
                                 data_seed=5)[train.SMOKE_SIZES.frames]
    assert kept.captions == estimated.captions and len(kept.captions) == 2
    shape = (1, -1, 1, 1, 1)
    mean, std = (torch.tensor(v).view(shape) for v in stored)
    new_mean, new_std = (torch.tensor(pipe.vae.config[k]).view(shape)
                         for k in ("latents_mean", "latents_std"))
    raw = estimated.latents.float() * new_std + new_mean
    torch.testing.assert_close(kept.latents.float(), (raw - mean) / std, rtol=2e-2, atol=2e-2)
    assert kept.ids.shape[0] == 2 and kept.empty_mask.sum() == 1  # the empty prompt: </s>


def test_resume_run_continues_from_the_folder_and_accumulates_its_record(train, exported, tmp_path):
    """A --stage dit --resume-from run at learning rate 0 exports exactly the weights it loaded
    (the EMA starts from them), into the folder it resumed from, and adds its run to the record."""
    import json
    import shutil

    from safetensors.torch import load_file

    source, _ = exported
    folder = str(tmp_path / "tiny_wan")
    shutil.copytree(source, folder)
    out = tmp_path / "out"
    train.main(["--out", str(out), "--smoke", "--device", "cpu", "--stage", "dit",
                "--resume-from", folder, "--pipeline-dir", folder, "--dit-lr", "0",
                "--dit-seconds", "1", "--pool-seconds", "0", "--pool-batch", "2",
                "--eval-batch", "1", "--eval-long", "0", "--eval-steps", "2"])
    for name in ("transformer", "text_encoder", "vae"):
        files = os.listdir(os.path.join(source, name))
        for file in (f for f in files if f.endswith(".safetensors")):
            before = load_file(os.path.join(source, name, file))
            after = load_file(os.path.join(folder, name, file))
            assert before.keys() == after.keys()
            assert all(torch.equal(before[k], after[k]) for k in before), f"{name} changed"
    assert sorted(os.listdir(tmp_path)) == ["out", "tiny_wan"]  # no .partial / .old left
    with open(os.path.join(folder, "fastdit_defaults.json")) as handle:
        record = json.load(handle)["training"]
    with open(out / "metrics.json") as handle:
        metrics = json.load(handle)
    steps = len(metrics["losses"]["transformer"])
    assert steps > 0 and metrics["losses"]["transformer_step_offset"] == 11
    assert record == metrics["training"]
    assert record["transformer_steps"] == 11 + steps and record["vae_steps"] == 7
    assert len(record["runs"]) == 2 and record["runs"][1]["resumed"]
    assert record["runs"][1]["steps"] == steps and record["runs"][1]["data_seed"] == 1000
    assert record["runs"][1]["heldout_accuracy"] is not None
    assert record["transformer_seconds"] == pytest.approx(2.5 + record["runs"][1]["seconds"],
                                                          abs=0.11)
    assert record["wall_seconds"] == pytest.approx(20.0 + record["runs"][1]["wall_seconds"],
                                                   abs=0.11)


def test_history_plot_joins_the_calls_on_one_step_axis(tmp_path, rng):
    """training/plot_history.py: a first run's steps start at 0, a resumed call's at its recorded
    offset; long steps are left out of the default-size curve; the VAE losses a combined call
    repeats are counted once; held-out scores land at each call's last step."""
    import json

    spec = importlib.util.spec_from_file_location(
        "plot_history", SCRIPT.parent / "plot_history.py")
    history = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(history)
    vae = torch.rand(7, generator=rng).tolist()
    first = torch.rand(5, generator=rng).tolist()
    second = torch.rand(4, generator=rng).tolist()
    calls = [
        {"vae_losses": vae},
        {"losses": {"vae": vae, "transformer": first,
                    "transformer_long_step": [False, True, False, False, False]},
         "eval": {"heldout": {"accuracy": {"colour": 0.5, "shape": 0.25, "motion": 0.0}}}},
        {"losses": {"vae": [], "transformer": second, "transformer_long_step": [False] * 4,
                    "transformer_step_offset": 5},
         "eval": {"heldout": {"accuracy": {"colour": 1.0, "shape": 0.75, "motion": 1.0}}}},
    ]
    paths = []
    for index, metrics in enumerate(calls):
        paths.append(str(tmp_path / f"m{index}.json"))
        with open(paths[-1], "w") as f:
            json.dump(metrics, f)
    losses, runs, scores = history.read_history(paths)
    assert losses == vae
    assert [offset for offset, _, _ in runs] == [0, 5]
    assert runs[0][1].tolist() == [0, 2, 3, 4] and runs[0][2] == [first[0]] + first[2:]
    assert runs[1][1].tolist() == [5, 6, 7, 8] and runs[1][2] == second
    assert [step for step, _ in scores] == [5, 9] and scores[1][1]["shape"] == 0.75
    history.plot(losses, runs, scores, str(tmp_path / "history.png"))
    assert (tmp_path / "history.png").stat().st_size > 0
    del calls[2]["eval"]
    with open(paths[2], "w") as f:
        json.dump(calls[2], f)
    with pytest.raises(SystemExit, match="no held-out accuracy"):
        history.read_history(paths)


def test_guard_threshold_summary(rng):
    """benchmarks/guard_thresholds.py: seed ranges parse, and the summary's min / mean / sd and
    gaps are those of the rows."""
    from benchmarks.guard_thresholds import parse_seeds, summarize

    assert parse_seeds("1000-1003,7") == [1000, 1001, 1002, 1003, 7]
    snr = (20 + torch.rand(6, generator=rng)).tolist()
    control = (5 + torch.rand(6, generator=rng)).tolist()
    rows = [dict(seed=i, name="radial", density=0.5, snr=s, random=c)
            for i, (s, c) in enumerate(zip(snr, control))]
    summary = summarize(rows)["radial"]
    gaps = [s - c for s, c in zip(snr, control)]
    assert summary["seeds"] == 6 and summary["snr_min"] == min(snr)
    assert summary["random_max"] == max(control) and summary["gap_min"] == pytest.approx(min(gaps))
    assert summary["snr_sd"] == pytest.approx(float(torch.tensor(snr, dtype=torch.float64).std()))
