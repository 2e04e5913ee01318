"""The sample plan as a pure function: properties over random row-group layouts (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrun.datasets.plan import Plan

layouts = st.lists(st.integers(1, 40), min_size=1, max_size=40)


def _epoch_samples(plan: Plan, epoch: int, k: int):
    steps = plan.steps_in_epoch(epoch, k)
    return [plan.samples(epoch, p, 0, steps * k) for p in range(plan.partitions)], steps


@settings(max_examples=200, deadline=None)
@given(layouts, st.integers(1, 6), st.integers(0, 3), st.integers(1, 50), st.integers(1, 4))
def test_an_epoch_takes_each_sample_at_most_once_and_leaves_little(rows, partitions, seed, window, k):
    plan = Plan(np.array(rows), partitions=partitions, seed=seed, window=window)
    for epoch in range(2):
        parts, steps = _epoch_samples(plan, epoch, k)
        taken = [(int(g), int(r)) for groups, rs in parts for g, r in zip(groups, rs, strict=True)]
        assert len(taken) == len(set(taken)) == steps * k * partitions
        assert all(0 <= r < rows[g] for g, r in taken)
        # partitions are balanced: they differ by less than one row group, so little is left over
        sizes = plan.partition_rows(epoch)
        assert max(sizes) - min(sizes) <= max(rows)
        assert sum(rows) - len(taken) < partitions * (max(rows) + k)


@settings(max_examples=200, deadline=None)
@given(layouts, st.integers(1, 6), st.integers(0, 3), st.integers(1, 50))
def test_each_row_group_lives_in_one_partition_per_epoch(rows, partitions, seed, window):
    plan = Plan(np.array(rows), partitions=partitions, seed=seed, window=window)
    for epoch in range(2):
        owner = {}
        for p in range(partitions):
            n = plan.partition_rows(epoch)[p]
            groups, _ = plan.samples(epoch, p, 0, n)
            for g in set(groups.tolist()):
                assert owner.setdefault(g, p) == p
        assert sorted(owner) == list(range(len(rows)))


@settings(max_examples=100, deadline=None)
@given(layouts, st.integers(1, 4), st.integers(1, 30), st.data())
def test_any_slice_equals_the_same_part_of_the_whole(rows, partitions, window, data):
    """Samples are a function of the position alone: how a run is cut into steps does not matter."""
    plan = Plan(np.array(rows), partitions=partitions, seed=7, window=window)
    p = data.draw(st.integers(0, partitions - 1))
    n = plan.partition_rows(0)[p]
    whole = plan.samples(0, p, 0, n)
    start = data.draw(st.integers(0, n))
    count = data.draw(st.integers(0, n - start))
    part = plan.samples(0, p, start, count)
    assert (part[0] == whole[0][start : start + count]).all()
    assert (part[1] == whole[1][start : start + count]).all()


@settings(max_examples=100, deadline=None)
@given(layouts, st.integers(1, 4), st.integers(1, 30), st.integers(0, 5))
def test_window_groups_cover_the_window(rows, partitions, window, w):
    plan = Plan(np.array(rows), partitions=partitions, seed=3, window=window)
    for p in range(partitions):
        n = plan.partition_rows(0)[p]
        lo, hi = w * window, min((w + 1) * window, n)
        groups = set(plan.window_groups(0, p, w).tolist())
        if lo >= hi:
            assert not groups
            continue
        needed = set(plan.samples(0, p, lo, hi - lo)[0].tolist())
        assert needed <= groups
        # and no more than the row groups overlapping the window
        assert len(groups) <= len(needed) + 2


def test_same_seed_same_order_other_seed_or_epoch_other_order():
    rows = np.full(20, 10)
    a = Plan(rows, partitions=2, seed=1, window=16).samples(0, 0, 0, 50)
    b = Plan(rows, partitions=2, seed=1, window=16).samples(0, 0, 0, 50)
    c = Plan(rows, partitions=2, seed=2, window=16).samples(0, 0, 0, 50)
    d = Plan(rows, partitions=2, seed=1, window=16).samples(1, 0, 0, 50)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not ((a[0] == c[0]).all() and (a[1] == c[1]).all())
    assert not ((a[0] == d[0]).all() and (a[1] == d[1]).all())


def test_window_bounds_how_far_a_sample_moves():
    """Inside a partition, the shuffle only moves samples within their window."""
    rows = np.full(8, 10)
    plan = Plan(rows, partitions=1, seed=0, window=20)
    groups, within = plan.samples(0, 0, 0, 80)
    order, cums = plan._epoch(0)
    pos = {int(g): int(c) for g, c in zip(order[0], cums[0][:-1], strict=True)}
    flat = np.array([pos[int(g)] + int(r) for g, r in zip(groups, within, strict=True)])
    for w in range(4):
        assert sorted(flat[w * 20 : (w + 1) * 20]) == list(range(w * 20, (w + 1) * 20))
    assert not (flat == np.arange(80)).all()
