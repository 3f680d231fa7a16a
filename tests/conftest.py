"""Shared fixtures. Every test module ends with no rank process left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

# Started in the background (``nohup make test &``, a CI runner without job control), pytest
# inherits SIGINT ignored, and the tests' Ctrl-C (``pthread_kill``) would never arrive: every
# interrupt test failed so, "DID NOT RAISE KeyboardInterrupt". A notebook's kernel has
# Python's handler while a cell runs; so do the tests.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def descendants(pid: int) -> list[int]:
    """PIDs of every live process below ``pid`` (from /proc: no psutil needed)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # a zombie has exited already
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_running(pid: int, module: bytes) -> list[int]:
    """Processes below ``pid`` whose command line names ``module``."""
    pids = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if module in cmdline:
            pids.append(child)
    return pids


def worker_pids(pid: int) -> list[int]:
    """Rank processes below ``pid``: ``python -m pdlab.control.worker``, or forked ones, which show
    as ``pdlab.control.worker --rank=R``."""
    return pids_running(pid, b"pdlab.control.worker")


def leaked_processes() -> list[int]:
    """Rank processes beyond the session clusters', and fork servers beyond the one this
    kernel keeps for its next cluster."""
    from pdlab.control import launcher

    shared = {r.pid for c in _session_clusters for r in c.status().ranks}
    kept = {server.pid} if (server := launcher.fork_server()) is not None else set()
    ranks = [p for p in worker_pids(os.getpid()) if p not in shared]
    return ranks + [
        p for p in pids_running(os.getpid(), b"pdlab.control.forkserver") if p not in kept
    ]


@pytest.fixture(autouse=True, scope="module")
def no_leaked_ranks():
    """Fail a test module that leaves rank processes or fork servers running."""
    yield
    deadline = time.monotonic() + 5
    while (left := leaked_processes()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"rank processes or fork servers leaked: {left}"


# One cluster of each size for the whole session: a rank start costs seconds, and tests that
# break a cluster leave it to restart itself on its next run.
_session_clusters: list = []


def _session_cluster(world_size: int):
    import pdlab

    with pdlab.Cluster(world_size) as cluster:
        _session_clusters.append(cluster)
        yield cluster
        _session_clusters.remove(cluster)


@pytest.fixture(scope="session")
def cluster2():
    yield from _session_cluster(2)


@pytest.fixture(scope="session")
def cluster4():
    yield from _session_cluster(4)
