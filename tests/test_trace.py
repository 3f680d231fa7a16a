"""One merged trace: every strategy's run as a Chrome trace, the time breakdown, profiles."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import pandas as pd
import pytest

import pdlab
from pdlab.lab import plots
from pdlab.measure import trace
from pdlab.training import registry

from .helpers import line_of, small_run

REQUIRED = {"X": {"name", "ph", "ts", "dur", "pid", "tid"}, "M": {"name", "ph", "pid", "args"}}


def assert_valid_trace(events: list[dict]) -> None:
    """What Perfetto and chrome://tracing need of trace-event JSON: each event's fields of
    its phase, numbers where numbers go, and slices on one thread that nest, never cross."""
    by_thread = defaultdict(list)
    for e in events:
        assert REQUIRED.get(e["ph"], {"ph"}) <= e.keys(), e
        if e["ph"] == "X":
            assert isinstance(e["ts"], float | int) and e["dur"] >= 0 and e["ts"] >= 0, e
            by_thread[e["pid"], e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for thread, slices in by_thread.items():
        open_ends = []
        for start, end in sorted(slices, key=lambda s: (s[0], -s[1])):
            while open_ends and open_ends[-1] <= start:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1], f"slices cross on {thread}"
            open_ends.append(end)


def test_the_trace_checker_refuses_crossing_slices_and_missing_fields():
    ok = {"ph": "X", "name": "a", "ts": 0.0, "dur": 10.0, "pid": 0, "tid": 0}
    assert_valid_trace([ok, {**ok, "ts": 2.0, "dur": 3.0}])  # nested: fine
    with pytest.raises(AssertionError, match="cross"):
        assert_valid_trace([ok, {**ok, "ts": 5.0, "dur": 10.0}])
    with pytest.raises(AssertionError):
        assert_valid_trace([{k: v for k, v in ok.items() if k != "dur"}])


def spans_per_rank(events: list[dict]) -> dict[int, set[str]]:
    """The categories of slices each rank's process has."""
    found = defaultdict(set)
    for e in events:
        if e["ph"] == "X":
            found[e["pid"]].add(e["cat"])
    return found


def runs(strategy: str) -> tuple[int, int]:
    """World size and micro-batches a small run of ``strategy`` needs."""
    entry = registry.get(strategy)
    return max(2, entry.min_world_size), 2 if entry.micro_batched else 1


def assert_a_trace_of_every_rank(events: list[dict], strategy: str, ranks: int) -> None:
    """Every rank's process, named, with its step, compute (forward, backward, optimizer)
    and, but for one process, communication, each op with its group and bytes."""
    assert_valid_trace(events)
    found = spans_per_rank(events)
    assert sorted(found) == list(range(ranks))
    for rank, categories in found.items():
        wanted = {"step", "compute"} | (set() if strategy == "single" else {"communication"})
        assert categories == wanted, (rank, categories)
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {f"rank {r}" for r in range(ranks)}
    compute = {e["name"].split()[0] for e in events if e["ph"] == "X" and e["cat"] == "compute"}
    assert compute == {"forward", "backward", "optimizer"}
    ops = [e for e in events if e["ph"] == "X" and e["cat"] == "communication"]
    assert all({"group", "bytes"} <= e["args"].keys() for e in ops)


