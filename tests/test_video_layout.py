"""Cube-major token layout: permutations, round trips, cube contiguity, positions."""

import itertools
import math

import pytest
import torch

from megatron_dsv.video import CubeLayout, cube_permutation, raster_positions

SHAPES = [
    ((4, 8, 8), (4, 4, 4)),
    ((8, 16, 16), (2, 4, 4)),
    ((5, 9, 7), (4, 4, 4)),  # every dimension partial
    ((1, 1, 1), (4, 4, 4)),  # grid smaller than one cube
    ((3, 4, 4), (4, 4, 4)),  # only a partial t slab
    ((6, 10, 13), (2, 4, 8)),
    ((7, 5, 3), (1, 1, 1)),
    ((2, 3, 17), (2, 2, 4)),
]


@pytest.mark.parametrize("grid,cube", SHAPES)
def test_is_permutation_and_inverse(grid, cube):
    perm, inv = cube_permutation(grid, cube)
    n = math.prod(grid)
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values, torch.arange(n))
    assert torch.equal(perm[inv], torch.arange(n))
    assert torch.equal(inv[perm], torch.arange(n))


def _cube_of(pos, cube):
    return tuple(int(p) // c for p, c in zip(pos, cube))


@pytest.mark.parametrize("grid,cube", SHAPES)
def test_cubes_contiguous_full_cubes_first_and_aligned(grid, cube):
    layout = CubeLayout(grid, cube)
    pos = layout.positions()
    vol = math.prod(cube)
    cubes = [_cube_of(p, cube) for p in pos.tolist()]
    # Each cube (full or partial) occupies one contiguous run.
    runs = [c for c, _ in itertools.groupby(cubes)]
    assert len(runs) == len(set(runs))
    # Full cubes come first, each exactly one aligned block of `vol` tokens.
    full = layout.num_full_cubes
    assert full == math.prod(g // c for g, c in zip(grid, cube))
    for i in range(full):
        block = pos[i * vol:(i + 1) * vol]
        c0 = _cube_of(block[0].tolist(), cube)
        assert all(_cube_of(p, cube) == c0 for p in block.tolist())
        lo = torch.tensor(c0) * torch.tensor(cube)
        assert bool(((block >= lo) & (block < lo + torch.tensor(cube))).all())
    # Everything after the full cubes belongs to partial cubes.
    for p in pos[full * vol:].tolist():
        c = _cube_of(p, cube)
        assert any((ci + 1) * cs > g for ci, cs, g in zip(c, cube, grid))


def test_inside_a_cube_raster_and_cubes_in_raster_order():
    layout = CubeLayout((4, 8, 8), (2, 4, 4))
    pos = layout.positions()
    # First cube: t 0-1, h 0-3, w 0-3 in raster order; second cube starts at w=4.
    expect = [(t, h, w) for t in range(2) for h in range(4) for w in range(4)]
    assert pos[:32].tolist() == [list(e) for e in expect]
    assert pos[32].tolist() == [0, 0, 4]
    assert pos[64].tolist() == [0, 4, 0]


def test_partial_cubes_grouped_by_cut_dimensions():
    # 4x6x6 with 2x4x4 cubes: cut h only, w only, and both; groups come in mask order w, h, hw.
    layout = CubeLayout((4, 6, 6), (2, 4, 4))
    pos = layout.positions()[layout.num_full_cube_tokens:]
    kinds = [(int(h) >= 4) * 2 + (int(w) >= 4) for _, h, w in pos.tolist()]
    assert kinds == sorted(kinds)
    assert kinds[0] == 1 and kinds[-1] == 3


def test_partial_groups_do_not_straddle_blocks_when_size_divides():
    # 5x8x8 with 4x4x4 cubes: 4 full cubes, then 4 partial 1x4x4 pieces (16 tokens each).
    layout = CubeLayout((5, 8, 8), (4, 4, 4))
    pos = layout.positions()
    assert layout.num_full_cube_tokens == 256
    tail = pos[256:]
    assert bool((tail[:, 0] == 4).all())
    for i in range(0, 64, 16):  # each 16-token piece is one 1x4x4 cube
        piece = tail[i:i + 16]
        assert len({_cube_of(p, (4, 4, 4)) for p in piece.tolist()}) == 1


@pytest.mark.parametrize("grid,cube", SHAPES)
def test_apply_undo_sbh_and_bsh(grid, cube):
    layout = CubeLayout(grid, cube)
    n = layout.num_tokens
    x = torch.randn(n, 2, 3)
    y = layout.to_cube_sbh(x)
    assert torch.equal(layout.from_cube_sbh(y), x)
    assert torch.equal(y, x[layout.perm])
    xb = torch.randn(2, n, 5)
    yb = layout.to_cube_bsh(xb)
    assert torch.equal(yb, xb[:, layout.perm])
    assert torch.equal(layout.from_cube_bsh(yb), xb)


@pytest.mark.parametrize("grid,cube", SHAPES)
def test_positions_follow_tokens(grid, cube):
    layout = CubeLayout(grid, cube)
    raster = raster_positions(grid)
    # Encode each token's coordinates as its features; permuting must carry them along.
    feat = raster.float().unsqueeze(1)  # [s, 1, 3]
    moved = layout.to_cube_sbh(feat).squeeze(1).long()
    assert torch.equal(moved, layout.positions())
    # And undoing the layout on the positions gives raster order back.
    assert torch.equal(layout.from_cube_sbh(layout.positions()), raster)


def test_gradients_flow_through_permutation():
    layout = CubeLayout((3, 5, 6), (2, 4, 4))
    x = torch.randn(layout.num_tokens, 1, 4, requires_grad=True)
    w = torch.randn(layout.num_tokens, 1, 4)
    (layout.to_cube_sbh(x) * w).sum().backward()
    assert torch.equal(x.grad, layout.from_cube_sbh(w))


def test_bad_input():
    with pytest.raises(ValueError, match="grid"):
        CubeLayout((4, 0, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="cube"):
        CubeLayout((4, 4, 4), (2, 2))
    layout = CubeLayout((2, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="32 tokens"):
        layout.to_cube(torch.zeros(31, 1))


def test_packing_and_sharding_bad_input():
    """Named errors where bare ZeroDivisionError, TypeError or IndexError came from deeper down, and floats
    that were accepted (a float cp_size gave a float share)."""
    from megatron_dsv.video import CPShard, PackedClips

    for align in (0, -64, 2.5, None, True):
        with pytest.raises(ValueError, match="align must be a positive int"):
            PackedClips([(2, 4, 4)], (2, 2, 2), align=align)
    with pytest.raises(TypeError, match=r"a list of \(T, H, W\) grids, got \(2, 4, 4\): for one clip pass"):
        PackedClips((2, 4, 4), (2, 2, 2))
    with pytest.raises(ValueError, match="cp_size, cp_rank and align must be ints"):
        CPShard((2, 4, 4), (2, 2, 2), cp_size=2.0, cp_rank=0, align=16)
    shard = CPShard((2, 4, 4), (2, 2, 2), cp_size=2, cp_rank=1, align=16)
    for x, dim in ((torch.zeros(32, 3), 2), (torch.zeros(32, 3), -3), (torch.tensor(1.0), 0)):
        with pytest.raises(ValueError, match=f"seq_dim={dim} is not a dimension of a {x.dim()}-d tensor"):
            shard.shard(x, seq_dim=dim)
    assert shard.shard(torch.zeros(3, 32), seq_dim=-1).shape == (3, shard.s_local)


@pytest.mark.parametrize("grid,P,align", [((4, 4, 8), 2, 32), ((3, 5, 7), 4, 16), ((2, 4, 4), 1, 32)])
def test_cp_shards_tile_the_padded_cube_order(grid, P, align):
    """The P shares, in rank order, are the cube-ordered video zero-padded to a multiple of P x align; the
    packed_seq_params describe that padding (None when there is none); extra raster padding is ignored."""
    from megatron_dsv.video import CPShard

    n = grid[0] * grid[1] * grid[2]
    x = torch.randn(n + 5, 2, 3)   # 5 tokens of the data step's own padding after the video
    shards = [CPShard(grid, (2, 4, 4), P, c, align) for c in range(P)]
    total = shards[0].total
    assert total % (P * align) == 0 and total - n < P * align
    want = torch.zeros(total, 2, 3)
    want[:n] = CubeLayout(grid, (2, 4, 4)).to_cube_sbh(x[:n])
    assert torch.equal(torch.cat([s.shard(x) for s in shards]), want)
    params = shards[0].packed_seq_params()
    if total == n:
        assert params is None
    else:
        assert params.qkv_format == "sbhd" and params.cu_seqlens_q.tolist() == [0, n]
        assert params.cu_seqlens_q_padded.tolist() == [0, total]
    with pytest.raises(ValueError, match="at least"):
        shards[0].shard(x[: n - 1])
