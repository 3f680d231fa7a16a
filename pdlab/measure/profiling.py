"""torch.profiler on every rank around any code run with ``cluster.run`` or ``%%ranks``,
merged into one Chrome/Perfetto trace (``cluster.profile()``).

Each rank's own trace becomes its process in the merged one (rank r is process r; its GPUs
get numbers of their own), moved to the kernel's clock (``pdlab.measure.trace`` says how clocks are
aligned), and the flight recorder's ops (``pdlab.measure.flight``: op, group, sequence number, line)
go on tracks of their own beside it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict
from typing import Any

from pdlab.measure.trace import comm_slices, process, write

_profiler: Any = None  # on a rank, between Profile.start and Profile.stop
_profiling_since = 0.0


def _start_profiler() -> None:
    global _profiler, _profiling_since
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():  # CUDA kernels, where a rank may launch any
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _profiler = torch.profiler.profile(activities=activities)
    _profiler.start()
    _profiling_since = time.time()


def _stop_profiler() -> dict:
    """This rank's trace (torch.profiler's JSON) and the ops it issued meanwhile."""
    global _profiler
    import torch.distributed as dist

    from pdlab.measure import flight

    profiler, _profiler = _profiler, None
    if profiler is None:
        raise RuntimeError("no profile is running on this rank: call Profile.start() first")
    profiler.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    labels = flight.group_labels()
    ops = [
        asdict(flight.reported(op, labels)) for op in flight.ops() if op.start >= _profiling_since
    ]
    return {"rank": dist.get_rank(), "trace": trace, "ops": ops}


def merge(parts: list[dict], offsets: dict[int, float]) -> dict:
    """The ranks' torch.profiler traces as one: each rank's processes renumbered under it
    (rank r's own is process r), times moved to the kernel's clock, and the flight
    recorder's ops on tracks of their own."""
    events: list[dict] = []
    for part in sorted(parts, key=lambda p: p["rank"]):
        rank, trace = part["rank"], part["trace"]
        # torch.profiler's "ts" is µs after baseTimeNanoseconds (2.x; 0 in older exports).
        base_us = trace.get("baseTimeNanoseconds", 0) / 1e3 - offsets.get(rank, 0.0) * 1e6
        pids: dict[Any, int] = {}
        for e in trace.get("traceEvents", []):
            e = dict(e)
            if "pid" in e:
                # The rank's own process is pid `rank`; others (GPUs) get their own numbers.
                e["pid"] = pids.setdefault(
                    e["pid"], rank if not pids else 1000 * (rank + 1) + len(pids)
                )
            if "ts" in e:
                e["ts"] = e["ts"] + base_us
            for key in ("id", "bind_id"):  # flow ids: unique per rank, so per rank here
                if isinstance(e.get(key), int):
                    e[key] += rank << 40
            if e.get("ph") == "M" and e.get("name") == "process_name" and e["pid"] == rank:
                e["args"] = {"name": f"rank {rank}"}
            events.append(e)
        ops = [
            {
                "name": op["op"],
                "start": op["start"],
                "end": op["end"] if op["end"] is not None else time.time(),
                "args": {k: op[k] for k in ("group", "seq", "nbytes", "shape", "line")},
            }
            for op in part["ops"]
        ]
        shift = offsets.get(rank, 0.0)
        slices, tracks = comm_slices(rank, 1, ops, lambda t, shift=shift: (t - shift) * 1e6)
        events += process(rank, None, {t: f"pdlab {n}" for t, n in tracks.items()}) + slices
    t0 = min((e["ts"] for e in events if "ts" in e and e.get("ph") != "M"), default=0.0)
    for e in events:
        if "ts" in e:
            e["ts"] = round(e["ts"] - t0, 3)
    return {"traceEvents": events, "displayTimeUnit": "ms"}


class Profile:
    """torch.profiler on every rank while it runs, merged into one trace (see the module).

    ``with cluster.profile("cells.json"): cluster.run(fn)``; across notebook cells (%%ranks),
    ``profile = cluster.profile("cells.json"); profile.start()`` ... ``profile.stop()``.
    ``trace`` holds the merged trace once stopped.
    """

    def __init__(self, cluster: Any, path: str | os.PathLike | None = None):
        self.cluster, self.path = cluster, path
        self.trace: dict | None = None

    def start(self) -> Profile:
        self.cluster.run(_start_profiler)
        return self

    def stop(self) -> dict:
        """Stop the profilers, merge their traces (and write them to ``path``, if given)."""
        parts = self.cluster.run(_stop_profiler)
        offsets = self.cluster.clock_offsets() if self.cluster.attach else {}
        self.trace = merge(parts, offsets)
        if self.path is not None:
            write(self.trace, self.path)
        return self.trace

    def __enter__(self) -> Profile:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
