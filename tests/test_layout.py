"""Tests for fastdit.layout against brute-force Python references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastdit.layout import LatentGrid, SequenceLayout, TextSegment, TilePermutation

GRIDS_AND_TILES = [
    ((3, 5, 7), (2, 2, 4)),  # nothing divides
    ((4, 6, 8), (2, 3, 4)),  # everything divides
    ((2, 4, 6), (1, 1, 1)),  # identity
    ((3, 4, 8), (3, 4, 8)),  # single tile = identity
    ((5, 3, 9), (2, 3, 3)),  # only T padded
    ((1, 7, 5), (1, 4, 2)),  # single frame, H and W padded
    ((6, 6, 6), (4, 4, 4)),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def brute_force_tile_major(grid: tuple[int, int, int], tile: tuple[int, int, int]):
    """Reference: dict token -> tile-major position, and the set of padding positions."""
    T, H, W = grid
    tT, tH, tW = tile
    Tp, Hp, Wp = (math.ceil(n / s) * s for n, s in zip(grid, tile))
    vol = tT * tH * tW

    def seq(t, h, w):
        tile_id = ((t // tT) * (Hp // tH) + h // tH) * (Wp // tW) + w // tW
        return tile_id * vol + ((t % tT) * tH + h % tH) * tW + w % tW

    scatter = {}
    for t in range(T):
        for h in range(H):
            for w in range(W):
                scatter[t * H * W + h * W + w] = seq(t, h, w)
    padding = set()
    for t in range(Tp):
        for h in range(Hp):
            for w in range(Wp):
                if t >= T or h >= H or w >= W:
                    padding.add(seq(t, h, w))
    return scatter, padding, Tp * Hp * Wp


# --------------------------------------------------------------------------- #
# LatentGrid
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 4), (3, 5, 7), (4, 1, 6)])
def test_coords_and_token_index_match_triple_loop(shape):
    grid = LatentGrid(*shape)
    T, H, W = shape
    expected = [(t, h, w) for t in range(T) for h in range(H) for w in range(W)]
    coords = grid.coords()
    assert coords.dtype == torch.long
    assert coords.shape == (grid.num_tokens, 3)
    assert coords.tolist() == [list(c) for c in expected]
    for i, (t, h, w) in enumerate(expected):
        assert grid.token_index(t, h, w) == i
    idx = grid.token_index(coords[:, 0], coords[:, 1], coords[:, 2])
    assert torch.equal(idx, torch.arange(grid.num_tokens))
    # random subset, vectorised
    perm = torch.randperm(grid.num_tokens, generator=_gen(0))
    c = coords[perm]
    assert torch.equal(grid.token_index(*c.unbind(1)), perm)


def test_grid_properties():
    grid = LatentGrid(3, 5, 7)
    assert grid.shape == (3, 5, 7)
    assert grid.tokens_per_frame == 35
    assert grid.num_tokens == 105


@pytest.mark.parametrize(
    "video, expected_shape, expected_tokens",
    [
        ((81, 480, 832), (21, 30, 52), 32_760),
        ((81, 720, 1280), (21, 45, 80), 75_600),
    ],
)
def test_from_video_wan(video, expected_shape, expected_tokens):
    grid = LatentGrid.from_video(*video)
    assert grid.shape == expected_shape
    assert grid.num_tokens == expected_tokens


def test_from_video_other_factors():
    # 49 frames, temporal 4 -> 13 latent frames; spatial 8, patch 2 -> 60 x 90
    assert LatentGrid.from_video(49, 480, 720).shape == (13, 30, 45)
    assert LatentGrid.from_video(1, 64, 64, patch=(1, 1, 1)).shape == (1, 8, 8)


def test_grid_validation():
    with pytest.raises(ValueError, match=r"frames.*got frames=0"):
        LatentGrid(0, 4, 4)
    with pytest.raises(ValueError, match=r"width=-3"):
        LatentGrid(2, 4, -3)
    with pytest.raises(ValueError, match=r"height=2\.5"):
        LatentGrid(2, 2.5, 4)
    with pytest.raises(ValueError, match=r"frames=True"):
        LatentGrid(True, 2, 4)
    with pytest.raises(ValueError, match=r"num_frames=0"):
        LatentGrid.from_video(0, 480, 832)
    with pytest.raises(ValueError, match=r"too small.*height_px=8"):
        LatentGrid.from_video(81, 8, 832)
    with pytest.raises(ValueError, match=r"h must be in \[0, 5\).*h=5"):
        LatentGrid(3, 5, 7).token_index(0, 5, 0)


# --------------------------------------------------------------------------- #
# TextSegment / SequenceLayout
# --------------------------------------------------------------------------- #


def test_sequence_layout_video_only():
    layout = SequenceLayout(LatentGrid(2, 3, 4))
    assert layout.num_tokens == 24
    assert layout.video_offset == 0
    assert layout.video_slice == slice(0, 24)
    assert layout.text_slice is None
    assert not layout.is_text().any()
    assert torch.equal(layout.token_coords(), layout.grid.coords())


@pytest.mark.parametrize("position", ["before", "after"])
def test_sequence_layout_with_text(position):
    grid = LatentGrid(2, 3, 4)
    text = TextSegment(5, position, valid_length=3)
    layout = SequenceLayout(grid, text)
    n = grid.num_tokens
    assert layout.num_tokens == n + 5
    if position == "before":
        assert layout.video_offset == 5
        assert layout.video_slice == slice(5, 5 + n)
        assert layout.text_slice == slice(0, 5)
    else:
        assert layout.video_offset == 0
        assert layout.video_slice == slice(0, n)
        assert layout.text_slice == slice(n, n + 5)
    is_text = layout.is_text()
    expected_is_text = [
        layout.text_slice.start <= i < layout.text_slice.stop for i in range(layout.num_tokens)
    ]
    assert is_text.tolist() == expected_is_text
    coords = layout.token_coords()
    assert coords.shape == (layout.num_tokens, 3)
    assert (coords[is_text] == -1).all()
    assert torch.equal(coords[layout.video_slice], grid.coords())
    key_valid = layout.key_valid_mask()
    expected_key_valid = [
        not (layout.text_slice.start + 3 <= i < layout.text_slice.stop) for i in range(layout.num_tokens)
    ]
    assert key_valid.tolist() == expected_key_valid


def test_text_segment_validation():
    with pytest.raises(ValueError, match=r"position=.middle."):
        TextSegment(4, "middle")
    with pytest.raises(ValueError, match=r"length=0"):
        TextSegment(0, "after")
    with pytest.raises(ValueError, match=r"valid_length=7"):
        TextSegment(4, "after", valid_length=7)
    assert TextSegment(4, "after").num_valid == 4
    assert TextSegment(4, "after", 0).num_valid == 0
    with pytest.raises(ValueError, match=r"grid must be a LatentGrid"):
        SequenceLayout((2, 3, 4))


# --------------------------------------------------------------------------- #
# TilePermutation: indices
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("grid_shape, tile", GRIDS_AND_TILES)
def test_tile_major_positions_match_formula(grid_shape, tile):
    perm = TilePermutation(LatentGrid(*grid_shape), tile)
    ref_scatter, ref_padding, ref_padded = brute_force_tile_major(grid_shape, tile)

    assert perm.padded_tokens == ref_padded
    assert perm.padded_grid == tuple(math.ceil(n / s) * s for n, s in zip(grid_shape, tile))
    assert perm.tile_volume == math.prod(tile)
    assert perm.num_tiles * perm.tile_volume == perm.padded_tokens
    assert perm.tile_grid.shape == tuple(p // s for p, s in zip(perm.padded_grid, tile))
    assert perm.num_padding == len(ref_padding)

    scatter = perm.scatter_index()
    gather = perm.gather_index()
    assert scatter.dtype == gather.dtype == torch.long
    assert scatter.tolist() == [ref_scatter[i] for i in range(len(ref_scatter))]

    padding_positions = set((gather == -1).nonzero().flatten().tolist())
    assert padding_positions == ref_padding
    valid = perm.valid_mask()
    assert valid.dtype == torch.bool
    assert set((~valid).nonzero().flatten().tolist()) == ref_padding

    # gather and scatter are inverse of each other
    n = perm.grid.num_tokens
    assert torch.equal(gather[scatter], torch.arange(n))
    assert torch.equal(scatter[gather[valid]], valid.nonzero().flatten())
    assert sorted(scatter.tolist()) == sorted(set(range(ref_padded)) - ref_padding)

    expected_identity = ref_padded == n and all(ref_scatter[i] == i for i in range(n))
    assert perm.is_identity == expected_identity


def test_identity_cases():
    assert TilePermutation(LatentGrid(2, 4, 6), (1, 1, 1)).is_identity
    assert TilePermutation(LatentGrid(4, 4, 6), (2, 4, 6)).is_identity  # full frames per tile
    assert not TilePermutation(LatentGrid(4, 4, 6), (1, 2, 2)).is_identity
    assert not TilePermutation(LatentGrid(3, 4, 6), (2, 4, 6)).is_identity  # padding


def test_tile_positions_are_contiguous_per_tile():
    grid = LatentGrid(3, 5, 7)
    perm = TilePermutation(grid, (2, 2, 4))
    coords = grid.coords()
    scatter = perm.scatter_index()
    tile_of_token = (
        (coords[:, 0] // 2) * perm.tile_grid.height + coords[:, 1] // 2
    ) * perm.tile_grid.width + coords[:, 2] // 4
    assert torch.equal(scatter // perm.tile_volume, tile_of_token)


def test_tile_validation():
    grid = LatentGrid(3, 5, 7)
    with pytest.raises(ValueError, match=r"tile\[2\]=tW=8 > grid.shape\[2\]=7"):
        TilePermutation(grid, (1, 2, 8))
    with pytest.raises(ValueError, match=r"tile\[0\]=tT=4 > grid.shape\[0\]=3"):
        TilePermutation(grid, (4, 2, 2))
    with pytest.raises(ValueError, match=r"tile\[1\].*got tile\[1\]=0"):
        TilePermutation(grid, (1, 0, 2))
    with pytest.raises(ValueError, match=r"3 entries.*tile=\(1, 2\)"):
        TilePermutation(grid, (1, 2))
    with pytest.raises(ValueError, match=r"tile\[0\]=1\.5"):
        TilePermutation(grid, (1.5, 2, 2))
    # lists are accepted and normalised to tuples
    assert TilePermutation(grid, [1, 2, 2]).tile == (1, 2, 2)


def test_tile_permutation_is_hashable_and_comparable():
    a = TilePermutation(LatentGrid(3, 5, 7), (2, 2, 4))
    b = TilePermutation(LatentGrid(3, 5, 7), (2, 2, 4))
    a.gather_index()  # populate a's cache only
    assert a == b and hash(a) == hash(b)


# --------------------------------------------------------------------------- #
# TilePermutation: permute / unpermute
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("grid_shape, tile", GRIDS_AND_TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 2, -2])
def test_permute_unpermute_round_trip(grid_shape, tile, dtype, dim):
    grid = LatentGrid(*grid_shape)
    perm = TilePermutation(grid, tile)
    n = grid.num_tokens
    shape = [2, 3, 4]  # [B, S, heads, D]-like, with S placed on `dim`
    shape.insert(dim % 4, n)
    x = torch.randn(shape, generator=_gen(n + len(GRIDS_AND_TILES)), dtype=torch.float32).to(dtype)

    y = perm.permute(x, dim=dim)
    d = dim % x.ndim
    expected_shape = list(x.shape)
    expected_shape[d] = perm.padded_tokens
    assert list(y.shape) == expected_shape
    assert y.dtype == dtype

    # reference: y[pos] = x[gather[pos]] for real positions, zero at padding
    gather = perm.gather_index()
    y_m = y.movedim(d, 0)
    x_m = x.movedim(d, 0)
    for pos, src in enumerate(gather.tolist()):
        if src < 0:
            assert (y_m[pos] == 0).all()
        else:
            assert torch.equal(y_m[pos], x_m[src])

    z = perm.unpermute(y, dim=dim)
    assert torch.equal(z, x)


def test_permute_matches_coordinate_reference():
    """Permuted data equals a loop that writes each token at the formula's position."""
    grid = LatentGrid(3, 5, 7)
    perm = TilePermutation(grid, (2, 2, 4))
    x = torch.randn(1, grid.num_tokens, 2, generator=_gen(3))
    ref_scatter, _, padded = brute_force_tile_major(grid.shape, (2, 2, 4))
    ref = torch.zeros(1, padded, 2)
    for i, pos in ref_scatter.items():
        ref[:, pos] = x[:, i]
    assert torch.equal(perm.permute(x), ref)


