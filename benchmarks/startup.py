"""Start-up and round-trip cost of a pdlab cluster, against torchrun as the baseline.

    python benchmarks/startup.py [--repeats 3] [--calls 200]

Prints, in one invocation: cold start to the first barrier for world sizes 2 and 4 (pdlab and
torchrun, with the ratio) and the warm round trip of a ``run`` at world size 4 that does
nothing, prints a line, or logs a metric.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import pdlab

TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print(time.time(), flush=True)
    dist.barrier()  # gloo may abort a rank whose peer tore down first
    dist.destroy_process_group()
    """
)


def torchrun_to_barrier(world_size: int, script: str) -> float:
    """Seconds from launching torchrun until rank 0 has passed its first barrier."""
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={world_size}",
            "--standalone",
            script,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // world_size))},
    )
    return float(out.stdout.split()[-1]) - start


def pdlab_to_barrier(world_size: int) -> float:
    start = time.time()
    cluster = pdlab.Cluster(world_size, device="cpu")  # returns after every rank's barrier
    elapsed = time.time() - start
    cluster.shutdown()
    return elapsed


def _prints() -> None:
    print("hello")


def _logs() -> None:
    pdlab.log(value=1.0)


WARM_CALLS = {"no-op": int, "print": _prints, "pdlab.log": _logs}


def warm_round_trip_ms(world_size: int, calls: int) -> dict[str, float]:
    """Median ms of a warm ``run`` of each of ``WARM_CALLS``, on ``world_size`` ranks."""
    medians = {}
    with pdlab.Cluster(world_size, device="cpu") as cluster:
        for name, fn in WARM_CALLS.items():
            cluster.run(fn)
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the ranks' "[rank r] hello"
                    cluster.run(fn)
                times.append(time.perf_counter() - t)
            medians[name] = statistics.median(times) * 1000
    return medians


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()

    print(f"host: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCHRUN_SCRIPT)
    print(f"{'world':>5} {'pdlab start s':>14} {'torchrun s':>11} {'ratio':>6}")
    for world_size in (2, 4):
        ours = statistics.median(pdlab_to_barrier(world_size) for _ in range(args.repeats))
        base = statistics.median(
            torchrun_to_barrier(world_size, f.name) for _ in range(args.repeats)
        )
        print(f"{world_size:>5} {ours:>14.2f} {base:>11.2f} {ours / base:>6.2f}")
    os.unlink(f.name)
    medians = warm_round_trip_ms(4, args.calls)
    calls = ", ".join(f"{name} {ms:.3f} ms" for name, ms in medians.items())
    print(f"warm run, world 4, median over {args.calls} calls: {calls}")


if __name__ == "__main__":
    main()
