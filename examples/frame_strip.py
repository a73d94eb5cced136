"""A frame strip (PNG) of a video: evenly spaced frames side by side.

    python examples/frame_strip.py out.mp4 strip.png [--frames 6] [--side 128]

The README's strip of `make demo` is ``python examples/frame_strip.py out.mp4
docs/tiny_wan/demo_strip.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def frame_strip(frames: np.ndarray, count: int = 6, side: int | None = None,
                gap: int = 4) -> np.ndarray:
    """``count`` evenly spaced frames of ``frames`` ``(F, H, W, 3)`` uint8, left to right, white
    gaps between them, each resized to ``side`` px high when given."""
    import cv2

    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (F, H, W, 3) with F >= 1, got shape {frames.shape}")
    picks = np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)
    tiles = []
    for index in picks:
        frame = frames[index]
        if side is not None:
            width = round(frame.shape[1] * side / frame.shape[0])
            frame = cv2.resize(frame, (width, side), interpolation=cv2.INTER_AREA)
        tiles += [frame, np.full((frame.shape[0], gap, 3), 255, np.uint8)]
    return np.concatenate(tiles[:-1], axis=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("video")
    parser.add_argument("output")
    parser.add_argument("--frames", type=int, default=6, help="frames in the strip (default: 6)")
    parser.add_argument("--side", type=int, default=None,
                        help="frame height in px (default: the video's)")
    args = parser.parse_args(argv)
    import imageio.v2 as imageio

    from fastdit.cli.compare import read_video

    imageio.imwrite(args.output, frame_strip(read_video(args.video), args.frames, args.side))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
