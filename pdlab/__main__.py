"""``python -m pdlab run``: one training run from the shell, on a fresh ``pdlab.Cluster``.

    python -m pdlab run --strategy dp --impl scratch --world-size 2 --model mlp --steps 20
    python -m pdlab run --strategy tp --impl torch --world-size 2 --model gpt --json

``--json`` prints one JSON object a step, then ``{"summary": {...}}``; otherwise a table.
``single`` runs in this process (no ranks are started).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from pdlab import planner
from pdlab.models import MODELS
from pdlab.parallel.base import IMPLS, OPTIMIZERS, STRATEGIES, TrainConfig
from pdlab.training import TrainResult, train, validate

RUN_FLAGS = (
    "strategy", "impl", "model", "steps", "batch_size", "micro_batches", "lr", "seed", "optimizer"
)  # fmt: skip
STEP_COLUMNS = [
    "step",
    "loss",
    "samples_per_s",
    "step_time",
    "comm_bytes",
    "expected_comm_bytes",
    "bus_bytes",
    "expected_bus_bytes",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdlab", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train with one strategy and print its metrics")
    defaults = TrainConfig()
    run.add_argument("--strategy", default=defaults.strategy, choices=STRATEGIES)
    run.add_argument("--impl", default=defaults.impl, choices=IMPLS)
    run.add_argument("--world-size", type=int, default=2, help="ranks (ignored by single)")
    run.add_argument("--model", default=defaults.model, choices=MODELS)
    run.add_argument("--steps", type=int, default=defaults.steps)
    run.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch")
    run.add_argument("--micro-batches", type=int, default=defaults.micro_batches)
    run.add_argument("--lr", type=float, default=defaults.lr)
    run.add_argument("--seed", type=int, default=defaults.seed)
    run.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    run.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    planner.add_command(commands)
    return p


def summary(result: TrainResult) -> dict:
    steps = result.steps
    return {
        **asdict(result.config),
        "final_loss": result.final_loss,
        "max_rank_param_bytes": result.max_rank_param_bytes,
        "comm_bytes_per_step": float(steps.comm_bytes.median()),
        "expected_comm_bytes_per_step": float(steps.expected_comm_bytes.iloc[0]),
        "samples_per_s": float(steps.samples_per_s.median()),
    }


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plan":
        return planner.run_command(args)
    kwargs = {name: getattr(args, name) for name in RUN_FLAGS}
    world = 1 if args.strategy == "single" else args.world_size
    try:
        validate(TrainConfig(**kwargs, world_size=world))  # before starting any rank
    except (ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.strategy == "single":
        result = train(**kwargs)
    else:
        from pdlab.cluster import Cluster

        with Cluster(world) as cluster:
            result = train(cluster, **kwargs)
    if args.json:
        for row in result.steps[STEP_COLUMNS].to_dict("records"):
            print(json.dumps(row))
        print(json.dumps({"summary": summary(result)}))
    else:
        print(result.steps[STEP_COLUMNS].to_string(index=False))
        print("\n".join(f"{k}: {v}" for k, v in summary(result).items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
