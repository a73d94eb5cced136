import os

import pytest
import torch

# Kernel tests run the Triton kernels on CPU tensors through Triton's interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def rng() -> torch.Generator:
    """A fresh, logged seed per test: inputs differ across runs, failures are reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def pytest_report_header(config):
    return f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
