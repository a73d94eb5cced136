"""A new attention method in one file: subclass ``fastdit.methods.Method`` and give it a ``name``.

Once this module is imported, ``"band"`` works wherever fastdit takes a method name:
``fastdit.apply(pipe, "band", width=2)``, ``fastdit generate --attention band``, ``fastdit compare
--methods band`` and ``fastdit info``. A package makes it available without an import through the
entry-point group ``fastdit.methods`` in its pyproject.toml::

    [project.entry-points."fastdit.methods"]
    band = "my_package.band:Band"

Run ``python examples/write_a_method.py`` (the embedded tiny model: offline, CPU, about a minute).
"""

from dataclasses import dataclass

import torch

from fastdit.kernels import BlockSparsity
from fastdit.methods import Method, MethodPlan


@dataclass(frozen=True)
class Band(Method):
    """Each query block visits the key blocks at most ``width`` blocks away from its own."""

    name = "band"
    width: int = 1
    block_size: int = 64

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or self.width < 0:
            raise ValueError(f"width must be an int >= 0, got width={self.width!r}")

    def plan(self, layout, device=None) -> MethodPlan:
        # Asked before every transformer forward; a method for real models caches its plans.
        blocks = torch.arange(-(-layout.num_tokens // self.block_size), device=device)
        band = (blocks[:, None] - blocks[None, :]).abs() <= self.width
        return MethodPlan(BlockSparsity.from_block_map(band[None, None], self.block_size), layout)


if __name__ == "__main__":
    from fastdit.cli import main

    main(["generate", "--attention", "band", "--attention-opt", "width=2", "--steps", "2",
          "-o", "band.mp4"])
