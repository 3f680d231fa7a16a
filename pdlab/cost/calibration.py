"""``"this-machine"``: a ``Topology`` measured on a running ``pdlab.Cluster`` in well under a second.

Every rank times ``all_reduce`` at a few message sizes (the fastest of a few tries: other
programs only ever make an op slower) and a square matmul per dtype it can run. The link is
then fitted to the cost model's own form, ``time = 2(n-1)·α + bus_bytes / β``
(``pdlab.cost.costmodel``), by least squares on relative error, so small messages (which set α)
count as much as large ones (which set β). Compute is the slowest rank's FLOP/s: ranks share
the machine's cores or GPU, as they do when they train.

    calibration = calibrate(cluster)
    calibration.topology          # Topology(nodes=1, gpus_per_node=world, device=measured, ...)
    calibration.link              # the fitted Link
    calibration.sizes, calibration.seconds   # what was measured

The device's ``peak_flops`` are those measured matmul rates, not a datasheet's peak: against
them, ``pdlab.cost.planner.Assumptions(efficiency=1.0)`` means "as fast as that matmul".
Only the public ``Cluster.run`` is used. Ranks on several hosts are refused: a fit over the
world group would mix the two kinds of link.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from pdlab.control import warmup
from pdlab.cost.costmodel import link_op_time, ring_steps
from pdlab.cost.topology import THIS_MACHINE, Device, Link, Topology
from pdlab.measure.comm import bus_bytes


class Ranks(Protocol):
    """What calibration needs of a cluster: its size, and a function run on each rank."""

    world_size: int

    def run(self, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(*args)`` on every rank; the results by rank."""


