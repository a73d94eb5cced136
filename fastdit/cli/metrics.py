"""Quality of a video against a reference video: PSNR, SSIM, and LPIPS when it is available locally.

Used by ``fastdit compare`` (every method's output against the dense output, and optionally
against a directory of reference videos). Frames are ``(F, H, W, C)`` (RGB or any channel count)
or ``(F, H, W)`` (grayscale), any real dtype; both videos must have the same shape.

Definitions (the standard ones, as ``skimage.metrics`` computes them):

* ``psnr(ref, test, data_range) = 10 * log10(data_range**2 / MSE)``, MSE over every pixel and
  channel in float64. Identical inputs give ``MSE = 0`` and PSNR ``math.inf`` (no cap). In JSON
  (``fastdit compare``'s ``results.json``) an infinite PSNR is written as the string ``"inf"``
  (:func:`json_number`), because JSON has no infinity.
* ``ssim(ref, test, data_range)``: Wang et al. 2004 with a Gaussian window (sigma 1.5, truncated
  at 3.5 sigma: 11 taps), ``K1 = 0.01``, ``K2 = 0.03``, population (co)variances, the mean of the
  SSIM map over the pixels at least 5 px from every border (the window radius; filter values there
  never touch the border padding), averaged over channels. It equals
  ``skimage.metrics.structural_similarity(ref, test, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=data_range, channel_axis=-1)`` (``channel_axis=None``
  for grayscale), up to float rounding: scikit-image filters float32 inputs in float32, this
  module always in float64. Identical inputs give exactly 1. Frames must be at least 11 x 11.
* ``data_range``: the span of the value range (255 for ``uint8``). ``None`` means the full range of
  an integer dtype (as scikit-image does); float inputs need it explicitly (``ValueError``).

Per video, :func:`compare_videos` gives PSNR per frame and over the whole video (from the MSE of
all frames together, so one identical frame does not make the video infinite) and SSIM per frame
and its mean over frames.

LPIPS (Zhang et al. 2018, AlexNet) needs the ``lpips`` package and the torchvision AlexNet weights
in the local torch hub cache; :func:`load_lpips` never downloads: it returns ``None`` and the
reason when either is missing.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "SSIM_K1",
    "SSIM_K2",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "LPIPSScorer",
    "VideoQuality",
    "compare_videos",
    "json_number",
    "load_lpips",
    "psnr",
    "ssim",
    "ssim_per_frame",
]

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5, as scipy.ndimage rounds it
SSIM_WINDOW = 2 * SSIM_RADIUS + 1  # 11
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Frames per SSIM batch: bounds the float64 temporaries (a 720p RGB frame is ~22 MB per map).
_SSIM_CHUNK_FRAMES = 8


# --------------------------------------------------------------------------- inputs
def _resolve_data_range(reference: np.ndarray, data_range: float | None) -> float:
    if data_range is not None:
        value = float(data_range)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"data_range must be a positive finite number, got {data_range=}")
        return value
    if np.issubdtype(reference.dtype, np.integer):
        info = np.iinfo(reference.dtype)
        return float(info.max - info.min)
    if reference.dtype == np.bool_:
        return 1.0
    raise ValueError(
        f"data_range is required for {reference.dtype} inputs (e.g. 1.0 for floats in [0, 1], "
        "255 for 0..255 values)"
    )


def _check_pair(reference, test) -> tuple[np.ndarray, np.ndarray]:
    reference, test = np.asarray(reference), np.asarray(test)
    if reference.shape != test.shape:
        raise ValueError(
            f"videos must have the same shape, got {reference.shape} and {test.shape}"
        )
    for name, array in (("reference", reference), ("test", test)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
        if np.iscomplexobj(array):
            raise ValueError(f"{name} must be real, got dtype {array.dtype}")
    return reference, test


def _as_frames(video: np.ndarray) -> np.ndarray:
    """``(F, H, W)`` or ``(F, H, W, C)`` -> ``(F, C, H, W)`` float64."""
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4:
        raise ValueError(
            f"a video must be (frames, H, W) or (frames, H, W, channels), got shape {video.shape}"
        )
    return np.ascontiguousarray(np.moveaxis(video, -1, 1), dtype=np.float64)


# --------------------------------------------------------------------------- PSNR
def _psnr_from_mse(mse: float, data_range: float) -> float:
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / mse))


def psnr(reference, test, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of ``test`` against ``reference`` (any equal shapes);
    ``math.inf`` when they are identical."""
    reference, test = _check_pair(reference, test)
    data_range = _resolve_data_range(reference, data_range)
    diff = reference.astype(np.float64) - test.astype(np.float64)
    return _psnr_from_mse(float(np.mean(diff * diff)), data_range)


