"""Where a run's time went: one Chrome/Perfetto trace of every rank, and each rank's time split
into compute, exposed communication and idle (as Holistic Trace Analysis does for GPUs).

- On each rank, ``StepSpans`` times the forward and backward of every micro-batch and the
  optimizer step with hooks on the strategy's module and optimizer — wall clock, and the CPU
  time of the thread, so time a span spent blocked (in a collective) shows. ``pdlab.train``
  keeps them per step (``TrainResult.spans``) beside the communication ops (``.comm``).
- In the kernel, ``chrome_trace(result)`` lays them out as a trace: a process per rank, its
  compute on one track, its communication (op, group, bytes) on others; ``breakdown(result)``
  splits each rank's step time. ``TrainResult.trace(path)`` and ``python -m pdlab run
  --trace PATH`` write the trace.
- ``cluster.profile()`` does it for any code (``pdlab.measure.profiling``).

Clocks: ranks stamp events with ``time.time()``, which processes on one machine share. Ranks
attached from other hosts are shifted by ``Cluster.clock_offsets()`` (each rank's clock
against the kernel's, measured over the control channel: accurate to half a round trip).

Open a trace at https://ui.perfetto.dev ("Open trace file") or in Chrome at
chrome://tracing ("Load"); both read the JSON as it is.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

COMPUTE = ("forward", "backward", "optimizer")  # span names; "step" spans the whole step


# ---- on every rank: compute spans --------------------------------------------------------


def _clock() -> tuple[float, float, int]:
    return time.time(), time.thread_time(), threading.get_ident()


class StepSpans:
    """Times ``strategy``'s forward and backward (per micro-batch) and optimizer steps.

    The forward is its module's forward call; the backward runs from the moment autograd
    reaches that forward's output to the end of the backward pass, before DDP or FSDP wait
    for their last gradient buckets (that wait is communication, outside the span).
    """

    def __init__(self, strategy: Any):
        self.spans: list[dict] = []
        self._forwards = 0
        self._began: tuple[float, float, int] | None = None
        # A pipeline rank holding several model chunks runs each on its own (pp-interleaved).
        optimizer = strategy.optimizer
        self._handles = [
            hook
            for module in strategy.chunks
            for hook in (
                module.register_forward_pre_hook(self._before_forward),
                module.register_forward_hook(self._after_forward),
            )
        ]
        if optimizer is not None:
            self._handles += [
                optimizer.register_step_pre_hook(self._before_step),
                optimizer.register_step_post_hook(self._after_step),
            ]

    @contextmanager
    def step(self) -> Iterator[list[dict]]:
        """Time one training step; yields its spans (filled in as it runs)."""
        self.spans, self._forwards = [], 0
        began = _clock()
        try:
            yield self.spans
        finally:
            self._close("step", None, began)

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()

    def _close(self, name: str, mb: int | None, began: tuple[float, float, int]) -> None:
        wall, cpu, thread = _clock()
        # CPU time only means something measured on one thread (CUDA's backward isn't).
        busy = cpu - began[1] if thread == began[2] else None
        self.spans.append({"name": name, "mb": mb, "start": began[0], "end": wall, "cpu": busy})

    def _before_forward(self, module: Any, args: Any) -> None:
        self._began = _clock()

    def _after_forward(self, module: Any, args: Any, output: Any) -> None:
        from pdlab import compat

        mb, self._forwards = self._forwards, self._forwards + 1
        self._close("forward", mb, self._began)
        grown = [t for t in compat.tree_flatten(output)[0] if getattr(t, "grad_fn", None)]
        if grown:
            grown[0].grad_fn.register_prehook(lambda grads: self._before_backward(mb))

    def _before_backward(self, mb: int) -> None:
        from pdlab import compat

        began = _clock()
        compat.queue_backward_callback(lambda: self._close("backward", mb, began))

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._began = _clock()

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._close("optimizer", None, self._began)


# ---- intervals -------------------------------------------------------------------------------

Intervals = list[tuple[float, float]]


def union(intervals: Intervals) -> Intervals:
    """The same time covered by sorted, disjoint intervals."""
    merged: Intervals = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def length(intervals: Intervals) -> float:
    """Total length of disjoint intervals."""
    return sum(end - start for start, end in intervals)


def overlap(a: Intervals, b: Intervals) -> float:
    """Total length of the intersection of two unions."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def _gaps(window: tuple[float, float], covered: Intervals) -> Intervals:
    """The parts of ``window`` that the sorted, disjoint ``covered`` leave out."""
    edges = [window[0], *(t for interval in covered for t in interval), window[1]]
    return [(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if b > a]


def lanes(intervals: Intervals) -> list[int]:
    """A lane for each interval so that intervals in one lane never overlap (greedy, in
    order of start): a trace's slices on one thread must nest."""
    ends: list[float] = []
    found = [0] * len(intervals)
    for i in sorted(range(len(intervals)), key=lambda i: intervals[i]):
        start, end = intervals[i]
        lane = next((k for k, last in enumerate(ends) if last <= start), len(ends))
        if lane == len(ends):
            ends.append(end)
        ends[lane] = end
        found[i] = lane
    return found


# ---- in the kernel: breakdown ----------------------------------------------------------------


def split_step(window: tuple[float, float], compute: list[dict], comm: Intervals) -> dict:
    """One rank's step ``window`` split into compute, exposed communication and idle.

    A compute span's CPU time is compute. The rest of it, the thread blocked, is exposed
    communication while communication was in flight (up to how long it was), else idle;
    time outside compute spans likewise. Communication in flight during a span beyond what
    the span was blocked ran behind compute: overlapped. Seconds; compute + exposed + idle
    is the step.
    """
    comm = union([(max(s, window[0]), min(e, window[1])) for s, e in comm if e > window[0]])
    split = {"compute": 0.0, "exposed_comm": 0.0, "idle": 0.0, "overlapped_comm": 0.0}
    for span in compute:
        wall = span["end"] - span["start"]
        busy = wall if span["cpu"] is None or pd.isna(span["cpu"]) else min(span["cpu"], wall)
        in_flight = overlap(comm, [(span["start"], span["end"])])
        exposed = min(wall - busy, in_flight)
        split["compute"] += busy
        split["exposed_comm"] += exposed
        split["idle"] += wall - busy - exposed
        split["overlapped_comm"] += in_flight - exposed
    outside = _gaps(window, union([(s["start"], s["end"]) for s in compute]))
    exposed = overlap(comm, outside)
    split["exposed_comm"] += exposed
    split["idle"] += length(outside) - exposed
    split["comm"] = length(comm)
    return split


def breakdown(result: Any) -> pd.DataFrame:
    """Per rank, the mean step's milliseconds in compute, exposed communication and idle
    (they add up to the step), all communication, and how much of it overlapped compute.

    The first step is left out when there are more than two (it warms up: lazy init,
    allocator, FSDP's first gathers). Columns: step_ms, compute_ms, exposed_comm_ms,
    idle_ms, comm_ms, overlapped_comm_ms, overlap (overlapped / comm).
    """
    spans, comm = result.spans, result.comm
    if spans.empty:
        raise ValueError("this result has no spans: train it with this pdlab to trace it")
    steps = sorted(spans.step.unique())
    kept = steps[1:] if len(steps) > 2 else steps
    rows = []
    for (rank, step), mine in spans[spans.step.isin(kept)].groupby(["rank", "step"]):
        window = mine[mine.name == "step"].iloc[0]
        ops = comm[(comm["rank"] == rank) & (comm.step == step)]
        split = split_step(
            (window.start, window.end),
            mine[mine.name.isin(COMPUTE)].to_dict("records"),
            list(zip(ops.start, ops.start + ops.seconds, strict=True)),
        )
        rows.append({"rank": rank, "step_ms": window.end - window.start, **split})
    table = pd.DataFrame(rows).groupby("rank").mean()
    table = table.rename(columns={c: f"{c}_ms" for c in table.columns if c != "step_ms"}) * 1e3
    table["overlap"] = (table.overlapped_comm_ms / table.comm_ms).where(table.comm_ms > 0, 0.0)
    return table[
        [
            "step_ms",
            "compute_ms",
            "exposed_comm_ms",
            "idle_ms",
            "comm_ms",
            "overlapped_comm_ms",
            "overlap",
        ]
    ]


# ---- in the kernel: the trace ----------------------------------------------------------------


def process(pid: int, name: str | None, threads: dict[int, str]) -> list[dict]:
    """Metadata naming a process (sorted by ``pid``; None: named already) and its threads."""
    events = []
    if name is not None:
        events += [
            {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": name}},
            {
                "ph": "M",
                "name": "process_sort_index",
                "pid": pid,
                "tid": 0,
                "args": {"sort_index": pid},
            },
        ]
    for tid, thread in threads.items():
        events.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": tid, "args": {"name": thread}}
        )
        events.append(
            {
                "ph": "M",
                "name": "thread_sort_index",
                "pid": pid,
                "tid": tid,
                "args": {"sort_index": tid},
            }
        )
    return events


def _slice(
    name: str, cat: str, pid: int, tid: int, start_us: float, end_us: float, args: dict
) -> dict:
    """A complete ("X") event."""
    return {
        "ph": "X",
        "name": name,
        "cat": cat,
        "pid": pid,
        "tid": tid,
        "ts": round(start_us, 3),
        "dur": round(max(0.0, end_us - start_us), 3),
        "args": args,
    }


def comm_slices(
    pid: int, first_tid: int, ops: list[dict], us: Any
) -> tuple[list[dict], dict[int, str]]:
    """``ops`` (with start, end, name, args) as slices on as many communication tracks as
    overlapping ops need, and those tracks' names."""
    placed = lanes([(op["start"], op["end"]) for op in ops])
    events = [
        _slice(
            op["name"],
            "communication",
            pid,
            first_tid + lane,
            us(op["start"]),
            us(op["end"]),
            op["args"],
        )
        for op, lane in zip(ops, placed, strict=True)
    ]
    names = {
        first_tid + lane: "communication" + (f" {lane + 1}" if lane else "")
        for lane in sorted(set(placed))
    }
    return events, names


def chrome_trace(result: Any) -> dict:
    """A training run as Chrome trace-event JSON: a process per rank; on its "compute" track
    each step with its forward/backward (per micro-batch) and optimizer spans, on its
    "communication" tracks every op with its group and bytes. Times in µs from the first
    event, clocks aligned (``result.clock_offsets``)."""
    spans, comm, offsets = result.spans, result.comm, result.clock_offsets
    if spans.empty:
        raise ValueError("this result has no spans: train it with this pdlab to trace it")
    shift = {int(rank): offsets.get(int(rank), 0.0) for rank in spans["rank"].unique()}
    t0 = min(
        (spans.start - spans["rank"].map(shift)).min(),
        (comm.start - comm["rank"].map(shift)).min() if len(comm) else float("inf"),
    )
    events: list[dict] = []
    for rank in sorted(shift):

        def us(t: float, rank: int = rank) -> float:
            return (t - shift[rank] - t0) * 1e6

        mine = spans[spans["rank"] == rank]
        forwards = mine[mine.name == "forward"].groupby("step").size()
        for span in mine.itertuples():
            name = f"step {span.step}" if span.name == "step" else span.name
            if span.name != "step" and forwards.get(span.step, 0) > 1 and not pd.isna(span.mb):
                name += f" {int(span.mb)}"  # micro-batches
            args = {"step": int(span.step)}
            if not pd.isna(span.cpu):
                args["cpu_ms"] = round(span.cpu * 1e3, 3)
            events.append(
                _slice(
                    name,
                    "compute" if span.name != "step" else "step",
                    rank,
                    0,
                    us(span.start),
                    us(span.end),
                    args,
                )
            )
        ops = [
            {
                "name": op.op,
                "start": op.start,
                "end": op.start + op.seconds,
                "args": {
                    "group": op.group,
                    "bytes": int(op.payload_bytes),
                    "bus_bytes": float(op.bus_bytes),
                    "step": int(op.step),
                },
            }
            for op in comm[comm["rank"] == rank].itertuples()
        ]
        slices, tracks = comm_slices(rank, 1, ops, us)
        events += process(rank, f"rank {rank}", {0: "compute", **tracks}) + slices
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"run": result.config.label, "config": asdict(result.config)},
    }


def write(trace: dict, path: str | os.PathLike) -> Path:
    """Write ``trace`` as JSON to ``path``; returns the path."""
    path = Path(path)
    path.write_text(json.dumps(trace))
    return path
