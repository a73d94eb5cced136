"""The embedded models: which pipeline ``--model`` names, and the settings each one runs at.

* ``tiny`` (the default): a small text-to-video model in diffusers' Wan architecture, trained by
  ``training/train_tiny_wan.py`` on the procedural clips of :mod:`fastdit.quality.clips` and
  shipped as package data (``fastdit/assets/tiny_wan``, a ``save_pretrained`` folder of
  safetensors). It loads with the stock ``WanPipeline.from_pretrained`` from that local folder,
  offline. Its videos show one coloured shape moving over a background, as its caption says, so
  quality numbers on it mean something: :func:`fastdit.quality.score` checks a video against its
  caption.
* ``tiny-random``: the same architecture at toy sizes with random weights, built in-process
  (:func:`fastdit.testing.tiny.build_tiny_wan_pipeline`): it exercises the plumbing in
  seconds, and its videos are noise.

``--model`` left out means :func:`default_model`: ``tiny`` when its files are in the package
(``tiny-random`` otherwise), or the ``FASTDIT_DEFAULT_MODEL`` environment variable when it is set
(the test suite sets it to ``tiny-random``).

The training script writes ``fastdit_defaults.json`` next to the pipeline: the size, steps and
guidance of its evaluation, a demo prompt the model knows, whether it is a ``--smoke`` model and
its held-out checker scores. :func:`trained_settings` reads it (``TRAINED_DEFAULTS`` and
``TRAINED_PROMPT`` when it is missing).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

__all__ = [
    "DEFAULT_MODEL_ENV",
    "EMBEDDED_MODEL_DIR",
    "RANDOM_DEFAULTS",
    "RANDOM_MODEL",
    "TRAINED_DEFAULTS",
    "TRAINED_MODEL",
    "TRAINED_PROMPT",
    "default_model",
    "trained_available",
    "trained_settings",
    "describe_model",
    "embedded_defaults",
    "embedded_prompt",
    "is_embedded",
    "is_trained",
    "load_trained_pipeline",
]

TRAINED_MODEL = "tiny"
RANDOM_MODEL = "tiny-random"
DEFAULT_MODEL_ENV = "FASTDIT_DEFAULT_MODEL"
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_wan"

# The random-weight pipeline (fastdit.testing.tiny, TINY_DEFAULTS there): 17 frames of 96x160 px
# -> latent 5x12x20 -> patchified 5x6x10 = 300 video tokens: small, but more than two 128-token
# blocks, with several frames, so block-sparse plans are not trivial.
RANDOM_DEFAULTS = dict(height=96, width=160, num_frames=17, num_inference_steps=4,
                       guidance_scale=5.0)
# Used when the packaged folder has no fastdit_defaults.json: the size the full model trains at
# (33 frames of 256x256 px: latent 9x32x32, 9x16x16 = 2,304 video tokens) and the sampling
# settings of the training script's evaluation (20 UniPC steps, guidance 5.0).
TRAINED_DEFAULTS = dict(height=256, width=256, num_frames=33, num_inference_steps=20,
                        guidance_scale=5.0)
# A caption of the training grammar (the demo prompt when the folder names none).
TRAINED_PROMPT = "a yellow circle moves right over a blue checkerboard"


def trained_available() -> bool:
    """Whether the trained model's files are in the package."""
    return (EMBEDDED_MODEL_DIR / "model_index.json").is_file()


@functools.lru_cache(maxsize=1)
def trained_settings() -> dict:
    """The packaged model's ``fastdit_defaults.json``: ``height``, ``width``, ``num_frames``,
    ``num_inference_steps``, ``guidance_scale``, ``prompt``, ``smoke`` and
    ``heldout_accuracy`` (the documented defaults for a file without them)."""
    settings = dict(TRAINED_DEFAULTS, prompt=TRAINED_PROMPT, smoke=False, heldout_accuracy=None)
    path = EMBEDDED_MODEL_DIR / "fastdit_defaults.json"
    if path.is_file():
        with open(path, encoding="utf-8") as handle:
            settings.update(json.load(handle))
    return settings


def default_model() -> str:
    """The model ``--model`` left out selects: ``$FASTDIT_DEFAULT_MODEL``, else ``tiny`` when its
    files are in the package, else ``tiny-random``.

    Raises:
        ValueError: the environment variable names something else than an embedded model.
    """
    model = os.environ.get(DEFAULT_MODEL_ENV) or (
        TRAINED_MODEL if trained_available() else RANDOM_MODEL)
    if model not in (TRAINED_MODEL, RANDOM_MODEL):
        raise ValueError(f"{DEFAULT_MODEL_ENV} must be {TRAINED_MODEL!r} or {RANDOM_MODEL!r}, "
                         f"got {DEFAULT_MODEL_ENV}={model!r}")
    return model


def _resolve(model: str | None) -> str | None:
    return default_model() if model is None else model


def is_embedded(model: str | None) -> bool:
    """Whether ``model`` (``None``: the default) names an embedded model."""
    return _resolve(model) in (TRAINED_MODEL, RANDOM_MODEL)


def is_trained(model: str | None) -> bool:
    """Whether ``model`` (``None``: the default) names the embedded trained model."""
    return _resolve(model) == TRAINED_MODEL


def embedded_defaults(model: str | None) -> dict:
    """Height, width, frames, steps and guidance of an embedded model."""
    if not is_embedded(model):
        raise ValueError(f"model {model!r} is not an embedded model ({TRAINED_MODEL!r}, "
                         f"{RANDOM_MODEL!r})")
    if not is_trained(model):
        return dict(RANDOM_DEFAULTS)
    settings = trained_settings()
    return {key: settings[key] for key in TRAINED_DEFAULTS}


def embedded_prompt(model: str | None, fallback: str) -> str:
    """The default prompt: a caption the trained model knows, else ``fallback``."""
    return trained_settings()["prompt"] if is_trained(model) else fallback


def describe_model(model: str | None) -> str:
    """One line naming the model, for summaries and reports."""
    if is_trained(model):
        smoke = ", a --smoke training run" if trained_settings().get("smoke") else ""
        return f"tiny (embedded Wan trained on procedural clips{smoke}, offline)"
    if is_embedded(model):
        return "tiny-random (embedded Wan with random weights, offline)"
    return str(model)


def load_trained_pipeline(dtype=None, device="cpu"):
    """The embedded trained :class:`diffusers.WanPipeline`, with the stock ``from_pretrained`` of
    the package's folder (local files only: nothing is downloaded).

    Raises:
        OSError: the package was installed without its data (the folder or a file is missing).
    """
    import torch
    from diffusers import WanPipeline

    if not trained_available():
        raise OSError(
            f"the embedded model's files are missing from the installed package "
            f"({EMBEDDED_MODEL_DIR}/model_index.json); reinstall fastdit with its package data "
            f"(pip install .), or use --model {RANDOM_MODEL} (random weights)"
        )
    pipe = WanPipeline.from_pretrained(
        str(EMBEDDED_MODEL_DIR), local_files_only=True, dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=None)
    return pipe.to(device)
