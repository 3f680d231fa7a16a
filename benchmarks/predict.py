"""How close ``pdlab.predict`` comes to measured step times, for every strategy.

    python benchmarks/predict.py [--link 100Mbit/s] [--steps 12] [--repeats 3] [--world-sizes 2,4]

For each strategy (``--impls``, scratch by default) at each world size, two runs on one
cluster: (a) under an emulated slow link (``--link``, where communication dominates),
predicted for that link on this machine's compute; (b) without emulation, predicted on
this machine ("this-machine": link and matmuls calibrated on the same cluster just before).
Each run's step time is the median over its steps after ``WARMUP``; each cell the median over
``--repeats`` rounds (the machine's load drifts: rounds alternate all strategies). Prints
the table, the error of each prediction (predicted / measured - 1) and the median absolute
error of each mode, with the load average before and after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import median_after

import pdlab
from pdlab.cost.calibration import calibrate
from pdlab.training import registry

WARMUP = 2  # steps left out: the first counts FLOPs (slower) and warms every cache


def strategies(world: int, impls: list[str]) -> list[tuple[str, str]]:
    """Every registered (strategy, impl) but ``single`` that runs at ``world`` ranks on CPU."""
    found = []
    for name in registry.names():
        strategy = registry.get(name)
        if name != "single" and strategy.fits(world):
            found += [(name, impl) for impl in impls if impl in strategy.impls]
    return found


def one_round(cluster: pdlab.Cluster, args: argparse.Namespace) -> dict:
    """(strategy, impl, mode) -> (measured, predicted) median step times, one run each."""
    calibration = calibrate(cluster)
    cells = {}
    for strategy, impl in strategies(cluster.world_size, args.impls.split(",")):
        run = dict(strategy=strategy, impl=impl, model=args.model, steps=args.steps)
        split = args.micro_batches if registry.get(strategy).micro_batched else 1
        run |= dict(micro_batches=split, batch_size=args.batch_size)
        for mode, link in (("emulated", args.link), ("this machine", None)):
            result = pdlab.train(cluster, link=link, **run)
            predicted = pdlab.predict(result, calibration=calibration)  # the run's link, or none
            cells[strategy, impl, mode] = (
                median_after(result.steps.step_time, WARMUP),
                median_after(predicted.step_time, WARMUP),
            )
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--link", default="100Mbit/s", help="the emulated slow link of mode (a)")
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--world-sizes", default="2,4")
    parser.add_argument("--impls", default="scratch", help="e.g. scratch,torch")
    args = parser.parse_args()
    load = os.getloadavg()
    started = time.time()
    rows = []
    for world in map(int, args.world_sizes.split(",")):
        with pdlab.Cluster(world) as cluster:
            rounds = [one_round(cluster, args) for _ in range(args.repeats)]
        for key in rounds[0]:
            measured = statistics.median(r[key][0] for r in rounds)
            predicted = statistics.median(r[key][1] for r in rounds)
            rows.append((*key, world, measured, predicted, predicted / measured - 1))
    print(
        f"{args.model}, batch {args.batch_size}, {args.micro_batches} micro-batches for "
        f"pipelines, {args.steps} steps ({WARMUP} left out), median of {args.repeats} rounds; "
        f"emulated link {args.link}"
    )
    print(f"\n{'strategy':<9} {'impl':<8} {'world':>5} {'mode':<13} {'measured ms':>11} {'predicted ms':>12} {'error':>7}")  # fmt: skip
    for strategy, impl, mode, world, measured, predicted, error in sorted(
        rows, key=lambda r: (r[2], r[3], r[0])
    ):
        print(
            f"{strategy:<9} {impl:<8} {world:>5} {mode:<13} {measured * 1e3:>11.1f} "
            f"{predicted * 1e3:>12.1f} {error:>+7.0%}"
        )
    for mode in ("emulated", "this machine"):
        errors = [abs(r[6]) for r in rows if r[2] == mode]
        print(f"median |error|, {mode}: {statistics.median(errors):.0%} over {len(errors)} runs")
    print(
        f"load average (1, 5, 15 min): before {', '.join(f'{v:.2f}' for v in load)}; after "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.time() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
