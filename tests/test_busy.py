"""Busy time on forked ranks: issue 17's "forked clusters predict 4-5x too optimistic".

Every cluster after a kernel's first forks its ranks from the fork server. CPython 3.11 leaves
a forked main thread's ``threading.current_thread().native_id`` at its parent's, so
``BusyClock`` opened no scheduler statistics there and fell back to CPU time alone: the
waits for a core (most of a step on a busy 2-core machine) went uncounted, and
``pdlab.predict`` saw a fraction of the compute. Costs: the fork test ~1 s, the cluster test
~15 s (three clusters, one 10-step run, one calibration).
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from pathlib import Path

import pytest

import pdlab
from pdlab.control import forkserver, launcher
from pdlab.cost.calibration import calibrate, under_load
from pdlab.measure.busy import BusyClock


def spin(seconds: float) -> None:
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass


def busy_in_a_forked_child_sharing_a_core() -> tuple[float, float, float]:
    """``(busy, cpu, wall)`` seconds of a forked child that spins 0.5 s on one core while
    another process spins on the same core."""
    core = min(os.sched_getaffinity(0))
    hog = os.fork()
    if hog == 0:  # pragma: no cover (a child)
        os.sched_setaffinity(0, {core})
        spin(60)
        os._exit(0)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (a child)
        try:
            os.sched_setaffinity(0, {core})
            clock = BusyClock()
            cpu, start = time.thread_time(), time.perf_counter()
            spin(0.5)
            out = f"{clock()} {time.thread_time() - cpu} {time.perf_counter() - start}"
        except BaseException as error:  # report it: the parent fails the test with it
            out = f"error {error!r}"
        os.write(write, out.encode())
        os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            out = pipe.read()
    finally:
        os.waitpid(child, 0)
        os.kill(hog, signal.SIGKILL)
        os.waitpid(hog, 0)
    assert not out.startswith("error"), out
    busy, cpu, wall = map(float, out.split())
    return busy, cpu, wall


def test_a_forked_threads_busy_clock_counts_its_waits_for_a_core():
    busy, cpu, wall = busy_in_a_forked_child_sharing_a_core()
    assert cpu < 0.8 * wall, "the child never waited for its core: the test shows nothing"
    # Spinning, it ran or waited to run the whole time: busy is its wall time, not its CPU.
    assert busy >= 0.9 * wall, (busy, cpu, wall)


@pytest.mark.skipif(not forkserver.supported(), reason="fork servers need Linux 5.3+")
def test_the_third_cluster_of_a_kernel_predicts_its_steps_like_a_fresh_one():
    """Issue 17: dp, gpt, batch 16 on a kernel's third ``Cluster(2)`` measured 123.5 ms a step
    and was predicted 29.0 ms (before the fix, here: 66-114 ms measured, 32-35 ms predicted).
    Its ranks are forked (checked); the prediction on this machine must come within 25%."""
    for _ in range(2):  # the kernel's first clusters (the first starts the fork server)
        pdlab.Cluster(2).shutdown()
    server = launcher.fork_server()
    assert server is not None and server.warm.wait(120), "the fork server never got warm"
    with pdlab.Cluster(2) as cluster:
        keepers = cluster.run(os.getppid)
        stats = [Path(f"/proc/{keeper}/stat").read_text() for keeper in keepers]
        starters = [int(stat.rsplit(")", 1)[1].split()[1]) for stat in stats]  # keepers' parents
        assert starters == [server.pid] * 2, "the third cluster's ranks were not forked"
        result = pdlab.train(cluster, strategy="dp", model="gpt", batch_size=16, steps=10)
        calibration = calibrate(cluster)
    measured = statistics.median(result.steps.step_time.iloc[2:])
    low, high = (
        statistics.median(pdlab.predict(result, calibration=c).step_time.iloc[2:]) / measured
        for c in (calibration, under_load(result, calibration))
    )
    # Within 25%, of the band's bottom or top: on a quiet machine the two are one line; on a
    # loaded one, gloo's threads wait for cores the calibration had (``under_load``).
    assert low <= 1.25 and high >= 0.75, f"predicted / measured: {low:.2f} to {high:.2f}"
