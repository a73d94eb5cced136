"""Helpers shared by the per-model integration tests."""

import torch


def run(model, kwargs):
    """One transformer forward without autograd; the sample output."""
    with torch.no_grad():
        return model(**kwargs)[0]


def expand_blocks(block_map: torch.Tensor, block: int, seq: int) -> torch.Tensor:
    """Token mask ``[seq, seq]`` of a ``[1, 1, nb, nb]`` block map (each block ``block`` tokens)."""
    ones = torch.ones(block, block, dtype=torch.int32)
    return torch.kron(block_map[0, 0].int(), ones).bool()[:seq, :seq]
