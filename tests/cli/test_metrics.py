"""fastdit.cli.metrics against scikit-image's PSNR and SSIM on fresh random frames."""

import json
import math
import sys

import numpy as np
import pytest
import torch

from fastdit.cli import metrics

skimage_metrics = pytest.importorskip("skimage.metrics")


def _np_rng(rng: torch.Generator) -> np.random.Generator:
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=rng)))


def _skimage_ssim(a, b, data_range, channel_axis):
    return skimage_metrics.structural_similarity(
        a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=data_range, channel_axis=channel_axis,
    )


# (dtype, low, high, data_range passed to both: None means the dtype's range)
CASES = [
    (np.uint8, 0, 255, None),
    (np.uint16, 0, 4000, 4000.0),
    (np.float32, 0.0, 1.0, 1.0),
    (np.float64, -1.0, 1.0, 2.0),
    (np.float64, 0.0, 255.0, 255.0),
]


def _pair(gen, shape, dtype, low, high, noise=0.15):
    """A random image/video and a noisy copy, both inside [low, high]."""
    span = high - low
    a = gen.uniform(low, high, size=shape)
    b = np.clip(a + gen.normal(scale=noise * span, size=shape), low, high)
    return a.astype(dtype), b.astype(dtype)


@pytest.mark.parametrize("dtype, low, high, data_range", CASES)
def test_psnr_matches_skimage(rng, dtype, low, high, data_range):
    gen = _np_rng(rng)
    for shape in [(23, 31), (17, 29, 3), (4, 16, 20, 3)]:
        a, b = _pair(gen, shape, dtype, low, high)
        expected = skimage_metrics.peak_signal_noise_ratio(
            a, b, data_range=data_range if data_range is not None else 255
        )
        # scikit-image computes the MSE of float32 inputs in float32, this module in float64.
        rel = 1e-6 if dtype == np.float32 else 1e-9
        assert metrics.psnr(a, b, data_range) == pytest.approx(expected, rel=rel)


@pytest.mark.parametrize("dtype, low, high, data_range", CASES)
def test_ssim_matches_skimage_rgb_and_gray(rng, dtype, low, high, data_range):
    gen = _np_rng(rng)
    # float32 is filtered in float32 by scikit-image and in float64 here.
    tolerance = 1e-5 if dtype == np.float32 else 1e-10
    skimage_range = data_range if data_range is not None else 255
    for height, width in [(11, 11), (24, 37), (40, 23)]:
        a, b = _pair(gen, (height, width, 3), dtype, low, high)
        expected = _skimage_ssim(a, b, skimage_range, -1)
        assert metrics.ssim(a, b, data_range) == pytest.approx(expected, abs=tolerance)
        gray_a, gray_b = a[..., 0], b[..., 1]
        expected = _skimage_ssim(gray_a, gray_b, skimage_range, None)
        assert metrics.ssim(gray_a, gray_b, data_range, channel_axis=None) == pytest.approx(
            expected, abs=tolerance
        )
        # Channels first, as channel_axis=0.
        expected = _skimage_ssim(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), skimage_range, 0)
        assert metrics.ssim(np.moveaxis(a, -1, 0), np.moveaxis(b, -1, 0), data_range,
                            channel_axis=0) == pytest.approx(expected, abs=tolerance)


def test_ssim_on_structured_images_matches_skimage(rng):
    """Smooth images with shifted structure (SSIM well inside (0, 1), not only noise)."""
    gen = _np_rng(rng)
    y, x = np.mgrid[0:48, 0:64]
    base = 0.5 + 0.25 * np.sin(x / 5.0 + gen.uniform(0, 3)) * np.cos(y / 7.0)
    a = np.stack([base, base ** 2, 1 - base], axis=-1)
    b = np.roll(a, shift=(1, 2), axis=(0, 1)) + gen.normal(scale=0.02, size=a.shape)
    expected = _skimage_ssim(a, b, 1.0, -1)
    assert 0.2 < expected < 0.99
    assert metrics.ssim(a, b, 1.0) == pytest.approx(expected, abs=1e-10)


