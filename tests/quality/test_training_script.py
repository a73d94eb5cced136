"""The tiny model's training script (training/train_tiny_wan.py): its VAE crops and loss weights
follow the rendered object, and its stage arguments are checked."""

import importlib.util
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