SIZES = (1 << 12, 1 << 16, 1 << 19, 1 << 21, 1 << 23)  # all_reduce payloads, bytes
REPEATS = 12
SLOW_OP_S = 0.05  # an all_reduce this slow: fewer tries, and no larger sizes


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate`` measured and the topology fitted to it."""

    sizes: tuple[int, ...]  # all_reduce payload bytes
    seconds: tuple[float, ...]  # the fastest try at each size, averaged over ranks
    world_size: int
    topology: Topology

    @property
    def link(self) -> Link:
        return self.topology.intra


def measure_all_reduce(sizes: tuple[int, ...], repeats: int) -> list[tuple[int, float]]:
    """On a rank (all ranks together): ``(size, fastest of up to repeats)`` of all_reduce at
    each size. Sizes stop growing, and tries thin out, once one op takes ``SLOW_OP_S``: on a
    slow link (a throttled loopback) the calibration stays short. The ranks agree on each
    decision (the slowest rank's time), so they issue the same collectives."""
    import time

    import torch
    import torch.distributed as dist

    from pdlab.control import runtime

    device = runtime.device()
    best = []
    for size in sizes:
        buffer = torch.zeros(max(1, size // 4), device=device)
        start = time.perf_counter()
        dist.all_reduce(buffer)  # warm: connections and allocations
        _sync(device)
        slowest = torch.tensor([time.perf_counter() - start], device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times = []
        for _ in range(max(1, min(repeats, int(SLOW_OP_S / slowest.item())))):
            _sync(device)
            start = time.perf_counter()
            dist.all_reduce(buffer)
            _sync(device)
            times.append(time.perf_counter() - start)
        best.append((size, min(times)))
        if len(best) >= 2 and slowest.item() > SLOW_OP_S:
            break
    return best


def measure_device() -> dict:
    """On a rank: dense matmul FLOP/s per dtype this device runs, its memory and its name."""
    import os
    import socket
    import time

    import torch

    from pdlab.control import runtime

    device = runtime.device()
    if device.type == "cuda":
        n, dtypes = 4096, {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # fmt: skip
        memory = torch.cuda.get_device_properties(device).total_memory
        name = torch.cuda.get_device_name(device)
    else:
        n, dtypes = 512, {"fp32": torch.float32, "bf16": torch.bfloat16}
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        name = f"cpu ({torch.get_num_threads()} threads a rank)"
    flops = {}
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for label, dtype in dtypes.items():
            torch.backends.cuda.matmul.allow_tf32 = label == "tf32"
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            a @ b  # warm
            times = []
            for _ in range(5):
                _sync(device)
                start = time.perf_counter()
                a @ b
                _sync(device)
                times.append(time.perf_counter() - start)
            flops[label] = 2 * n**3 / min(times)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    where = (socket.gethostname(), str(device))  # ranks that share this memory
    return {"flops": flops, "memory": memory, "name": name, "where": where}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def fit_link(
    sizes: tuple[int, ...], seconds: tuple[float, ...], group_size: int, name: str = THIS_MACHINE
) -> Link:
    """The ``Link`` whose modelled all_reduce times on ``group_size`` ranks best match
    ``seconds`` at payloads ``sizes`` (least squares on relative error)."""
    if len(sizes) != len(seconds) or len(sizes) < 2 or group_size < 2:
        raise ValueError(
            "fit_link needs times at two or more sizes on a group of two or more ranks"
        )
    x = np.array([bus_bytes("all_reduce", s, group_size) for s in sizes])
    t = np.array(seconds, dtype=float)
    weight = 1 / t  # each point's error relative to its own time
    design = np.stack([weight, weight * x], axis=1)
    fixed, per_byte = np.linalg.lstsq(design, weight * t, rcond=None)[0]
    if fixed < 0:  # noise put the line below the origin: no latency, refit through zero
        fixed, per_byte = 0.0, float(np.sum(weight**2 * x * t) / np.sum(weight**2 * x**2))
    if not per_byte > 0:
        raise RuntimeError(
            f"all_reduce times {list(seconds)} do not grow with size {list(sizes)}: the machine "
            "was too busy to measure. Run the calibration again."
        )
    latency = fixed / ring_steps("all_reduce", group_size)
    return Link(name, 1 / per_byte, latency, f"fitted to all_reduce on {group_size} ranks")


def under_load(
    result: Any, calibration: Calibration, groups: tuple[str, ...] | None = None
) -> Calibration:
    """``calibration`` with its link slowed to what the collectives of ``result`` (a run
    without an emulated link, on the calibrated cluster) met: the top of a band whose bottom
    is ``calibration`` itself.

    A calibration times each size's fastest try on idle ranks. During a run on a machine
    whose cores other programs share, every message also waits for the peer's thread to get
    a core, and a blocking op waits for all of that. Each op's fastest member (the one that
    waited for no peer to arrive) took the transfer alone; the link's latency and bandwidth
    are scaled by one factor, so that its times for the run's ops (after the first step, at
    the bytes the run's backend sends) add up to those transfers. Never faster than
    ``calibration``, and ``calibration`` itself for a run without collectives. ``groups``:
    only those groups' ops (the ones on this machine's link, where others cross hosts).
    """
    comm = result.comm
    comm = comm[(comm.step > comm.step.min()) & ~comm.op.isin(["send", "recv", "barrier"])]
    if groups is not None:
        comm = comm[comm.group.isin(groups)]
    if comm.empty:  # a pipeline's sends alone: a send's time holds its receiver's wait too
        return calibration
    keys = ["step", "op", "group", "payload_bytes"]
    comm = comm.assign(k=comm.groupby([*keys, "rank"]).cumcount())  # the k-th such op a step
    ops = comm.groupby([*keys, "k"]).agg(n=("group_size", "first"), t=("seconds", "min"))
    link = calibration.link
    modelled = sum(
        link_op_time(op, payload, n, link, result.backend)
        for op, payload, n in zip(ops.index.get_level_values("op"), ops.index.get_level_values("payload_bytes"), ops.n, strict=True)
    )  # fmt: skip
    slowdown = max(1.0, float(ops.t.sum()) / modelled)
    slow = Link(f"{link.name} under load", link.bandwidth / slowdown, link.latency * slowdown,
                f"{link.source}, {slowdown:.3g}x slower: a run's collectives")  # fmt: skip
    return replace(calibration, topology=replace(calibration.topology, intra=slow))


def calibrate(
    cluster: Ranks, sizes: tuple[int, ...] = SIZES, repeats: int = REPEATS
) -> Calibration:
    """Measure ``cluster``'s ranks and fit a one-node ``Topology`` named ``"this-machine"``."""
    if cluster.world_size < 2:
        raise ValueError("calibration measures collectives: start the cluster with 2 or more ranks")
    devices = cluster.run(measure_device)
    hosts = {d["where"][0] for d in devices}
    if len(hosts) > 1:
        raise ValueError(
            f"the ranks run on {len(hosts)} hosts ({', '.join(sorted(hosts))}); 'this-machine' "
            "measures one. Calibrate a cluster on one host and build the rest with "
            "Topology(nodes=..., intra=calibration.link, inter='ib-ndr400')."
        )
    per_rank = cluster.run(measure_all_reduce, tuple(sizes), repeats)
    sizes = tuple(size for size, _ in per_rank[0])  # the ranks measured the same ones
    seconds = tuple(float(np.mean([t for _, t in col])) for col in zip(*per_rank, strict=True))
    link = fit_link(sizes, seconds, cluster.world_size)
    sharing = [sum(d["where"] == other["where"] for other in devices) for d in devices]
    device = Device(
        f"{THIS_MACHINE}: {devices[0]['name']}",
        {dtype: min(d["flops"][dtype] for d in devices) for dtype in devices[0]["flops"]},
        min(d["memory"] / n for d, n in zip(devices, sharing, strict=True)),
        "measured: the slowest rank's matmul; memory shared evenly by the ranks on it",
    )
    topology = Topology(1, cluster.world_size, device, link, None, THIS_MACHINE)
    return Calibration(tuple(sizes), seconds, cluster.world_size, topology)


def this_machine(cluster: Ranks | None, calibration: Calibration | None = None) -> Topology:
    """The ``"this-machine"`` topology: ``calibration``'s, else measured on ``cluster``."""
    if calibration is None and cluster is None:
        raise ValueError("'this-machine' is measured on a running cluster: pass cluster=")
    return (calibration or calibrate(cluster)).topology


# A dashboard's first Start on a cluster calibrates it: idle ranks run the matmuls once ahead
# (their first run of a dtype's kernel is the slow one).
warmup.first_use("a first calibration matmul", measure_device)
