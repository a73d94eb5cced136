"""The ``fastdit`` command line and the tools behind it; the library never imports this package.

* :mod:`.main`: the parser and :func:`main` (``fastdit``, ``python -m fastdit``, exit codes);
* one module per command: :mod:`.generate`, :mod:`.compare`, :mod:`.calibrate`, :mod:`.bench`
  (with :mod:`.peers`, the executors it times fastdit against), :mod:`.info`;
* what they share: :mod:`.common` (method and schedule parsing, checks before loading a model,
  loading, video writing), :mod:`.runner` (timed runs), :mod:`.metrics` (PSNR, SSIM, LPIPS) and
  :mod:`.report` (the compare report).
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
