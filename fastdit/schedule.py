"""The dense schedule shared by every method: which denoising steps and layers run dense.

Counted with one pipeline-level step index: the classifier-free-guidance passes of a step share
it, and Wan2.2's two transformers (high- and low-noise experts) share one counter.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods.base import Method

__all__ = ["Schedule", "resolve_amount"]


def _check_amount(name: str, value) -> int | float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be an int count or a fraction in [0, 1], got {name}={value!r}")
    if isinstance(value, numbers.Integral):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value!r}")
        return int(value)
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} as a fraction must be in [0, 1], got {name}={value!r}")
    return float(value)


def resolve_amount(name: str, amount: int | float, total: int | None) -> int:
    """``amount`` as a count: an int as it is, a fraction of ``total`` rounded up."""
    if isinstance(amount, int):
        return amount
    if total is None:
        raise ValueError(
            f"{name}={amount} is a fraction, but the total is unknown: install with "
            "fastdit.apply(pipe, ...) on the pipeline (fastdit reads the step count from its "
            "cache_context or its scheduler), or give a step count"
        )
    return math.ceil(amount * total - 1e-9)


@dataclass(frozen=True)
class Schedule:
    """Dense first steps, dense last steps and dense first layers; ints count, floats are fractions.

    ``Schedule(dense_steps=12, dense_layers=1)`` is Radial's Wan2.1-14B preset (12 of 50 steps);
    ``Schedule(dense_steps=0.25)`` runs the first quarter of the steps dense (VMoBA's use).
    """

    dense_steps: int | float = 0
    dense_last_steps: int | float = 0
    dense_layers: int | float = 0

    def __post_init__(self) -> None:
        for name in ("dense_steps", "dense_last_steps", "dense_layers"):
            object.__setattr__(self, name, _check_amount(name, getattr(self, name)))

    @classmethod
    def from_method(cls, method: Method) -> Schedule:
        """The schedule a method carries (Radial presets do; :class:`~fastdit.methods.Method`'s
        default is all-sparse)."""
        return cls(
            dense_steps=method.dense_steps,
            dense_last_steps=method.dense_last_steps,
            dense_layers=method.dense_layers,
        )

    def is_dense(self, step: int | None, num_steps: int | None, layer: int, num_layers: int) -> bool:
        """Whether ``layer`` (of ``num_layers``) at denoising ``step`` (of ``num_steps``) runs dense.

        ``step=None`` (a transformer called outside a denoising loop) counts as a sparse step.
        """
        if layer < resolve_amount("dense_layers", self.dense_layers, num_layers):
            return True
        if step is None:
            return False
        if step < resolve_amount("dense_steps", self.dense_steps, num_steps):
            return True
        if self.dense_last_steps:
            if num_steps is None:
                raise ValueError(
                    f"dense_last_steps={self.dense_last_steps} needs the number of denoising steps, "
                    "which fastdit reads from the pipeline (its cache_context, or its scheduler's "
                    "num_inference_steps): install on the pipeline and call it, or pass "
                    "schedule=fastdit.Schedule(...) without dense_last_steps for direct model calls"
                )
            return step >= num_steps - resolve_amount("dense_last_steps", self.dense_last_steps, num_steps)
        return False
