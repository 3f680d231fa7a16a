"""``python -m pdlab run``: one training run from the shell, on a fresh ``pdlab.Cluster``.

    python -m pdlab run --strategy dp --impl scratch --world-size 2 --model mlp --steps 20
    python -m pdlab run --strategy tp --impl torch --world-size 2 --model gpt --json

``--json`` prints one JSON object a step, then ``{"summary": {...}}``; otherwise a table.
``--trace PATH`` also writes the run as a Chrome/Perfetto trace (see ``pdlab.measure.trace``).
``single`` runs in this process (no ranks are started).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import types
from dataclasses import asdict, fields, replace

from pdlab import checks
from pdlab.control import launcher
from pdlab.cost import emulation, planner
from pdlab.cost.predictor import predict
from pdlab.cost.topology import Topology
from pdlab.training.config import TrainConfig, choices, field_types
from pdlab.training.loop import TrainResult, train, validate

STEP_COLUMNS = [
    "step",
    "loss",
    "samples_per_s",
    "step_time",
    "predicted_step_time",  # pdlab.predict: for the --link given, on this machine's compute
    "comm_bytes",
    "expected_comm_bytes",
    "bus_bytes",
    "expected_bus_bytes",
    # what costs time on a link: bytes sent and received over all ranks, sent by the busiest
    "sent_bytes",
    "expected_sent_bytes",
    "received_bytes",
    "max_rank_sent_bytes",
    "expected_max_rank_sent_bytes",
    # counted by gloo's sockets, headers included (null where not measurable: NCCL)
    "wire_sent_bytes",
    "wire_received_bytes",
    "max_rank_wire_sent_bytes",
]


def _number(value: float) -> float | None:
    """``value``, or None (JSON's null) for NaN: a byte count that was not measured."""
    return None if math.isnan(value) else value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pdlab", description=__doc__.split("\n")[0])
    commands = p.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="train with one strategy and print its metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    kinds = field_types()
    for f in fields(TrainConfig):  # a flag for each field: --batch-size sets batch_size
        flag, kind = "--" + f.name.replace("_", "-"), kinds[f.name]
        if kind is bool:
            run.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        if isinstance(kind, types.UnionType) and bool in kind.__args__:  # ``--resume [VALUE]``
            run.add_argument(
                flag, nargs="?", const=True, default=f.default, help=f.metadata["help"]
            )
            continue
        if isinstance(kind, types.UnionType):  # ``str | None``: a str when given
            kind = next(k for k in kind.__args__ if k is not type(None))
        run.add_argument(
            flag, type=kind, default=f.default, choices=choices(f), help=f.metadata["help"]
        )
    run.set_defaults(world_size=2)  # a run from the shell starts a cluster: 2 ranks unless told
    run.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    run.add_argument(
        "--trace", metavar="PATH", help="write a Chrome/Perfetto trace of the run (JSON)"
    )
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
        "sent_bytes_per_step": float(steps.sent_bytes.median()),
        "max_rank_sent_bytes_per_step": float(steps.max_rank_sent_bytes.median()),
        "wire_sent_bytes_per_step": _number(steps.wire_sent_bytes.median()),
        "max_rank_wire_sent_bytes_per_step": _number(steps.max_rank_wire_sent_bytes.median()),
        "samples_per_s": float(steps.samples_per_s.median()),
        **({"emulation": emulation.summary(result.comm)} if result.config.link else {}),
    }


def _this_machine(world_size: int) -> Topology:
    from pdlab.control.cluster import Cluster
    from pdlab.cost.calibration import calibrate

    with Cluster(world_size) as cluster:
        return calibrate(cluster).topology


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "plan":
        return planner.run_command(args, _this_machine)
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    if config.strategy == "single":
        config = replace(config, world_size=1)
    try:  # everything that can be known before any rank starts
        validate(config)
        if args.trace:
            checks.writable_file(args.trace, "--trace")
        if config.strategy != "single":
            launcher.check_memory(config.world_size)
    except (ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        result = _train(config, args.json)
    except Exception as exc:  # a rank failed, or this machine: said in one line, not a traceback
        print(f"error: the run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    _show(result, args.json)
    if args.trace:
        try:
            result.trace(args.trace)
        except OSError as exc:  # the steps are printed above: only the trace is lost
            print(f"error: the trace could not be written to {args.trace}: {exc}", file=sys.stderr)
            return 1
    return 0


def _train(config: TrainConfig, as_json: bool) -> TrainResult:
    """Train ``config`` (on a new cluster unless it is ``single``), with each step's
    predicted time beside its measured one. If the ranks fail, the steps they finished are
    printed (their ``pdlab.log`` records) before the error goes on."""
    calibration = None
    if config.strategy == "single":
        result = train(config=config)
    else:
        from pdlab.control.cluster import Cluster
        from pdlab.cost.calibration import calibrate

        with Cluster(config.world_size) as cluster:
            try:
                result = train(cluster, config)
            except Exception:
                done = [r for r in cluster.metrics if r.get("rank") == 0 and "loss" in r]
                for r in done:
                    step = {"step": r["step"], "loss": r["loss"], "step_time": r["step_time"]}
                    print(
                        json.dumps(step)
                        if as_json
                        else " ".join(f"{k} {v:.6g}" for k, v in step.items())
                    )
                print(f"{len(done)} step(s) finished before the failure", file=sys.stderr)
                raise
            calibration = calibrate(cluster)  # this machine's link and matmuls, ~0.3 s
    predicted = predict(result, calibration=calibration)[["step", "step_time"]]
    result.steps = result.steps.merge(predicted, on="step", suffixes=("", "_predicted"))
    result.steps = result.steps.rename(columns={"step_time_predicted": "predicted_step_time"})
    return result


def _show(result: TrainResult, as_json: bool) -> None:
    if as_json:
        for row in result.steps[STEP_COLUMNS].to_dict("records"):
            print(
                json.dumps({k: _number(v) if isinstance(v, float) else v for k, v in row.items()})
            )
        print(json.dumps({"summary": summary(result)}))
    else:
        print(result.steps[STEP_COLUMNS].to_string(index=False))
        print("\n".join(f"{k}: {v}" for k, v in summary(result).items()))
