"""A torchrun script run warm with ``Cluster.run_script``, against torchrun starting it cold.

    python benchmarks/scripts.py [--repeats 5] [--world-size 2]

The script is lab 00's DDP toy (``labs/scripts/ddp_toy/train.py``, 3 epochs), unchanged in
both: torchrun starts its ranks, imports torch and forms the group every time; pdlab runs it
on ranks that are up already. Prints the median wall time of each and the ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pdlab

SCRIPT = Path(__file__).resolve().parent.parent / "labs" / "scripts" / "ddp_toy"
ARGS = ["3", "--batch-size", "20"]


def torchrun_seconds(folder: Path, world_size: int) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc-per-node={world_size}", "train.py", *ARGS],
        cwd=folder, capture_output=True, check=False,  # gloo may abort in teardown (FACTS.md)
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size))},
    )  # fmt: skip
    return time.perf_counter() - start


def run_script_seconds(cluster: pdlab.Cluster, folder: Path) -> float:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        cluster.run_script(folder / "train.py", *ARGS)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    folder = Path(shutil.copytree(SCRIPT, Path(tempfile.mkdtemp()) / "ddp_toy"))
    os.chdir(folder)  # where torchrun runs it, and so the ranks: its snapshot lands there
    with pdlab.Cluster(args.world_size, device="cpu") as cluster:
        run_script_seconds(cluster, folder)  # the first run imports DDP on the ranks
        ours, base = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine
            base.append(torchrun_seconds(folder, args.world_size))
            ours.append(run_script_seconds(cluster, folder))
    shutil.rmtree(folder.parent)
    ours_s, base_s = statistics.median(ours), statistics.median(base)
    print(
        f"{SCRIPT.name}/train.py {' '.join(ARGS)}, world {args.world_size}, median of "
        f"{args.repeats}: warm run_script {ours_s:.3f} s, torchrun {base_s:.3f} s, "
        f"ratio {ours_s / base_s:.3f}"
    )


if __name__ == "__main__":
    main()
