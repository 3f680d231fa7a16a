"""The rank grid: coordinates, groups and data shards against numpy's reshape of the ranks."""

import itertools

import numpy as np
import pytest

from pdlab.training.layout import DIMS, Layout

LAYOUTS = [Layout(dp=2, tp=2), Layout(dp=2, pp=2), Layout(dp=2, ep=2), Layout(dp=2, cp=2, tp=2)]


def numpy_group(layout: Layout, rank: int, dims: tuple[str, ...]) -> tuple[int, ...]:
    grid = np.arange(layout.world_size).reshape(layout.shape)
    where = [int(i[0]) for i in np.nonzero(grid == rank)]
    index = tuple(slice(None) if d in dims else where[k] for k, d in enumerate(DIMS))
    return tuple(sorted(int(r) for r in grid[index].ravel()))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_groups_are_numpys_slices_of_the_grid(layout):
    for rank, dims in itertools.product(range(layout.world_size), [("tp",), ("dp",), DIMS[:2]]):
        assert layout.group_ranks(rank, dims) == numpy_group(layout, rank, dims)
        assert layout.rank_of(layout.coords(rank)) == rank


def test_a_grid_in_the_wrong_order_is_caught():
    # tp slowest instead of fastest: rank 1's tp partner would be 2, not 0.
    wrong = np.arange(4).reshape(2, 2).T
    assert Layout(dp=2, tp=2).group_ranks(1, "tp") != tuple(sorted(wrong[1 % 2]))


def test_expert_parallel_ranks_read_different_samples_context_parallel_ones_the_same():
    assert [Layout(dp=2, ep=2).data_shard(r) for r in range(4)] == [0, 1, 2, 3]
    assert [Layout(dp=2, cp=2).data_shard(r) for r in range(4)] == [0, 0, 1, 1]
    assert Layout(dp=2, ep=2).data_shards == 4 and Layout(dp=2, cp=2).data_shards == 2
