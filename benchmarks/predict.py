"""How close ``pdlab.predict`` comes to measured step times, for every strategy.

    python benchmarks/predict.py [--link 100Mbit/s] [--steps 12] [--repeats 3] [--world-sizes 2,4]

For each strategy (``--impls``, scratch by default) at each world size, two runs on one
cluster: (a) under an emulated slow link (``--link``, where communication dominates),
predicted for that link on this machine's compute; (b) without emulation, predicted on
this machine ("this-machine": link and matmuls calibrated on the same cluster just before).
Each run's step time is the median over its steps after ``WARMUP``; each cell the median over
``--repeats`` rounds (the machine's load drifts: rounds alternate all strategies). Prints
the table, the error of each prediction (predicted / measured - 1) and the median absolute
error of each mode, with the load average before and after. Without a link, also the top of
the band (``pdlab.cost.calibration.under_load``: the link refitted to the run's own ops, and
the ranks' steps begun as far apart as they were: ``Assumptions.staggered``) and
a verdict: "ok" within 25%, "band" between the prediction and that top, else "MISS".
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import batch_for, median_after, strategies

import pdlab
from pdlab.cost.calibration import calibrate, under_load
from pdlab.cost.predictor import BAND_TOP
from pdlab.training import registry

WARMUP = 2  # steps left out: the first counts FLOPs (slower) and warms every cache


def one_round(cluster: pdlab.Cluster, args: argparse.Namespace) -> dict:
    """(strategy, impl, mode) -> (measured, predicted) median step times, one run each."""
    calibration = calibrate(cluster)
    cells = {}
    for strategy, impl in strategies(cluster.world_size, args.impls.split(",")):
        run = dict(strategy=strategy, impl=impl, model=args.model, steps=args.steps)
        split = args.micro_batches if registry.get(strategy).micro_batched else 1
        run |= dict(micro_batches=split, batch_size=batch_for(cluster.world_size, args.micro_batches, args.batch_size))  # fmt: skip
        if strategy == "pp-interleaved":  # several model chunks a rank
            run["virtual_stages"] = 2
        for mode, link in (("emulated", args.link), ("this machine", None)):
            if mode not in args.modes:
                continue
            try:
                result = pdlab.train(cluster, link=link, **run)
            except ValueError as refused:  # this model can't take it at this world size
                print(f"skipped {strategy}/{impl} at world {cluster.world_size}: {refused}")
                break
            predicted = pdlab.predict(result, calibration=calibration)  # the run's link, or none
            # Without a link, the band's top: this machine's transport as the run met it, its
            # ranks starting their steps as apart as they did (the dashboard's ``with_band``).
            loaded = None if link else pdlab.predict(result, calibration=under_load(result, calibration), assumptions=BAND_TOP)  # fmt: skip
            cells[strategy, impl, mode] = (
                median_after(result.steps.step_time, WARMUP),
                median_after(predicted.step_time, WARMUP),
                median_after(loaded.step_time, WARMUP) if loaded is not None else float("nan"),
            )
    return cells


def verdict(measured: float, predicted: float, top: float) -> str:
    """ "ok" within 25%, "band" outside it but inside [predicted, top], else "MISS"."""
    if abs(predicted / measured - 1) <= 0.25:
        return "ok"
    return "band" if predicted <= measured <= top else "MISS"


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
    parser.add_argument("--modes", default="emulated,this machine", help="either or both")
    args = parser.parse_args()
    load = os.getloadavg()
    started = time.time()
    rows = []
    for world in map(int, args.world_sizes.split(",")):
        with pdlab.Cluster(world) as cluster:
            rounds = [one_round(cluster, args) for _ in range(args.repeats)]
        for key in rounds[0]:
            measured, predicted, top = (statistics.median(r[key][i] for r in rounds) for i in range(3))  # fmt: skip
            rows.append((*key, world, measured, predicted, predicted / measured - 1, top))
    print(
        f"{args.model}, batch {args.batch_size} (rounded up to a multiple of world × micro-batches), {args.micro_batches} micro-batches for "
        f"pipelines, {args.steps} steps ({WARMUP} left out), median of {args.repeats} rounds; "
        f"emulated link {args.link}"
    )
    print(f"\n{'strategy':<14} {'impl':<8} {'world':>5} {'mode':<13} {'measured ms':>11} {'predicted ms':>12} {'error':>7} {'band top ms':>11} verdict")  # fmt: skip
    for strategy, impl, mode, world, measured, predicted, error, top in sorted(
        rows, key=lambda r: (r[2], r[3], r[0])
    ):
        print(
            f"{strategy:<14} {impl:<8} {world:>5} {mode:<13} {measured * 1e3:>11.1f} "
            f"{predicted * 1e3:>12.1f} {error:>+7.0%} {top * 1e3:>11.1f} "
            f"{verdict(measured, predicted, top) if mode == 'this machine' else ''}"
        )
    for mode in args.modes.split(","):
        errors = [abs(r[6]) for r in rows if r[2] == mode]
        print(f"median |error|, {mode}: {statistics.median(errors):.0%} over {len(errors)} runs")
    verdicts = [verdict(r[4], r[5], r[7]) for r in rows if r[2] == "this machine"]
    print(f"this machine: {verdicts.count('ok')} within 25%, {verdicts.count('band')} in the band, {verdicts.count('MISS')} missed")  # fmt: skip
    print(
        f"load average (1, 5, 15 min): before {', '.join(f'{v:.2f}' for v in load)}; after "
        f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; {time.time() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
