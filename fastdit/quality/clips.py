"""Procedural captioned video clips: one coloured shape moving over a plain or textured background.

A clip is described by a :class:`ClipSpec` (the words of its caption) and rendered in batches by
:func:`render` with torch (CPU or GPU); the continuous details a caption does not name (position,
size, speed, texture scale, orbit direction) are drawn from a ``torch.Generator``. Captions come
from one small grammar::

    a <colour> <shape> <motion> over <background>[, the camera pans <direction>]

    "a red circle moves left over a blue checkerboard"
    "a white triangle bounces over purple stripes, the camera pans up"
    "a green square grows over a plain gray background"

Motions are defined per frame (a speed, a period), not per clip, so a longer clip continues the
same motion (linear motions stop at the border). Objects use bright colours, backgrounds dark
tones of their colour, so :mod:`fastdit.quality.checker` can find the object by colour alone.

``heldout_specs`` lists a fixed set of (colour, shape, motion) combinations that
``sample_specs(..., split="train")`` never produces, to measure generalisation to unseen captions.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

__all__ = [
    "BACKGROUND_COLOURS",
    "COLOURS",
    "MOTIONS",
    "PANS",
    "SHAPES",
    "TEXTURES",
    "ClipSpec",
    "background_tones",
    "build_word_tokenizer",
    "heldout_specs",
    "parse_caption",
    "render",
    "sample_specs",
    "vocabulary",
]

# Object colours (RGB in [0, 1]): bright and pairwise >= 0.4 apart, so a colour survives a VAE.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.12, 0.12),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.12, 0.80, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 0.98),
    "purple": (0.62, 0.18, 0.92),
    "white": (0.95, 0.95, 0.95),
}
# Background colour names; each renders as two dark tones (see background_tones).
BACKGROUND_COLOURS: dict[str, tuple[float, float, float]] = {
    **{name: rgb for name, rgb in COLOURS.items() if name != "white"},
    "gray": (0.80, 0.80, 0.80),
}
BACKGROUND_LIGHT, BACKGROUND_DARK = 0.42, 0.20  # brightness of the two background tones

SHAPES = ("circle", "square", "triangle", "diamond")
MOTIONS = ("left", "right", "up", "down", "bounce", "orbit", "grow", "shrink")
MOTION_PHRASES = {
    "left": "moves left",
    "right": "moves right",
    "up": "moves up",
    "down": "moves down",
    "bounce": "bounces",
    "orbit": "moves in a circle",
    "grow": "grows",
    "shrink": "shrinks",
}
TEXTURES = ("plain", "checkerboard", "stripes")
PANS = (None, "left", "right", "up", "down")

# Motion constants, per REFERENCE_FRAMES frames (the default clip: 33 frames = 32 steps).
REFERENCE_FRAMES = 32
LINEAR_TRAVEL = (0.35, 0.45)  # fraction of the frame travelled per 32 frames
BOUNCES_PER_REFERENCE = 2
ORBITS_PER_REFERENCE = 1
PAN_TRAVEL = 0.3


@dataclass(frozen=True)
class ClipSpec:
    """The captioned attributes of one clip."""

    colour: str
    shape: str
    motion: str
    background: str  # a BACKGROUND_COLOURS name
    texture: str  # one of TEXTURES
    pan: str | None = None  # camera pan direction, only with a texture

    def __post_init__(self):
        checks = (
            ("colour", self.colour, COLOURS),
            ("shape", self.shape, SHAPES),
            ("motion", self.motion, MOTIONS),
            ("background", self.background, BACKGROUND_COLOURS),
            ("texture", self.texture, TEXTURES),
            ("pan", self.pan, PANS),
        )
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {tuple(allowed)}, got {name}={value!r}")
        if self.pan is not None and self.texture == "plain":
            raise ValueError(f"a camera pan needs a textured background, got pan={self.pan!r} "
                             f"with texture='plain'")

    @property
    def caption(self) -> str:
        if self.texture == "plain":
            background = f"a plain {self.background} background"
        elif self.texture == "checkerboard":
            background = f"a {self.background} checkerboard"
        else:
            background = f"{self.background} stripes"
        pan = f", the camera pans {self.pan}" if self.pan else ""
        return f"a {self.colour} {self.shape} {MOTION_PHRASES[self.motion]} over {background}{pan}"


def parse_caption(caption: str) -> ClipSpec:
    """The :class:`ClipSpec` of a caption of the grammar (inverse of ``ClipSpec.caption``)."""
    words = caption.lower().replace(",", " , ").split()
    try:
        colour, shape = words[1], words[2]
        over = words.index("over")
        phrase = " ".join(words[3:over])
        motion = {v: k for k, v in MOTION_PHRASES.items()}[phrase]
        rest = words[over + 1:]
        pan = None
        if "," in rest:
            pan = rest[-1]
            rest = rest[: rest.index(",")]
        if rest[:2] == ["a", "plain"]:
            texture, background = "plain", rest[2]
        elif rest[-1] == "checkerboard":
            texture, background = "checkerboard", rest[1]
        else:
            texture, background = "stripes", rest[0]
        return ClipSpec(colour, shape, motion, background, texture, pan)
    except (IndexError, KeyError, ValueError) as exc:
        raise ValueError(f"caption is not of the grammar 'a <colour> <shape> <motion> over "
                         f"<background>[, the camera pans <direction>]': {caption!r}") from exc


def vocabulary() -> list[str]:
    """Every word of the grammar (with the tokenizer's special tokens first)."""
    words = ["a", "over", "plain", "background", "checkerboard", "stripes", "the", "camera",
             "pans", ","]
    words += list(COLOURS) + list(BACKGROUND_COLOURS) + list(SHAPES)
    words += [w for phrase in MOTION_PHRASES.values() for w in phrase.split()]
    words += [p for p in PANS if p]
    return ["<pad>", "</s>", "<unk>"] + list(dict.fromkeys(words))


def build_word_tokenizer(model_max_length: int = 512):
    """A word-level fast tokenizer over :func:`vocabulary` (lower-cased, ``</s>`` appended as
    UMT5's tokenizer does); ``save_pretrained`` writes it as ``tokenizer.json``."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(vocabulary())}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length, padding_side="right",
    )


def _heldout_triples() -> list[tuple[str, str, str]]:
    """16 fixed (colour, shape, motion) triples never used in training: each colour, shape and
    motion appears at least twice, each with other partners in training."""
    triples = []
    for index in range(16):
        triples.append((
            list(COLOURS)[(index * 3) % len(COLOURS)],
            SHAPES[index % len(SHAPES)],
            MOTIONS[(index * 5 + index // 8) % len(MOTIONS)],
        ))
    return triples


HELDOUT_TRIPLES = tuple(_heldout_triples())


def _random_spec(rng: random.Random, colour: str, shape: str, motion: str) -> ClipSpec:
    background = rng.choice([b for b in BACKGROUND_COLOURS if b != colour])
    texture = rng.choice(TEXTURES)
    pan = None if texture == "plain" else rng.choice(PANS)
    return ClipSpec(colour, shape, motion, background, texture, pan)


def sample_specs(count: int, seed: int, split: str = "train") -> list[ClipSpec]:
    """``count`` random specs. ``split="train"`` never yields a held-out (colour, shape, motion)
    triple; ``split="heldout"`` yields only those (with random backgrounds and pans)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got split={split!r}")
    rng = random.Random(seed)
    heldout = set(HELDOUT_TRIPLES)
    specs = []
    while len(specs) < count:
        if split == "heldout":
            triple = rng.choice(HELDOUT_TRIPLES)
        else:
            triple = (rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(MOTIONS))
            if triple in heldout:
                continue
        specs.append(_random_spec(rng, *triple))
    return specs


def heldout_specs(seed: int = 0) -> list[ClipSpec]:
    """One fixed spec per held-out triple (the evaluation captions)."""
    rng = random.Random(seed)
    return [_random_spec(rng, *triple) for triple in HELDOUT_TRIPLES]


def background_tones(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (light, dark) RGB tones a background colour renders with."""
    rgb = BACKGROUND_COLOURS[name]
    return tuple(BACKGROUND_LIGHT * c for c in rgb), tuple(BACKGROUND_DARK * c for c in rgb)


def _to_device(values, device):
    """``values`` (a list) as a tensor on ``device``, copied without waiting for the device's
    queue (``torch.tensor(..., device="cuda")`` synchronises: a training loop that renders every
    step would stall on it)."""
    return torch.tensor(values).to(device, non_blocking=True)


def _uniform(generator, count, low, high, device):
    return low + (high - low) * torch.rand(count, generator=generator, device=device)


def _trajectories(specs, frames, height, width, generator, device):
    """Centre (x, y in [0, 1] of width/height) and half-size (fraction of min(H, W)) per frame."""
    count = len(specs)
    s = torch.arange(frames, device=device, dtype=torch.float32)[None] / REFERENCE_FRAMES
    side = min(height, width)
    sx, sy = side / width, side / height  # half-size fraction -> x / y fraction

    def u(low, high):
        return _uniform(generator, count, low, high, device)[:, None]

    motion = [MOTIONS.index(spec.motion) for spec in specs]
    motion = _to_device(motion, device)[:, None]
    radius = u(0.09, 0.14).expand(count, frames)
    grow = u(0.05, 0.07) * (1 + 1.6 * s)
    shrink = u(0.15, 0.19) * torch.clamp(1 - 0.6 * s, min=0.3)
    radius = torch.where(motion == MOTIONS.index("grow"), grow.clamp(max=0.22), radius)
    radius = torch.where(motion == MOTIONS.index("shrink"), shrink, radius)

    x0, y0 = u(0.3, 0.7), u(0.3, 0.7)
    start, travel = u(0.62, 0.72), u(*LINEAR_TRAVEL) * s
    x = x0.expand(count, frames)
    y = y0.expand(count, frames)
    x = torch.where(motion == MOTIONS.index("left"), start - travel, x)
    x = torch.where(motion == MOTIONS.index("right"), 1 - start + travel, x)
    y = torch.where(motion == MOTIONS.index("up"), start - travel, y)
    y = torch.where(motion == MOTIONS.index("down"), 1 - start + travel, y)
    # bounce: a ball bouncing on a floor, BOUNCES_PER_REFERENCE hops per 32 frames
    floor, height_of_hop = u(0.7, 0.76), u(0.3, 0.38)
    hop = floor - height_of_hop * torch.sin(math.pi * BOUNCES_PER_REFERENCE * s).abs()
    y = torch.where(motion == MOTIONS.index("bounce"), hop, y)
    # orbit: around the centre, either direction
    orbit_radius, phase = u(0.2, 0.25), u(0, 2 * math.pi)
    direction = torch.where(u(0, 1) < 0.5, -1.0, 1.0)
    angle = phase + direction * 2 * math.pi * ORBITS_PER_REFERENCE * s
    orbiting = motion == MOTIONS.index("orbit")
    x = torch.where(orbiting, 0.5 + orbit_radius * sx * torch.cos(angle), x)
    y = torch.where(orbiting, 0.5 + orbit_radius * sy * torch.sin(angle), y)
    radius = torch.where(orbiting, radius.clamp(max=0.11), radius)
    # keep the whole object inside the frame (linear motions stop at the border)
    margin_x, margin_y = radius * sx + 0.02, radius * sy + 0.02
    x = torch.minimum(torch.maximum(x, margin_x), 1 - margin_x)
    y = torch.minimum(torch.maximum(y, margin_y), 1 - margin_y)
    return x, y, radius


def _shape_distance(shape_index, dx, dy, radius):
    """Signed distance (pixels, < 0 inside) to each clip's shape; dx, dy, radius in pixels."""
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(dx.abs(), dy.abs()) - radius
    diamond = (dx.abs() + dy.abs() - radius * 1.25) / math.sqrt(2)
    # isosceles triangle, apex up: base at dy = +r, apex at dy = -r, base half-width r
    edge = (2 * dx.abs() - (dy + radius)) / math.sqrt(5)
    triangle = torch.maximum(torch.maximum(dy - radius, -radius - dy), edge)
    distance = circle
    for name, value in (("square", square), ("diamond", diamond), ("triangle", triangle)):
        distance = torch.where(shape_index == SHAPES.index(name), value, distance)
    return distance


def render(
    specs: list[ClipSpec],
    frames: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    device="cpu",
    return_tracks: bool = False,
):
    """Render ``specs`` as videos ``(B, frames, H, W, 3)``, float32 in [0, 1].

    With ``return_tracks`` also returns ``(x, y, radius)``, each ``(B, frames)``: the object's
    centre in fractions of width and height and its half-size in fractions of ``min(H, W)``.
    """
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
    if not specs:
        raise ValueError("specs must not be empty")
    device = torch.device(device)
    if generator is None:
        generator = torch.Generator(device).manual_seed(0)
    count = len(specs)
    x, y, radius = _trajectories(specs, frames, height, width, generator, device)
    side = min(height, width)

    cols = (torch.arange(width, device=device, dtype=torch.float32) + 0.5)[None, None, None, :]
    rows = (torch.arange(height, device=device, dtype=torch.float32) + 0.5)[None, None, :, None]
    # object
    shape_index = _to_device([SHAPES.index(s.shape) for s in specs], device)
    dx = cols - (x * width)[:, :, None, None]
    dy = rows - (y * height)[:, :, None, None]
    distance = _shape_distance(shape_index[:, None, None, None], dx, dy,
                               (radius * side)[:, :, None, None])
    alpha = (0.5 - distance).clamp(0, 1)[..., None]  # one-pixel anti-aliased edge
    del dx, dy, distance

    # background: texture coordinates (pixels) shifted by the camera pan
    t = torch.arange(frames, device=device, dtype=torch.float32)[None, :, None, None]
    pan_x = _to_device([{"left": 1, "right": -1}.get(s.pan, 0) for s in specs], device)
    pan_y = _to_device([{"up": 1, "down": -1}.get(s.pan, 0) for s in specs], device)
    speed = PAN_TRAVEL * side / REFERENCE_FRAMES
    offset_x = _uniform(generator, count, 0, side, device)[:, None, None, None]
    offset_y = _uniform(generator, count, 0, side, device)[:, None, None, None]
    u = cols + offset_x + pan_x[:, None, None, None] * speed * t
    v = rows + offset_y + pan_y[:, None, None, None] * speed * t
    cell = (side * _uniform(generator, count, 0.1, 0.16, device))[:, None, None, None]
    checker = (torch.floor(u / cell) + torch.floor(v / cell)) % 2
    stripes = torch.floor((u + v) / cell) % 2
    texture = _to_device([TEXTURES.index(s.texture) for s in specs], device)
    texture = texture[:, None, None, None]
    dark = torch.where(texture == 1, checker, torch.where(texture == 2, stripes, 0.0))[..., None]
    del u, v, checker, stripes

    tones = [background_tones(s.background) for s in specs]
    light = _to_device([tone[0] for tone in tones], device)[:, None, None, None]
    dark_rgb = _to_device([tone[1] for tone in tones], device)[:, None, None, None]
    colour = _to_device([COLOURS[s.colour] for s in specs], device)[:, None, None, None]
    video = light + dark * (dark_rgb - light)
    video = video + alpha * (colour - video)
    if return_tracks:
        return video, (x, y, radius)
    return video
