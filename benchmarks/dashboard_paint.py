"""What one repaint of the dashboard costs with many runs, folded and not, in one invocation.

    python benchmarks/dashboard_paint.py [--runs 20] [--repeats 10]

Trains ``--runs`` short runs from a ``pdlab.Dashboard`` (as a learner clicking Start 20 times
would), then times ``Dashboard._paint`` of the last run, what the painter thread does each
time new steps arrive: build every plot, predict, and send the figure to the widget (here no
browser listens, so the time is the kernel's part). Beside it, the same paint with every run
plotted (``PLOTTED_RUNS`` raised past ``--runs``): the dashboard before it folded old runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pdlab
from pdlab.lab import dashboard as dashboards


def paint_seconds(board: pdlab.Dashboard, repeats: int) -> float:
    run = board.runs[-1]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        board._paint(run)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}")
    with pdlab.Cluster(2) as cluster:
        board = pdlab.Dashboard(cluster)
        for i in range(args.runs):
            board.start(strategy=("dp", "tp", "pp-1f1b", "zero1")[i % 4], model="gpt", steps=20,
                        batch_size=16, micro_batches=2)  # fmt: skip
            board.wait()
        folded = paint_seconds(board, args.repeats)
        folding = dashboards.PLOTTED_RUNS
        dashboards.PLOTTED_RUNS = args.runs + 1
        every = paint_seconds(board, args.repeats)
        dashboards.PLOTTED_RUNS = folding
        board.close()
    print(f"one repaint with {args.runs} runs, median of {args.repeats}:")
    print(f"  the latest {folding} plotted: {folded * 1e3:7.0f} ms")
    print(f"  all {args.runs} plotted:      {every * 1e3:7.0f} ms  ({every / folded:.1f}x)")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
