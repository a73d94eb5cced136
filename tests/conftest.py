import os

import pytest
import torch

# Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Commands without --model run the random-weight embedded pipeline (toy sizes, seconds): the
# plumbing tests. The trained default model is tested with --model tiny (test_quality_trained.py).
os.environ["FASTDIT_DEFAULT_MODEL"] = "tiny-random"

# Triton fixes interpreter mode when it is imported and each @triton.jit when it is defined: import
# it and every kernel module now, so a test that sets TRITON_INTERPRET=0 for a while (to take the
# PyTorch reference path) cannot leave compiled-mode kernels behind for the tests after it.
import importlib  # noqa: E402
import pkgutil  # noqa: E402

import fastdit.kernels  # noqa: E402

for _module in pkgutil.iter_modules(fastdit.kernels.__path__):
    importlib.import_module(f"fastdit.kernels.{_module.name}")


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, logged seed per test: inputs differ across runs, failures are reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