# --------------------------------------------------------------------------- SSIM
def _gaussian_taps(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    taps = torch.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return taps / taps.sum()


def _ssim_planes(x: torch.Tensor, y: torch.Tensor, data_range: float) -> torch.Tensor:
    """Mean SSIM of each ``(H, W)`` plane of ``x``/``y`` ``[N, H, W]`` (float64) -> ``[N]``.

    The filters run "valid" (no padding): exactly the pixels the 5-px border crop keeps, whose
    11 x 11 windows lie inside the image, so the border mode cannot matter.
    """
    taps = _gaussian_taps(x.device)
    rows, cols = taps.view(1, 1, SSIM_WINDOW, 1), taps.view(1, 1, 1, SSIM_WINDOW)

    def blur(plane: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(plane, rows), cols)

    x, y = x[:, None], y[:, None]
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x * mu_x
    var_y = blur(y * y) - mu_y * mu_y
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    return (numerator / denominator).mean(dim=(1, 2, 3))


def _check_ssim_size(height: int, width: int) -> None:
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(
            f"SSIM needs frames of at least {SSIM_WINDOW}x{SSIM_WINDOW} px (its Gaussian window), "
            f"got {height}x{width}"
        )


def ssim_per_frame(
    reference, test, data_range: float | None = None, device: torch.device | str = "cpu"
) -> list[float]:
    """SSIM of each frame of two videos ``(F, H, W[, C])``, channel-averaged (see module doc)."""
    reference, test = _check_pair(reference, test)
    data_range = _resolve_data_range(reference, data_range)
    ref_frames, test_frames = _as_frames(reference), _as_frames(test)
    frames, channels, height, width = ref_frames.shape
    _check_ssim_size(height, width)
    values = []
    for start in range(0, frames, _SSIM_CHUNK_FRAMES):
        chunk = slice(start, start + _SSIM_CHUNK_FRAMES)
        x = torch.from_numpy(ref_frames[chunk]).to(device).reshape(-1, height, width)
        y = torch.from_numpy(test_frames[chunk]).to(device).reshape(-1, height, width)
        per_plane = _ssim_planes(x, y, data_range).reshape(-1, channels)
        values.extend(per_plane.mean(dim=1).cpu().tolist())
    return values


def ssim(
    reference, test, data_range: float | None = None, channel_axis: int | None = -1,
    device: torch.device | str = "cpu",
) -> float:
    """SSIM of one image: ``(H, W)`` with ``channel_axis=None``, else channels on ``channel_axis``."""
    reference, test = _check_pair(reference, test)
    if channel_axis is None:
        if reference.ndim != 2:
            raise ValueError(
                f"a grayscale image must be (H, W), got shape {reference.shape}; pass "
                "channel_axis for multichannel images"
            )
        reference, test = reference[None], test[None]
    else:
        if reference.ndim != 3:
            raise ValueError(
                f"an image with channels must be 3-D, got shape {reference.shape} "
                f"(channel_axis={channel_axis})"
            )
        reference = np.moveaxis(reference, channel_axis, -1)[None]
        test = np.moveaxis(test, channel_axis, -1)[None]
    return ssim_per_frame(reference, test, data_range, device)[0]


# --------------------------------------------------------------------------- videos
@dataclass
class VideoQuality:
    """Quality of one video against its reference (PSNR in dB, ``inf`` when identical)."""

    psnr: float
    ssim: float
    psnr_per_frame: list[float]
    ssim_per_frame: list[float]
    lpips: float | None = None
    lpips_per_frame: list[float] | None = None

    def as_json(self) -> dict:
        return {
            "psnr": json_number(self.psnr),
            "ssim": json_number(self.ssim),
            "lpips": json_number(self.lpips),
            "psnr_per_frame": [json_number(v) for v in self.psnr_per_frame],
            "ssim_per_frame": [json_number(v) for v in self.ssim_per_frame],
            "lpips_per_frame": (
                None if self.lpips_per_frame is None
                else [json_number(v) for v in self.lpips_per_frame]
            ),
        }


def compare_videos(
    reference, test, data_range: float | None = None, device: torch.device | str = "cpu",
    lpips_scorer: LPIPSScorer | None = None,
) -> VideoQuality:
    """PSNR (per frame and over the whole video), SSIM (per frame and mean), LPIPS if a scorer is
    given, of ``test`` against ``reference`` (both ``(F, H, W[, C])``)."""
    reference, test = _check_pair(reference, test)
    data_range = _resolve_data_range(reference, data_range)
    if reference.ndim not in (3, 4):
        raise ValueError(
            f"a video must be (frames, H, W) or (frames, H, W, channels), got shape "
            f"{reference.shape}"
        )
    diff = reference.astype(np.float64) - test.astype(np.float64)
    squared = (diff * diff).reshape(len(diff), -1)
    per_frame_mse = squared.mean(axis=1)
    psnr_frames = [_psnr_from_mse(float(mse), data_range) for mse in per_frame_mse]
    video_psnr = _psnr_from_mse(float(squared.mean()), data_range)
    ssim_frames = ssim_per_frame(reference, test, data_range, device)
    quality = VideoQuality(
        psnr=video_psnr,
        ssim=float(np.mean(ssim_frames)),
        psnr_per_frame=psnr_frames,
        ssim_per_frame=ssim_frames,
    )
    if lpips_scorer is not None:
        quality.lpips_per_frame = lpips_scorer.per_frame(reference, test, data_range)
        quality.lpips = float(np.mean(quality.lpips_per_frame))
    return quality


def json_number(value):
    """A float for JSON: ``inf`` -> ``"inf"``, ``-inf`` -> ``"-inf"``, NaN -> ``"nan"``."""
    if value is None:
        return None
    value = float(value)
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


# --------------------------------------------------------------------------- LPIPS
# torchvision's AlexNet weights, as lpips.LPIPS(net="alex") loads them through torch.hub.
_ALEXNET_WEIGHTS = "alexnet-owt-7be5be79.pth"


@dataclass
class LPIPSScorer:
    """LPIPS (AlexNet, v0.1) on RGB frames, lower is closer; built by :func:`load_lpips`."""

    model: object
    device: torch.device
    batch: int = 8

    def per_frame(self, reference, test, data_range: float) -> list[float]:
        reference, test = _check_pair(reference, test)
        if reference.ndim != 4 or reference.shape[-1] != 3:
            raise ValueError(f"LPIPS needs RGB videos (F, H, W, 3), got shape {reference.shape}")
        values: list[float] = []
        for start in range(0, len(reference), self.batch):
            tensors = []
            for video in (reference, test):
                chunk = torch.from_numpy(
                    np.ascontiguousarray(video[start : start + self.batch], dtype=np.float32)
                ).permute(0, 3, 1, 2)
                # LPIPS takes [-1, 1]: frames hold values in [0, data_range].
                tensors.append((chunk / data_range * 2.0 - 1.0).to(self.device))
            with torch.inference_mode():
                values.extend(self.model(*tensors).flatten().float().cpu().tolist())
        return values


def load_lpips(device: torch.device | str = "cpu") -> tuple[LPIPSScorer | None, str | None]:
    """``(scorer, None)`` when ``lpips`` and its weights are available locally, else
    ``(None, reason)``. Never downloads anything."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return None, "the lpips package is not installed (pip install lpips)"
    hub_weights = os.path.join(torch.hub.get_dir(), "checkpoints", _ALEXNET_WEIGHTS)
    if not os.path.isfile(hub_weights):
        return None, f"the AlexNet weights LPIPS needs are not in the local torch hub cache ({hub_weights})"
    package_weights = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    if not os.path.isfile(package_weights):
        return None, f"the LPIPS linear-layer weights are missing ({package_weights})"
    try:
        model = lpips.LPIPS(net="alex", verbose=False).to(device).eval()
    except Exception as exc:  # noqa: BLE001 - a broken install is a skip, not a failed compare
        return None, f"LPIPS could not be built: {type(exc).__name__}: {exc}"
    return LPIPSScorer(model=model, device=torch.device(device)), None
