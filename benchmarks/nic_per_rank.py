"""pdlab's per-rank emulated link against a NIC per rank for real (root only).

    python -m benchmarks.nic_per_rank [--rate 30Mbit/s] [--world-sizes 2,3,4] [--steps 6]
        [--repeats 1] [--cases dp:scratch,zero3:torch]   # default: every strategy that fits

Each rank is a host of its own (``benchmarks.two_hosts.hosts``): a network namespace whose
veth to one switch ``tbf`` limits to ``--rate`` both ways, sending and receiving, the
full-duplex link a rank has in pdlab's per-rank emulation (``--link RATE`` without
``:shared``, ``pdlab.cost.emulation``). The kernel runs in the first host with two clusters
of the same world size: *real*, its ranks started in the hosts by torchrun (gloo across the
veths), and *emulated*, on that host's own unshaped loopback with ``link=RATE``. Each case
runs on one, then the other, ``--repeats`` times; the table shows the medians (each run's
step time is its median after ``WARMUP`` steps) and their ratio. tbf counts IP and TCP
headers and ACKs (~6% of a bulk transfer), which the emulation, counting payload, leaves
out; the control channel's per-step metrics (a few KB) cross the real links too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from benchmarks.common import emulated_shape, median_after, strategies
from benchmarks.emulation import WARMUP, bucket_bytes
from benchmarks.two_hosts import Host, attached, goodput, hosts
from pdlab.cost.topology import parse_link
from pdlab.training import registry


def cases_at(world_size: int, wanted: str | None) -> list[tuple[str, str, str]]:
    """``(strategy, impl, model)`` of each case at ``world_size``: ``wanted`` ("dp:scratch,...")
    where it fits, else every strategy and impl that fits (experts with the model that has
    them)."""
    fits = strategies(world_size, list(registry.impls()))
    if wanted:
        chosen = {tuple(case.split(":")) for case in wanted.split(",")}
        fits = [case for case in fits if case in chosen]
    moe = {s: registry.layout_for(s, world_size).ep > 1 for s, _ in fits}
    return [(s, i, "moe" if moe[s] else "gpt") for s, i in fits]


EXCHANGE_BYTES = (16 << 10, 64 << 10, 256 << 10)


def _exchange_seconds() -> dict[str, float]:
    """On ranks 0 and 1 (others idle): median seconds of a p2p transfer of each of
    ``EXCHANGE_BYTES``, one way (0 to 1) and both ways at once (as 1F1B's activations and
    gradients, a ring's neighbours), each rank issuing its send first, then its receive
    first (gloo's receiver says it is ready behind what it already sends:
    ``pdlab.cost.emulation._Link``)."""
    import torch
    import torch.distributed as dist

    rank, seconds = dist.get_rank(), {}
    for nbytes in EXCHANGE_BYTES:
        sent, received = torch.ones(nbytes // 4), torch.empty(nbytes // 4)
        for way in ("one way", "both ways", "both ways, receives first"):
            times = []
            for _ in range(7):
                dist.barrier()
                start = time.perf_counter()
                ops = []
                if rank < 2:
                    send = dist.P2POp(dist.isend, sent, 1 - rank)
                    recv = dist.P2POp(dist.irecv, received, 1 - rank)
                    ops = {
                        "one way": [send] if rank == 0 else [recv],
                        "both ways": [send, recv],
                        "both ways, receives first": [recv, send],
                    }[way]
                for work in dist.batch_isend_irecv(ops) if ops else ():
                    work.wait()
                times.append(time.perf_counter() - start)
            seconds[f"{way} {nbytes >> 10} KB"] = statistics.median(times)
    return seconds


def on_hosts(on: list[Host], rate: str, cases: list, steps: int, repeats: int) -> list[dict]:
    """In the first host (the kernel's): each case on the attached ranks (real) and on local
    ranks emulating ``rate`` per rank, alternately; one row a case, median step times."""
    import pdlab

    def step_time(cluster: pdlab.Cluster, strategy: str, impl: str, model: str, **link) -> float:
        shape = emulated_shape(strategy, len(on))
        result = pdlab.train(cluster, strategy=strategy, impl=impl, model=model, steps=steps,
                             **shape, **link)  # fmt: skip
        return median_after(result.steps["step_time"], WARMUP)

    rows = []
    with (
        pdlab.Cluster(len(on), attach=True, host=on[0].address) as real,
        attached(real, on),
        pdlab.Cluster(len(on)) as emulated,
    ):
        # What the real link does to one transfer, beside what its bytes take at the rate.
        rows.append({"exchanges": real.run(_exchange_seconds)[1]})
        for strategy, impl, model in cases:
            row: dict = {"case": f"{strategy}/{impl} {model} w{len(on)}"}
            times: dict[str, list[float]] = {"real_s": [], "emulated_s": []}
            try:
                for _ in range(repeats):
                    times["real_s"].append(step_time(real, strategy, impl, model))
                    times["emulated_s"].append(step_time(emulated, strategy, impl, model, link=rate))  # fmt: skip
            except ValueError as refused:  # the model can't take it at this world size
                rows.append(row | {"skipped": str(refused)})
                continue
            rows.append(row | {column: statistics.median(s) for column, s in times.items()})
    return rows


def measure(rate: str, world_size: int, cases: list, steps: int, repeats: int) -> list[dict]:
    """Build ``world_size`` one-rank hosts at ``rate`` both ways, run the kernel in the first."""
    burst = bucket_bytes(parse_link(rate).bandwidth)
    with hosts(world_size, rate, burst=burst, receive_too=True) as on:
        payload = goodput(on[0], on[1]) * 8 / 1e6
        print(f"world {world_size}: one TCP stream between two hosts: {payload:.1f} Mbit/s")
        args = [sys.executable, "-m", "benchmarks.nic_per_rank", "--on-hosts",
                json.dumps([[h.__dict__ for h in on], rate, cases, steps, repeats])]  # fmt: skip
        run = on[0].run(*args, capture_output=True, text=True, timeout=3600)
        if run.returncode:
            raise RuntimeError(f"the kernel in host 0 failed:\n{run.stderr[-4000:]}")
        return json.loads(run.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="30Mbit/s")
    parser.add_argument("--world-sizes", default="2,3,4")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--cases", help="strategy:impl,... (default: every one that fits)")
    parser.add_argument("--on-hosts", help=argparse.SUPPRESS)  # the kernel, inside host 0
    args = parser.parse_args()
    if args.on_hosts:
        on, rate, cases, steps, repeats = json.loads(args.on_hosts)
        print(json.dumps(on_hosts([Host(**h) for h in on], rate, cases, steps, repeats)))
        return
    started = time.time()
    print(f"a NIC per rank at {args.rate} both ways (tbf) vs --link {args.rate}; "
          f"{args.steps} steps a run, median after {WARMUP}, median of {args.repeats}; "
          f"load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"{'case':<30} {'real tbf s':>10} {'emulated s':>10} {'emulated/real':>13}")
    ratios = []
    for world_size in (int(w) for w in args.world_sizes.split(",")):
        cases = cases_at(world_size, args.cases)
        bytes_per_s = parse_link(args.rate).bandwidth
        for row in measure(args.rate, world_size, cases, args.steps, args.repeats):
            if "exchanges" in row:
                print("  p2p between hosts 0 and 1, ms (bytes / rate):", ", ".join(
                    f"{what} {s * 1e3:.1f} ({(int(what.split()[-2]) << 10) / bytes_per_s * 1e3:.1f})"
                    for what, s in row["exchanges"].items()))  # fmt: skip
                continue
            if "skipped" in row:
                print(f"{row['case']:<30} skipped: {row['skipped']}")
                continue
            ratios.append(row["emulated_s"] / row["real_s"])
            print(f"{row['case']:<30} {row['real_s']:>10.4f} {row['emulated_s']:>10.4f} "
                  f"{ratios[-1]:>13.3f}", flush=True)  # fmt: skip
    within = sum(abs(r - 1) <= 0.15 for r in ratios)
    print(f"{within} of {len(ratios)} within 15%; median ratio {statistics.median(ratios):.3f}")
    print(f"{time.time() - started:.0f} s; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
