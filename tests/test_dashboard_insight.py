"""The dashboard's window into a run: the breakdown per run, and where the ranks are when a
step takes far longer than the last ones."""

from __future__ import annotations

import time

import pytest

import pdlab
from pdlab.lab.dashboard import SLOW, SLOW_MIN_S, Run, SlowStep
from pdlab.training.config import TrainConfig

from .helpers import line_of


def test_a_slow_step_is_told_once_and_only_against_the_pace_of_the_last_ones():
    watch = SlowStep()
    assert watch.check(3, None, 0.0) is None
    assert watch.check(3, None, 1000.0) is None  # no pace yet (the first step warms up)
    assert watch.check(4, 0.5, 1000.0) is None  # a new step: its clock starts
    assert watch.check(4, 0.5, 1000.0 + SLOW * 0.5 - 0.1) is None  # not yet SLOW x the pace
    assert watch.check(4, 0.5, 1000.0 + SLOW * 0.5 + 0.1) == pytest.approx(SLOW * 0.5 + 0.1)
    assert watch.check(4, 0.5, 2000.0) is None  # told once a step
    assert watch.check(5, 0.5, 2000.0) is None and watch.told is False
    assert watch.check(5, 0.01, 2000.0 + SLOW_MIN_S - 0.1) is None  # 10 ms a step, but < 2 s
    assert watch.check(5, 0.01, 2000.0 + SLOW_MIN_S + 0.1) is not None


def test_the_pace_leaves_out_the_first_step_and_takes_the_slowest_rank():
    records = [{"step": s, "rank": r, "step_time": t} for s, r, t in [
        (0, 0, 9.0), (0, 1, 9.0), (1, 0, 0.2), (1, 1, 0.4), (2, 0, 0.3), (2, 1, 0.1),
    ]]  # fmt: skip
    run = Run("r", TrainConfig(), 2, [], records=records)
    assert run.pace() == pytest.approx(0.35)  # median of 0.4 and 0.3
    assert Run("r", TrainConfig(), 2, [], records=records[:2]).pace() is None


def sleep_in_rank_1s_fourth_update():
    """On the ranks: rank 1 sleeps in its 4th gradient all-reduce step (dp/scratch)."""
    from pdlab.training.parallel.data import DataParallel

    original, calls = DataParallel.update, []

    def update(self):
        calls.append(1)
        if pdlab.rank() == 1 and len(calls) == 4:
            time.sleep(6)  # the slow step
        original(self)

    DataParallel.update = update


def test_the_dashboard_says_where_the_ranks_are_in_a_slow_step_and_shows_the_breakdown():
    with pdlab.Cluster(2) as cluster:
        cluster.run(sleep_in_rank_1s_fourth_update)
        dashboard = pdlab.Dashboard(cluster, refresh_s=0.05)
        try:
            dashboard.start(strategy="dp", impl="scratch", model="mlp", batch_size=8, steps=6)
            deadline = time.monotonic() + 60
            while "far longer" not in dashboard.message.value:
                assert time.monotonic() < deadline, dashboard.message.value
                time.sleep(0.1)
            told = dashboard.message.value
            result = dashboard.wait(timeout=60)
        finally:
            dashboard.close()
    assert "step 4 has taken" in told
    assert "rank 0 waits in all_reduce #" in told
    assert f"rank 1 is running ({line_of(sleep_in_rank_1s_fourth_update, '# the slow')})" in told
    assert len(result.steps) == 6  # the run went on
    table = dashboard.breakdown.value
    assert "Where each rank's step went" in table and "exposed_comm_ms" in table
    assert table.count("<tr") == 3  # a header and a row a rank