@pytest.mark.parametrize("dtype, low, high, data_range", CASES[:3])
def test_video_metrics_per_frame_and_whole(rng, dtype, low, high, data_range):
    gen = _np_rng(rng)
    a, b = _pair(gen, (5, 19, 26, 3), dtype, low, high)
    b[2] = a[2]  # one identical frame
    skimage_range = data_range if data_range is not None else 255
    rel = 1e-6 if dtype == np.float32 else 1e-9  # float32 MSE in scikit-image
    quality = metrics.compare_videos(a, b, data_range)
    for index in range(5):
        expected_psnr = (math.inf if index == 2 else
                         skimage_metrics.peak_signal_noise_ratio(a[index], b[index],
                                                                 data_range=skimage_range))
        assert quality.psnr_per_frame[index] == pytest.approx(expected_psnr, rel=rel)
        expected_ssim = _skimage_ssim(a[index], b[index], skimage_range, -1)
        assert quality.ssim_per_frame[index] == pytest.approx(expected_ssim, abs=1e-5)
    assert quality.ssim_per_frame[2] == 1.0
    # The video PSNR comes from the MSE of all frames: finite despite the identical frame.
    expected_video = skimage_metrics.peak_signal_noise_ratio(a, b, data_range=skimage_range)
    assert quality.psnr == pytest.approx(expected_video, rel=rel)
    assert quality.ssim == pytest.approx(np.mean(quality.ssim_per_frame))
    # Grayscale videos (F, H, W).
    gray = metrics.compare_videos(a[..., 0], b[..., 0], data_range)
    for index in (0, 4):
        expected = _skimage_ssim(a[index, ..., 0], b[index, ..., 0], skimage_range, None)
        assert gray.ssim_per_frame[index] == pytest.approx(expected, abs=1e-5)


def test_identical_videos_give_inf_and_one(rng):
    gen = _np_rng(rng)
    video = gen.integers(0, 256, size=(3, 16, 24, 3), dtype=np.uint8)
    quality = metrics.compare_videos(video, video.copy())
    assert quality.psnr == math.inf and all(math.isinf(v) for v in quality.psnr_per_frame)
    assert quality.ssim == 1.0 and quality.ssim_per_frame == [1.0, 1.0, 1.0]
    assert metrics.psnr(video, video) == math.inf
    encoded = quality.as_json()
    assert encoded["psnr"] == "inf" and encoded["psnr_per_frame"] == ["inf"] * 3
    assert encoded["ssim"] == 1.0 and encoded["lpips"] is None
    json.dumps(encoded, allow_nan=False)  # strict JSON: no Infinity token


def test_json_number():
    assert metrics.json_number(math.inf) == "inf"
    assert metrics.json_number(-math.inf) == "-inf"
    assert metrics.json_number(float("nan")) == "nan"
    assert metrics.json_number(np.float32(1.5)) == 1.5
    assert metrics.json_number(None) is None


def test_bad_inputs_are_clear_errors():
    a = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="same shape"):
        metrics.compare_videos(a, a[:, :15])
    with pytest.raises(ValueError, match="data_range is required for float32"):
        metrics.psnr(a.astype(np.float32), a.astype(np.float32))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.compare_videos(a[:, :10], a[:, :10])
    with pytest.raises(ValueError, match="data_range must be a positive"):
        metrics.psnr(a, a, data_range=0)
    with pytest.raises(ValueError, match="frames, H, W"):
        metrics.compare_videos(a[0, 0, 0], a[0, 0, 0])
    with pytest.raises(ValueError, match="grayscale image must be"):
        metrics.ssim(a[0], a[0], channel_axis=None)


def test_lpips_never_downloads_and_says_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    scorer, reason = metrics.load_lpips("cpu")
    assert scorer is None and "lpips package is not installed" in reason


def test_lpips_scorer_feeds_frames_in_minus_one_to_one(rng):
    """LPIPSScorer with a stand-in network: [0, 255] frames reach it in [-1, 1], NCHW, batched."""
    seen = []

    def fake_lpips(x, y):
        seen.append((x.clone(), y.clone()))
        return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    gen = _np_rng(rng)
    a = gen.integers(0, 256, size=(5, 12, 14, 3), dtype=np.uint8)
    b = gen.integers(0, 256, size=(5, 12, 14, 3), dtype=np.uint8)
    scorer = metrics.LPIPSScorer(model=fake_lpips, device=torch.device("cpu"), batch=2)
    values = scorer.per_frame(a, b, data_range=255.0)
    assert [len(x) for x, _ in seen] == [2, 2, 1]
    x = torch.cat([x for x, _ in seen])
    expected = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    torch.testing.assert_close(x, expected)
    manual = np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=(1, 2, 3)) / 127.5
    np.testing.assert_allclose(values, manual, rtol=1e-5)
    quality = metrics.compare_videos(a, b, lpips_scorer=scorer)
    assert quality.lpips == pytest.approx(float(np.mean(values)))
