"""fastdit.quality: the caption grammar round-trips, training never sees a held-out triple, and the
model-free checker reads the colour, shape and motion of the generator's own clips."""

import numpy as np
import pytest
import torch

from fastdit.quality import (
    COLOURS,
    MOTIONS,
    SHAPES,
    ClipSpec,
    analyze,
    build_word_tokenizer,
    heldout_specs,
    parse_caption,
    render,
    sample_specs,
    score,
)
from fastdit.quality.clips import HELDOUT_TRIPLES


def _seed(rng):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=rng))


def test_grammar_round_trip_and_heldout_split(rng):
    specs = sample_specs(300, seed=_seed(rng))
    assert all(parse_caption(spec.caption) == spec for spec in specs)
    assert not {(s.colour, s.shape, s.motion) for s in specs} & set(HELDOUT_TRIPLES)
    held = heldout_specs()
    assert {(s.colour, s.shape, s.motion) for s in held} == set(HELDOUT_TRIPLES)
    assert len(set(HELDOUT_TRIPLES)) == 16
    for attribute, values in (("colour", COLOURS), ("shape", SHAPES), ("motion", MOTIONS)):
        assert {getattr(s, attribute) for s in held} == set(values)
    tokenizer = build_word_tokenizer()
    ids = tokenizer(specs[0].caption).input_ids
    assert tokenizer.unk_token_id not in ids and ids[-1] == tokenizer.eos_token_id


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match="colour must be one of"):
        ClipSpec("pink", "circle", "left", "blue", "plain")
    with pytest.raises(ValueError, match="camera pan needs a textured background"):
        ClipSpec("red", "circle", "left", "blue", "plain", pan="up")
    with pytest.raises(ValueError, match="not of the grammar"):
        parse_caption("a cat walks")
    with pytest.raises(ValueError, match="must be .frames, height, width, 3."):
        analyze(np.zeros((4, 8, 8)))


@pytest.mark.parametrize("frames, height, width, count", [(33, 128, 128, 16), (65, 96, 160, 8)])
def test_checker_reads_generated_clips(rng, frames, height, width, count):
    seed = _seed(rng)
    specs = sample_specs(count, seed=seed) + sample_specs(count // 4, seed=seed, split="heldout")
    videos = render(specs, frames, height, width, generator=rng)
    assert videos.shape == (len(specs), frames, height, width, 3)
    assert 0 <= float(videos.min()) and float(videos.max()) <= 1
    for spec, video in zip(specs, videos):
        assert score(video, spec.caption) == {"colour": True, "shape": True, "motion": True}, (
            spec.caption, analyze(video).as_dict())


def test_checker_rejects_wrong_captions(rng):
    spec = sample_specs(1, seed=_seed(rng))[0]
    video = render([spec], 33, 128, 128, generator=rng)[0]
    other_colour = next(c for c in COLOURS if c != spec.colour)
    wrong = ClipSpec(other_colour, spec.shape, spec.motion, "gray", "plain")
    assert score(video, wrong.caption)["colour"] is False
    still = torch.flip(video, dims=[0])  # time reversed: left <-> right, grow <-> shrink, ...
    reversed_motion = {"left": "right", "right": "left", "up": "down", "down": "up",
                       "grow": "shrink", "shrink": "grow"}.get(spec.motion)
    if reversed_motion is not None:
        assert analyze(still).motion == reversed_motion
    assert analyze(torch.zeros(8, 64, 64, 3)).as_dict() == {
        "colour": None, "shape": None, "motion": None}