def test_permute_autograd():
    grid = LatentGrid(3, 5, 7)
    perm = TilePermutation(grid, (2, 2, 4))
    x = torch.randn(2, grid.num_tokens, 3, generator=_gen(4), requires_grad=True)
    w = torch.randn(2, perm.padded_tokens, 3, generator=_gen(5))
    (perm.permute(x) * w).sum().backward()
    assert torch.equal(x.grad, perm.unpermute(w))


def test_permute_shape_validation():
    perm = TilePermutation(LatentGrid(3, 5, 7), (2, 2, 4))
    with pytest.raises(ValueError, match=r"num_tokens=105.*x.shape=\(2, 100, 4\)"):
        perm.permute(torch.zeros(2, 100, 4))
    with pytest.raises(ValueError, match=rf"padded_tokens={perm.padded_tokens}.*y.shape=\(2, 105, 4\)"):
        perm.unpermute(torch.zeros(2, 105, 4))
    with pytest.raises(ValueError, match=r"dim=3"):
        perm.permute(torch.zeros(105, 4), dim=3)


# --------------------------------------------------------------------------- #
# Joint sequences
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("position", ["before", "after", None])
@pytest.mark.parametrize("grid_shape, tile", [((3, 5, 7), (2, 2, 4)), ((4, 6, 8), (2, 3, 4)), ((2, 4, 6), (1, 1, 1))])
@pytest.mark.parametrize("dim", [1, 2])
def test_permute_sequence_round_trip(position, grid_shape, tile, dim):
    grid = LatentGrid(*grid_shape)
    text = None if position is None else TextSegment(6, position, valid_length=4)
    layout = SequenceLayout(grid, text)
    perm = TilePermutation(grid, tile)
    shape = [2, 3, 5]
    shape.insert(dim, layout.num_tokens)
    x = torch.randn(shape, generator=_gen(7))

    y = perm.permute_sequence(x, layout, dim=dim)
    assert y.shape[dim] == perm.permuted_sequence_length(layout) == perm.padded_tokens + layout.text_length

    x_m, y_m = x.movedim(dim, 0), y.movedim(dim, 0)
    video = x_m[layout.video_slice].movedim(0, dim)
    off = layout.video_offset
    assert torch.equal(y_m[off : off + perm.padded_tokens], perm.permute(video, dim).movedim(dim, 0))
    if text is not None:
        text_out = slice(0, 6) if position == "before" else slice(perm.padded_tokens, perm.padded_tokens + 6)
        assert torch.equal(y_m[text_out], x_m[layout.text_slice])

    assert torch.equal(perm.unpermute_sequence(y, layout, dim=dim), x)

    mask = perm.sequence_valid_mask(layout)
    assert mask.shape == (perm.padded_tokens + layout.text_length,)
    assert torch.equal(mask[off : off + perm.padded_tokens], perm.valid_mask())
    if text is not None:
        assert mask[text_out].tolist() == [True] * 4 + [False] * 2


