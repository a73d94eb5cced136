"""Score a video for its caption's colour, shape and motion, without any learned model.

The clips of :mod:`fastdit.quality.clips` have one bright object over dark background tones, so:

- **colour**: every pixel takes the nearest of the palette (bright object colours and dark
  background tones); the object's colour is the bright colour covering most pixels over the clip.
- **shape**: per frame, the largest connected component of that colour; its fill ratio
  (area / bounding box: square 1, circle pi/4, diamond and triangle 1/2) and the vertical offset of
  its centroid in the box (triangle +1/6, the others 0) pick the nearest prototype; majority vote.
- **motion**: the component's centroid and area tracked over frames: area growing or shrinking by
  1.8x, else a centroid sweeping >= 1.2 pi around its mean (orbit), else a mostly straight
  displacement (left/right/up/down by its dominant axis), else vertical back-and-forth (bounce).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .clips import BACKGROUND_COLOURS, COLOURS, SHAPES, background_tones, parse_caption

__all__ = ["Analysis", "analyze", "score"]

# Prototype (fill ratio, centroid offset in the box / box height) per shape.
_SHAPE_PROTOTYPES = {
    "square": (1.0, 0.0),
    "circle": (math.pi / 4, 0.0),
    "diamond": (0.5, 0.0),
    "triangle": (0.5, 1.0 / 6.0),
}
_OFFSET_WEIGHT = 2.0  # makes triangle vs diamond as far apart as circle vs diamond
_MAX_COLOUR_DISTANCE = 0.3  # RGB distance beyond which a pixel belongs to no palette entry
_MIN_AREA_PX = 12  # smaller components are noise
_ANALYSIS_SIDE = 128  # larger videos are average-pooled to about this many pixels (short side)


@dataclass
class Analysis:
    """What the checker read from a video (``None`` where it could not tell)."""

    colour: str | None
    shape: str | None
    motion: str | None
    track: list[tuple[float, float, float]] = field(default_factory=list)  # x, y, area per frame

    def as_dict(self):
        return {"colour": self.colour, "shape": self.shape, "motion": self.motion}


def _palette():
    names, rgb = [], []
    for name, value in COLOURS.items():
        names.append(name)
        rgb.append(value)
    for name in BACKGROUND_COLOURS:
        for tone in background_tones(name):
            names.append(None)  # background tone
            rgb.append(tone)
    return names, np.asarray(rgb, dtype=np.float32)


def _as_float_video(video) -> np.ndarray:
    if hasattr(video, "detach"):
        video = video.detach().float().cpu().numpy()
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be (frames, height, width, 3), got shape {video.shape}")
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    return video.astype(np.float32)


def _largest_component(mask: np.ndarray):
    import cv2

    count, labels, stats, centroids = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8
    )
    if count <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    left, top, width, height, area = stats[best]
    if area < _MIN_AREA_PX:
        return None
    return dict(area=float(area), cx=float(centroids[best][0]), cy=float(centroids[best][1]),
                left=int(left), top=int(top), width=int(width), height=int(height))


def _classify_shape(components, frame_height, frame_width) -> str | None:
    votes = {name: 0 for name in SHAPES}
    for comp in components:
        if comp is None or comp["width"] < 5 or comp["height"] < 5:
            continue
        inside = (comp["left"] > 0 and comp["top"] > 0
                  and comp["left"] + comp["width"] < frame_width
                  and comp["top"] + comp["height"] < frame_height)
        if not inside:
            continue
        fill = comp["area"] / (comp["width"] * comp["height"])
        offset = (comp["cy"] - (comp["top"] + (comp["height"] - 1) / 2)) / comp["height"]
        votes[min(_SHAPE_PROTOTYPES, key=lambda name: math.hypot(
            fill - _SHAPE_PROTOTYPES[name][0],
            _OFFSET_WEIGHT * (offset - _SHAPE_PROTOTYPES[name][1])))] += 1
    if not any(votes.values()):
        return None
    return max(votes, key=votes.get)


def _classify_motion(track: np.ndarray) -> str | None:
    """``track``: (frames, 3) of x, y (fractions of width, height) and area (fraction)."""
    if len(track) < 4:
        return None
    x, y, area = track[:, 0], track[:, 1], track[:, 2]
    edge = max(1, len(track) // 4)
    area_ratio = np.median(area[-edge:]) / max(np.median(area[:edge]), 1e-9)
    if area_ratio > 1.8:
        return "grow"
    if area_ratio < 1 / 1.8:
        return "shrink"
    steps = np.hypot(np.diff(x), np.diff(y))
    path = float(steps.sum())
    displacement = np.array([x[-edge:].mean() - x[:edge].mean(), y[-edge:].mean() - y[:edge].mean()])
    # orbit: steady radius around the mean position and a large swept angle
    centre_x, centre_y = x.mean(), y.mean()
    radii = np.hypot(x - centre_x, y - centre_y)
    angles = np.unwrap(np.arctan2(y - centre_y, x - centre_x))
    swept = abs(angles[-1] - angles[0])
    if radii.mean() > 0.08 and radii.std() < 0.35 * radii.mean() and swept >= 1.2 * math.pi:
        return "orbit"
    distance = float(np.hypot(*displacement))
    if distance > 0.12 and distance > 0.6 * path:
        if abs(displacement[0]) >= abs(displacement[1]):
            return "left" if displacement[0] < 0 else "right"
        return "up" if displacement[1] < 0 else "down"
    if y.std() > 0.04 and y.std() > 2 * x.std() and np.abs(np.diff(y)).sum() > 3 * distance:
        return "bounce"
    return None


def analyze(video) -> Analysis:
    """Read the object's colour, shape and motion from ``video`` ``(frames, H, W, 3)``
    (float in [0, 1] or uint8; numpy or torch)."""
    video = _as_float_video(video)
    frames, height, width, _ = video.shape
    factor = min(height, width) // _ANALYSIS_SIDE
    if factor > 1:  # average-pool to about _ANALYSIS_SIDE px: same answers, a fraction of the time
        height, width = height // factor, width // factor
        video = video[:, : height * factor, : width * factor].reshape(
            frames, height, factor, width, factor, 3).mean(axis=(2, 4))
    names, palette = _palette()
    labels = np.empty((frames, height, width), dtype=np.int16)
    for index, frame in enumerate(video):  # per frame: (H*W, palette) distances stay small
        flat = frame.reshape(-1, 3)
        squared = ((flat * flat).sum(1)[:, None] - 2 * flat @ palette.T
                   + (palette * palette).sum(1)[None])
        nearest = squared.argmin(axis=1)
        valid = squared[np.arange(len(nearest)), nearest] < _MAX_COLOUR_DISTANCE**2
        labels[index] = np.where(valid, nearest, -1).reshape(height, width)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(names))[: len(COLOURS)]
    if max(counts) < _MIN_AREA_PX * frames / 4:
        return Analysis(None, None, None)
    colour_index = int(np.argmax(counts))
    colour = names[colour_index]
    components = [_largest_component(labels[f] == colour_index) for f in range(frames)]
    shape = _classify_shape(components, height, width)
    track = [(c["cx"] / width, c["cy"] / height, c["area"] / (height * width))
             for c in components if c is not None]
    motion = _classify_motion(np.asarray(track, dtype=np.float64).reshape(-1, 3))
    return Analysis(colour, shape, motion, track)


def score(video, caption: str) -> dict[str, bool]:
    """Whether ``video`` shows the caption's colour, shape and motion (one bool each)."""
    spec = parse_caption(caption)
    found = analyze(video)
    return {
        "colour": found.colour == spec.colour,
        "shape": found.shape == spec.shape,
        "motion": found.motion == spec.motion,
    }
