"""Values written as text, as the command line and ``--cache`` specs take them (no fastdit
imports: the library's cache specs and the command line share it)."""

from __future__ import annotations

from typing import Any

__all__ = ["parse_value"]


def parse_value(text: str) -> Any:
    """``"0.2"`` -> 0.2, ``"128"`` -> 128, ``"3,5,5"`` -> (3, 5, 5), ``"true"`` -> True,
    ``"none"`` -> None; anything else stays a string."""
    text = text.strip()
    if "," in text:
        return tuple(parse_value(item) for item in text.split(",") if item.strip())
    lowered = text.lower()
    if lowered in ("true", "yes", "on"):
        return True
    if lowered in ("false", "no", "off"):
        return False
    if lowered in ("none", "null"):
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text