def test_permute_sequence_validation():
    grid = LatentGrid(3, 5, 7)
    perm = TilePermutation(grid, (2, 2, 4))
    other = SequenceLayout(LatentGrid(3, 5, 6), TextSegment(4, "after"))
    with pytest.raises(ValueError, match=r"layout.grid=\(3, 5, 6\)"):
        perm.permute_sequence(torch.zeros(1, other.num_tokens), other)
    layout = SequenceLayout(grid, TextSegment(4, "after"))
    with pytest.raises(ValueError, match=r"layout.num_tokens=109.*x.shape=\(1, 105\)"):
        perm.permute_sequence(torch.zeros(1, 105), layout)
    with pytest.raises(ValueError, match=rf"= {perm.padded_tokens + 4}.*y.shape=\(1, 109\)"):
        perm.unpermute_sequence(torch.zeros(1, 109), layout)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_permute_cuda():
    grid = LatentGrid(3, 5, 7)
    perm = TilePermutation(grid, (2, 2, 4))
    x = torch.randn(2, grid.num_tokens, 4, 8, device="cuda", dtype=torch.bfloat16)
    y = perm.permute(x)
    assert y.device == x.device
    assert torch.equal(y.cpu(), perm.permute(x.cpu()))
    assert torch.equal(perm.unpermute(y), x)
    assert perm.valid_mask("cuda").device.type == "cuda"