# The CLI writes what ``trace.chrome_trace`` makes of its run: a few strategies show the file
# has every rank (one process, a pipeline, a 2-D grid); every strategy and impl below.
@pytest.mark.parametrize("strategy", ["single", "pp-1f1b", "dp-tp"])
def test_cli_writes_a_trace_of_every_rank(strategy, tmp_path):
    world, micro = runs(strategy)
    out = tmp_path / "out.json"
    subprocess.run(
        [
            sys.executable, "-m", "pdlab", "run", "--strategy", strategy, "--steps", "2",
            "--world-size", str(world), "--micro-batches", str(micro), "--trace", str(out),
            *(f"--{key.replace('_', '-')}={value}" for key, value in small_run(strategy).items()),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    events = json.loads(out.read_text())["traceEvents"]
    assert_a_trace_of_every_rank(events, strategy, 1 if strategy == "single" else world)


CONFIGS = [(s, impl) for s in registry.names()[1:] for impl in registry.get(s).impls]


@pytest.mark.parametrize(("strategy", "impl"), CONFIGS)
def test_every_strategy_traces_every_rank_and_its_breakdown_adds_up(
    strategy, impl, cluster2, cluster4
):
    world, micro = runs(strategy)
    cluster = cluster2 if world == 2 else cluster4
    extra = {k: v for k, v in small_run(strategy).items() if k != "impl"}
    result = pdlab.train(cluster, strategy=strategy, impl=impl, steps=2, micro_batches=micro, **extra)  # fmt: skip
    events = json.loads(json.dumps(trace.chrome_trace(result)))["traceEvents"]
    assert_a_trace_of_every_rank(events, strategy, world)
    table = trace.breakdown(result)
    parts = table.compute_ms + table.exposed_comm_ms + table.idle_ms
    assert (parts - table.step_ms).abs().max() < 1e-6  # the parts make up the step
    assert (table.overlapped_comm_ms <= table.comm_ms + 1e-9).all()


def test_breakdown_splits_a_step_as_described():
    # A 10 s step: forward [0, 2] all CPU; backward [2, 6] of which 1 s blocked while a
    # bucket's all-reduce ran from 3 to 7; an optimizer step [8, 9]. Outside the spans:
    # [6, 8] with communication in flight until 7, and [9, 10].
    compute = [
        {"start": 0.0, "end": 2.0, "cpu": 2.0},
        {"start": 2.0, "end": 6.0, "cpu": 3.0},
        {"start": 8.0, "end": 9.0, "cpu": 1.0},
    ]
    split = trace.split_step((0.0, 10.0), compute, [(3.0, 7.0)])
    assert split == {
        "compute": 6.0,
        "exposed_comm": 1.0 + 1.0,  # blocked in backward, then waited from 6 to 7
        "idle": 1.0 + 1.0,  # [7, 8] and [9, 10]
        "overlapped_comm": 2.0,  # 3 s in flight during backward, 1 s of it blocked
        "comm": 4.0,
    }
    # Without CPU times, a span counts as busy throughout: the overlap grows, nothing else
    # can tell the blocked second from compute.
    blind = trace.split_step((0.0, 10.0), [{**c, "cpu": None} for c in compute], [(3.0, 7.0)])
    assert blind["overlapped_comm"] == 3.0 and blind["compute"] == 7.0


def test_lanes_keep_overlapping_ops_apart():
    assert trace.lanes([(0, 4), (1, 2), (2, 3), (4, 5), (3, 6)]) == [0, 1, 1, 0, 1]


def test_breakdown_plot_stacks_the_table(cluster2):
    result = pdlab.train(cluster2, strategy="dp", impl="torch", model="gpt", steps=3)
    fig = plots.breakdown(result)
    table = trace.breakdown(result)
    bars = {bar.name: list(bar.y) for bar in fig.data}
    assert bars["compute"] == list(table.compute_ms)
    assert bars["exposed communication"] == list(table.exposed_comm_ms)
    assert bars["communication overlapped"] == list(table.overlapped_comm_ms)
    assert list(fig.data[1].base) == list(table.compute_ms)  # stacked on compute


def test_profile_merges_every_ranks_profiler_trace(cluster2, tmp_path):
    def all_reduce_twice():
        import torch
        import torch.distributed as dist

        t = torch.ones(1000)
        for _ in range(2):
            dist.all_reduce(t @ torch.ones(1000, 10) @ torch.ones(10, 1000))  # issued here

    out = tmp_path / "profile.json"
    with cluster2.profile(out) as profile:
        cluster2.run(all_reduce_twice)
    loaded = json.loads(out.read_text())
    assert loaded == json.loads(json.dumps(profile.trace))
    events = loaded["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    assert names[0] == "rank 0" and names[1] == "rank 1"
    for rank in (0, 1):
        mine = [e for e in events if e["pid"] == rank and e["ph"] == "X"]
        assert any(e["name"] == "aten::mm" for e in mine)  # the profiler's own events
        ops = [e for e in mine if e.get("cat") == "communication"]
        assert [e["name"] for e in ops] == ["all_reduce", "all_reduce"]
        assert ops[1]["args"]["seq"] == ops[0]["args"]["seq"] + 1
        assert ops[0]["args"]["line"] == line_of(all_reduce_twice, "# issued here")
    assert min(e["ts"] for e in events if e["ph"] == "X") >= 0


def test_results_keep_spans_as_a_table():
    result = pdlab.train(strategy="single", steps=2)
    assert isinstance(result.spans, pd.DataFrame)
    assert sorted(result.spans.name.unique()) == ["backward", "forward", "optimizer", "step"]
    assert (result.spans.end >= result.spans.start).all()
