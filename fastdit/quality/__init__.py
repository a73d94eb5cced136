"""Quality you can check offline: procedural captioned clips (``clips``) and a checker that needs no
learned model (``checker``), used to train and to score the embedded tiny Wan model."""

from .checker import Analysis, analyze, score
from .clips import (
    COLOURS,
    MOTIONS,
    SHAPES,
    ClipSpec,
    build_word_tokenizer,
    heldout_specs,
    parse_caption,
    render,
    sample_specs,
    vocabulary,
)

__all__ = [
    "COLOURS",
    "MOTIONS",
    "SHAPES",
    "Analysis",
    "ClipSpec",
    "analyze",
    "build_word_tokenizer",
    "heldout_specs",
    "parse_caption",
    "render",
    "sample_specs",
    "score",
    "vocabulary",
]
