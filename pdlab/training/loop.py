"""Training on ranks: one loop for every strategy, with its communication and memory measured.

From a notebook (the ranks are the processes of a ``pdlab.Cluster``)::

    with pdlab.Cluster(2) as cluster:
        result = pdlab.train(cluster, strategy="dp", impl="scratch", model="mlp", steps=20)
    result.steps   # per step: loss, samples/s, comm and bus bytes, measured and expected
    result.ranks   # per step and rank: loss, step time, bytes by op and group, memory
    result.comm    # every communication op every rank issued

From a shell: ``python -m pdlab run --strategy dp --world-size 2``. Under plain torchrun,
call ``run_on_rank(TrainConfig(...))`` on every rank.

``single`` needs no cluster: without one it runs in this process; with one it runs on rank
0 alone (the other ranks idle), so its timings come from the same kind of process, with the
same CPU threads, as the parallel runs it is compared with.

Each strategy lives in ``pdlab/parallel/`` (see README.md there) and is registered with one
line in ``pdlab/parallel/registry.py``, from which ``validate`` takes the strategies, their
impls and rank grids; if its class defines ``check(config, layout)``, ``validate`` calls it,
so its errors surface before any rank starts work.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
import torch
import torch.distributed as dist

from pdlab import checks, compat
from pdlab.control import runtime, warmup
from pdlab.measure import memory, wire
from pdlab.measure.comm import CommEvent, CommMeter, LinkModel, algorithms
from pdlab.measure.flops import FlopCounter
from pdlab.measure.trace import StepSpans
from pdlab.training import checkpoint, registry
from pdlab.training.config import TrainConfig, choices, keywords, with_overrides
from pdlab.training.data import BLOCK_SIZE, load_dataset
from pdlab.training.layout import DIMS, Layout
from pdlab.training.models import MODELS, routing
from pdlab.training.parallel.base import Implementation, Mesh, model_for
from pdlab.training.registry import layout_for


def validate(config: TrainConfig) -> None:
    """Raise ValueError (NotImplementedError for a strategy not built yet) saying what to change."""
    for f in fields(config):
        options, value = choices(f), getattr(config, f.name)
        if options is not None and value not in options:
            raise ValueError(f"unknown {f.name} {value!r}: choose one of {', '.join(options)}")
    for name, least in (
        ("steps", 1), ("batch_size", 1), ("micro_batches", 1), ("seed", 0)
    ):  # fmt: skip
        checks.whole(getattr(config, name), name, least)
    checks.whole(config.checkpoint_every, "checkpoint_every", 0)  # 0: never
    if (config.checkpoint_every or config.resume) and config.precision != "fp32":
        raise ValueError(
            f"checkpoints hold fp32 runs: precision={config.precision!r} keeps fp32 master "
            "weights in its optimizer, which pdlab's checkpoints don't save yet: use "
            "precision='fp32' to checkpoint"
        )
    if (config.checkpoint_every or config.resume) and not config.checkpoint_dir:
        raise ValueError("checkpoint_every and resume need a checkpoint_dir all ranks can reach")
    checkpoint.check(config)  # its folder; resume's value; resuming, steps must go past it
    checks.number(config.lr, "lr", above=0)
    if (links := _link_emulation(config)) is not None:
        links.parse(config.link)
    checks.whole(config.seq_len, "seq_len", 1)
    if config.seq_len != BLOCK_SIZE and config.model not in ("gpt", "moe"):
        raise ValueError(
            f"seq_len={config.seq_len} sets the context of the gpt and the moe; model "
            f"{config.model!r} reads points, not sequences: use model='gpt', or leave seq_len "
            f"at {BLOCK_SIZE}"
        )
    if config.recompute != "none" and config.model == "moe":
        raise ValueError(
            f"recompute={config.recompute!r} would route the moe model's tokens twice (and "
            "send them twice under ep): pdlab recomputes the gpt's blocks only, use "
            "model='gpt' or recompute='none'"
        )
    if config.recompute != "none" and config.model != "gpt":
        raise ValueError(
            f"recompute={config.recompute!r} recomputes the gpt's transformer blocks; model "
            f"{config.model!r} has none: use model='gpt', or recompute='none'"
        )
    strategy = registry.get(config.strategy)
    if config.model == "moe" and config.strategy not in registry.MOE_STRATEGIES:
        raise ValueError(
            f"strategy {config.strategy!r} doesn't know the moe model's experts: train "
            f"model 'moe' with one of {', '.join(registry.MOE_STRATEGIES)}"
        )
    if config.micro_batches != 1 and not strategy.micro_batched:
        raise ValueError(
            f"micro_batches={config.micro_batches} applies to pipelines only "
            f"({', '.join(registry.micro_batched())}); strategy {config.strategy!r} computes "
            "each rank's batch at once: leave micro_batches at 1"
        )
    if config.virtual_stages is not None:
        checks.whole(config.virtual_stages, "virtual_stages", 1)
    strategy.chunks_per_rank(config.virtual_stages)
    strategy.check_world_size(config.world_size)
    layout = strategy.layout(config.world_size)
    if config.batch_size % layout.dp:
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {layout.dp} data-parallel "
            f"ranks: use a multiple of {layout.dp}, e.g. {-(-config.batch_size // layout.dp) * layout.dp}"
        )
    if config.vocab_parallel and layout.tp == 1:
        raise ValueError(
            f"vocab_parallel splits the vocabulary over tensor-parallel ranks; strategy "
            f"{config.strategy!r} has none: use strategy 'tp' or 'tp-sp', or vocab_parallel=False"
        )
    cls = strategy.implementation(config.impl)
    if hasattr(cls, "check"):
        cls.check(config, layout)


def strategy_class(config: TrainConfig) -> type[Implementation]:
    """The class implementing ``config.strategy`` with ``config.impl``."""
    return registry.get(config.strategy).implementation(config.impl)


def expected_comm(config: TrainConfig, backend: str = "gloo") -> list[CommEvent]:
    """The analytic communication of one step, over all ranks; sent and received bytes on
    ``backend``'s algorithms (``pdlab.measure.comm.traffic``)."""
    with algorithms(backend):
        return strategy_class(config).expected_comm(
            config, layout_for(config.strategy, config.world_size)
        )


# ---- on every rank -----------------------------------------------------------------------

_meshes: dict[tuple[Layout, torch.device], Mesh] = {}  # groups are made once per process


def mesh_for(layout: Layout, device: torch.device) -> Mesh:
    """This process's mesh for ``layout``, built on first use (groups are made once)."""
    if (layout, device) not in _meshes:
        _meshes[layout, device] = Mesh.create(layout, device)
    return _meshes[layout, device]


def wire_reading() -> dict[str, tuple[int, int]] | None:
    """This rank's TCP connections' byte counters (``pdlab.measure.wire``), its connection to the
    kernel left out; None where they don't hold the strategy's traffic: NCCL moves its bytes
    over its own transports, a process outside a group sends none."""
    if not (dist.is_initialized() and dist.get_backend() == "gloo"):
        return None
    return wire.connections(runtime.control_fds())


class LinkEmulation(Protocol):
    """What the trainer asks of a link emulator for ``link=``. ``pdlab.cost.emulation`` plugs
    itself in (``link_emulation``) when imported: the cost model sits a layer above training."""

    def parse(self, spec: str) -> object:
        """The link ``spec`` names; a ValueError that says what's wrong if it names none."""

    def emulating(
        self, spec: str, group: dist.ProcessGroup | None, device: torch.device
    ) -> AbstractContextManager[LinkModel]:
        """On every rank at once: a model of ``spec`` delaying the ops of the block."""

    def faster_than_here(self, comm: pd.DataFrame, link: str) -> str | None:
        """A warning if ``link`` is faster than the transport it was emulated on."""


link_emulation: LinkEmulation | None = None  # set by pdlab.cost.emulation on import


def _link_emulation(config: TrainConfig) -> LinkEmulation | None:
    if config.link is None:
        return None
    if link_emulation is None:
        raise RuntimeError(
            f"link={config.link!r} needs the link emulator: import pdlab.cost.emulation "
            "first (pdlab.train, the dashboard and the command line do)"
        )
    return link_emulation


def run_on_rank(
    config: TrainConfig, full_state: bool = False, emulating: Any = None
) -> dict[str, Any]:
    """Train ``config`` on this rank; every rank of the group calls it (one process: single).

    Logs one ``pdlab.log`` record a step (loss, samples, step_time, comm events, memory,
    timeline) and returns them, this rank's final memory, and (rank 0, ``full_state``) the
    full trained parameters under the single-process names. Rank 0 also logs ``phase``
    records ("building the model", "first step") for a dashboard to show while it waits.
    ``emulating``: ``link_emulation.emulating``, where ``config.link`` is set.
    """
    validate(config)
    announce = runtime.rank() == 0
    if announce:
        runtime.log(phase="building the model")
    layout = layout_for(config.strategy, config.world_size)
    if layout.world_size > 1 and runtime.world_size() != layout.world_size:
        raise ValueError(
            f"config.world_size is {config.world_size} but this process group has "
            f"{runtime.world_size()} ranks"
        )
    device = runtime.device()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not the process's
    mesh = mesh_for(layout, device)
    data = load_dataset(config.model, config.seed, block_size=config.seq_len)
    strategy = strategy_class(config)(model_for(config), config, mesh)
    first = checkpoint.resume(strategy, config)
    names = {mesh.group(d): d for d in DIMS if getattr(layout, d) > 1}
    dispatch = not strategy.counts_own_comm
    time_receives = config.impl in registry.get(config.strategy).receives_ahead
    spans = StepSpans(strategy)  # forward, backward and optimizer times, for traces
    records = []
    counted = None  # (FLOPs, kernels) of this rank's first step: a counted step runs slower
    group = dist.group.WORLD if layout.world_size > 1 else None  # the run's ranks
    link = emulating(config.link, group, device) if emulating else contextlib.nullcontext()
    with link as emulator:
        for step in range(first, config.steps):
            if announce and step == first:
                runtime.log(phase="first step")
            x, y = data.batch(
                step, config.batch_size, shard=mesh.data_shard, num_shards=layout.data_shards
            )
            counter = FlopCounter() if counted is None else contextlib.nullcontext()
            before = wire_reading()
            began, start = time.time(), time.perf_counter()
            saved = memory.SavedTensors()
            with (
                spans.step() as timed,
                CommMeter(dispatch, names, emulator, time_receives) as meter,
                counter,
            ):
                with saved:
                    out = strategy.train_step(x.to(device), y.to(device))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the step is done when the GPU is
            step_time = time.perf_counter() - start
            after = wire_reading()
            counted = counted or (counter.flops, counter.kernels)
            record = {
                "strategy": config.strategy,
                "impl": config.impl,
                "step": step,
                "loss": out.loss,
                "samples": out.samples,
                "step_time": step_time,
                "began": began,  # wall clock: ranks of one host compare (Assumptions.staggered)
                "busy": meter.busy,  # seconds computing, not blocked on communication
                "flops": counted[0],  # this rank's FLOPs and kernels a step (pdlab.measure.flops)
                "kernels": counted[1],
                "comm": [asdict(e) for e in meter.events],
                # Bytes sent on each TCP connection (None: not measurable, see wire_reading).
                "wire": None if before is None or after is None else wire.sent_since(before, after),
                "memory": memory.measure(strategy.module, strategy.optimizer, device, saved.peak),
                "timeline": out.timeline,
                "spans": timed,
                "routing": routing(strategy.module),  # tokens per expert a MoE layer, or []
            }
            runtime.log(**record)
            records.append(record)
            if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
                checkpoint.save(
                    strategy, config.checkpoint_dir, step + 1, alone=layout.world_size == 1
                )
    spans.close()
    state = strategy.full_state_dict() if full_state else None  # a collective: all ranks
    return {
        "rank": mesh.rank,
        "records": records,
        "memory": memory.measure(
            strategy.module,
            strategy.optimizer,
            device,
            records[-1]["memory"]["activation_bytes"] if records else 0,  # the last step's
        ),
        "state_dict": state if mesh.rank == 0 else None,
    }


def _first_step(model: str) -> None:
    """One local step of ``model`` (``single``: no process group): what a rank's first run of
    it pays once a process (building it, the first autograd pass and Adam step, its data
    set), paid while the rank is idle (``pdlab.control.warmup.first_use``)."""
    config = TrainConfig(strategy="single", model=model, batch_size=8)
    device = runtime.device()
    strategy = strategy_class(config)(model_for(config), config, mesh_for(Layout(), device))
    x, y = load_dataset(model, config.seed).batch(0, config.batch_size)
    strategy.train_step(x.to(device), y.to(device))


def _first_dtensor_step(model: str) -> None:
    """One default-sized tp/torch step of ``model`` over every rank under FakeTensorMode:
    DTensor's sharding propagation for each op and shape it meets (0.3 s of a first tp/torch
    run at 4 ranks here: 0.69 s against 0.35 s), which torch caches per thread, paid on the
    rank's main thread while it idles. Fake tensors: no collective runs."""
    world = runtime.world_size()
    if world < 2 or not compat.parallelizes_in_place():  # before torch 2.7 sharding scatters
        return
    config = TrainConfig(strategy="tp", impl="torch", model=model, world_size=world)
    validate(config)
    layout = layout_for(config.strategy, world)
    device = runtime.device()
    names, sizes = Mesh.grid(layout)
    device_mesh = compat.mesh_without_groups(device.type, sizes, names)
    mesh = Mesh(layout, device, device_mesh, runtime.rank())
    strategy = strategy_class(config)(model_for(config), config, mesh)  # shards without sending
    x, y = load_dataset(model, config.seed).batch(0, config.batch_size)
    with compat.fake_tensors(), warmup.yielding():
        strategy.train_step(x.to(device), y.to(device))


for _model in MODELS:
    warmup.first_use(f"a first {_model} step", functools.partial(_first_step, _model))
    warmup.first_use(
        f"a first tp/torch {_model} step",
        functools.partial(_first_dtensor_step, _model),
        main_thread=True,
    )


# ---- in the kernel -----------------------------------------------------------------------

# Columns of ``TrainResult.ranks`` summed from a rank's comm events: column -> event field.
COMM_COLUMNS = {
    "comm_bytes": "payload_bytes",
    "bus_bytes": "bus_bytes",
    "sent_bytes": "sent_bytes",
    "received_bytes": "received_bytes",
    "comm_seconds": "seconds",
}


@dataclass
class TrainResult:
    """A finished run as tables (see ``pdlab.train``)."""

    config: TrainConfig
    # One row a step: loss, samples_per_s; bytes: payload (comm_bytes), bus, sent and received
    # over all ranks, sent by the busiest rank, each beside its formula (expected_*); on the
    # wire (wire_*: NaN where not measurable). See pdlab.measure.comm for the conventions.
    steps: pd.DataFrame
    ranks: pd.DataFrame  # one row a step and rank (began: its wall clock at the step's start)
    comm: pd.DataFrame  # one row a communication op
    memory: pd.DataFrame  # one row a rank, after the last step
    expected_comm: list[CommEvent]
    state_dict: dict[str, torch.Tensor] | None  # rank 0's full parameters, if asked for
    final_loss: float
    max_rank_param_bytes: int
    # Pipelines: {"rank", "step", "timeline": [F/B events]} a rank and step (pdlab.lab.plots.timeline)
    timeline: list[dict]
    # One row a compute span a step and rank: forward/backward (per micro-batch), optimizer,
    # and the whole step; start, end (time.time()) and the thread's CPU seconds (pdlab.measure.trace)
    spans: pd.DataFrame = field(default_factory=pd.DataFrame)
    clock_offsets: dict[int, float] = field(default_factory=dict)  # attached ranks' clocks
    backend: str = "gloo"  # the ranks' (whose algorithms' bytes a link carried)
    # MoE models: one row a step, rank, layer and expert: the tokens that rank routed to it
    routing: pd.DataFrame = field(default_factory=pd.DataFrame)
    # Strategies whose bytes depend on the routing (ep): each step's expected_comm, the
    # static part plus the all-to-alls computed from that step's routing (``routed_comm``)
    expected_by_step: dict[int, list[CommEvent]] = field(default_factory=dict)

    def bubble(self) -> pd.DataFrame:
        """Pipelines: each step's measured bubble (the ranks' idle over busy time, from
        ``timeline``) beside its schedule's formula with equal stage times: columns step,
        measured, formula and expected (``pdlab.training.parallel.pipeline.BUBBLE``)."""
        from pdlab.training.parallel import pipeline

        return pipeline.bubbles(self.config, self.timeline)

    def trace(self, path: str | Path) -> Path:
        """Write the run as a Chrome/Perfetto trace (open it at https://ui.perfetto.dev):
        a process per rank, its compute and communication spans on their own tracks."""
        from pdlab.measure import trace

        return trace.write(trace.chrome_trace(self), path)

    def __repr__(self) -> str:
        c, steps = self.config, self.steps
        wire_sent = steps.wire_sent_bytes.mean()
        on_wire = "" if pd.isna(wire_sent) else f", on the wire {wire_sent:.0f}"
        return (
            f"TrainResult({c.strategy}/{c.impl}, {c.model}, world_size={c.world_size}, "
            f"steps={c.steps}, final_loss={self.final_loss:.4f}, bytes sent/step: busiest "
            f"rank {steps.max_rank_sent_bytes.mean():.0f}, all ranks "
            f"{steps.sent_bytes.mean():.0f}{on_wire})"
        )


def results(
    config: TrainConfig, outputs: list[dict], expected: list[CommEvent], backend: str = "gloo"
) -> TrainResult:
    """Tables from what the ranks returned (or logged so far: the dashboard builds live ones),
    run on ``backend``."""
    rows, ops, spans, routed = [], [], [], []
    wire_sent: dict[int, dict[int, dict[str, int]]] = {}  # step -> rank -> its connections
    for out in outputs:
        for rec in out["records"]:
            where = {"step": rec["step"], "rank": out["rank"]}
            ops += [{**e, **where} for e in rec["comm"]]
            spans += [{**where, **span} for span in rec["spans"]]
            routed += [
                {**where, "layer": layer, "expert": e, "tokens": n}
                for layer, counts in enumerate(rec.get("routing", []))
                for e, n in enumerate(counts)
            ]
            row = {
                **where,
                **{
                    k: rec[k]
                    for k in ("loss", "samples", "step_time", "began", "busy", "flops", "kernels")
                },
            }
            row["samples_per_s"] = rec["samples"] / rec["step_time"]
            for column, key in COMM_COLUMNS.items():
                row[column] = sum(e[key] for e in rec["comm"])
            for e in rec["comm"]:
                key = f"{e['op']}@{e['group']}"
                row[key] = row.get(key, 0) + e["payload_bytes"]
            if rec.get("wire") is not None:
                wire_sent.setdefault(rec["step"], {})[out["rank"]] = rec["wire"]
            rows.append(row | rec["memory"])
    # What a rank received in a step is what its peers sent it in theirs (pdlab.measure.wire).
    wire_received = {step: wire.received_from_peers(sent) for step, sent in wire_sent.items()}
    for row in rows:
        sent = wire_sent.get(row["step"], {}).get(row["rank"])
        row["wire_sent_bytes"] = math.nan if sent is None else sum(sent.values())
        row["wire_received_bytes"] = (
            math.nan if sent is None else wire_received[row["step"]][row["rank"]]
        )
    ranks = pd.DataFrame(rows)
    ranks = ranks.fillna({c: 0 for c in ranks.columns if "@" in c})
    columns = dict.fromkeys(["step", "rank", *(f.name for f in fields(CommEvent))])
    comm = pd.DataFrame(ops, columns=list(columns))
    routing = pd.DataFrame(routed, columns=["step", "rank", "layer", "expert", "tokens"])
    by_step = routed_expected(config, expected, outputs)

    def aggregate(g: pd.DataFrame) -> pd.Series:
        reported = g[g.loss.notna()]
        step_time = g.step_time.max()
        expected_now = by_step.get(g.name, expected)
        return pd.Series(
            {
                "loss": (reported.loss * reported.samples).sum() / reported.samples.sum(),
                "step_time": step_time,
                "samples_per_s": config.batch_size / step_time,
                "comm_bytes": g.comm_bytes.sum(),
                "bus_bytes": g.bus_bytes.sum(),
                "expected_comm_bytes": sum(e.payload_bytes for e in expected_now),
                "expected_bus_bytes": sum(e.bus_bytes for e in expected_now),
                "sent_bytes": g.sent_bytes.sum(),
                "received_bytes": g.received_bytes.sum(),
                "max_rank_sent_bytes": g.sent_bytes.max(),
                "expected_sent_bytes": sum(e.sent_bytes for e in expected_now),
                "expected_max_rank_sent_bytes": busiest_rank_sent(expected_now),
                # NaN unless every rank's bytes were measured
                "wire_sent_bytes": g.wire_sent_bytes.sum(min_count=len(g)),
                "wire_received_bytes": g.wire_received_bytes.sum(min_count=len(g)),
                "max_rank_wire_sent_bytes": g.wire_sent_bytes.max(skipna=False),
            }
        )

    steps = ranks.groupby("step")[ranks.columns.drop("step")].apply(aggregate).reset_index()
    mem = pd.DataFrame([{"rank": out["rank"], **out["memory"]} for out in outputs])
    return TrainResult(
        config,
        steps,
        ranks,
        comm,
        mem,
        expected,
        outputs[0]["state_dict"],
        float(steps.loss.iloc[-1]),
        int(mem.param_bytes.max()),
        [
            {"rank": out["rank"], "step": rec["step"], "timeline": rec["timeline"]}
            for out in outputs
            for rec in out["records"]
            if rec["timeline"]
        ],
        pd.DataFrame(spans, columns=["step", "rank", "name", "mb", "start", "end", "cpu"]),
        backend=backend,
        routing=routing,
        expected_by_step=by_step,
    )


def busiest_rank_sent(expected: list[CommEvent]) -> float:
    """The bytes the busiest rank sends in ``expected``; NaN for a formula that doesn't say
    which rank issues what (it can't name the busiest rank)."""
    per_rank: dict[int | None, float] = {}
    for e in expected:
        per_rank[e.rank] = per_rank.get(e.rank, 0.0) + e.sent_bytes
    return math.nan if None in per_rank else max(per_rank.values(), default=0.0)


def routed_expected(
    config: TrainConfig, expected: list[CommEvent], outputs: list[dict]
) -> dict[int, list[CommEvent]]:
    """``{step: expected_comm}`` where a strategy's bytes depend on its routing (its class
    has ``routed_comm``): ``expected`` plus the all-to-alls of that step's routing, for the
    steps every rank has logged; {} for other strategies."""
    routed = getattr(strategy_class(config), "routed_comm", None)
    if routed is None:
        return {}
    layout = layout_for(config.strategy, config.world_size)
    logged: dict[int, dict[int, list[list[int]]]] = {}
    for out in outputs:
        for rec in out["records"]:
            logged.setdefault(rec["step"], {})[out["rank"]] = rec["routing"]
    return {
        step: expected + routed(config, layout, routing)
        for step, routing in logged.items()
        if len(routing) == layout.world_size
    }


# train takes these from its cluster, not as keywords
FROM_THE_CLUSTER = {"world_size": "comes from the cluster: train on a pdlab.Cluster of that size"}


def train(
    cluster: Any = None,
    config: TrainConfig | None = None,
    *,
    full_state: bool = False,
    timeout: float | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train ``config`` on every rank of ``cluster`` (a ``pdlab.Cluster``), with the
    ``TrainConfig`` fields given as keywords replaced: ``train(cluster, strategy="dp")``.

    ``world_size`` is the cluster's (1 for ``single``, which runs without a cluster, in this
    process, or on a cluster's rank 0). The config is validated here, before any rank does
    work. ``full_state=True`` also returns the trained parameters (``result.state_dict``) to
    compare with another run.
    """
    if isinstance(cluster, TrainConfig):
        raise TypeError("the config comes second: train(cluster, config), or train(config=config)")
    timeout = checks.timeout(timeout)  # a bad one would time out at once, then restart
    config = with_overrides(config or TrainConfig(), overrides, FROM_THE_CLUSTER)
    single = cluster is None or config.strategy == "single"
    config = replace(config, world_size=1 if single else cluster.world_size)
    validate(config)
    expected = expected_comm(config, "gloo" if cluster is None else cluster.backend)
    links = _link_emulation(config)
    emulating = links.emulating if links else None  # shipped by reference: ranks import it
    if cluster is None:
        outputs = [run_on_rank(config, full_state, emulating)]
    else:
        ranks = [0] if config.strategy == "single" else None
        outputs = cluster.run(
            run_on_rank, config, full_state, emulating, ranks=ranks, timeout=timeout
        )
    result = results(config, outputs, expected, "gloo" if cluster is None else cluster.backend)
    if links and (note := links.faster_than_here(result.comm, config.link)):
        warnings.warn(note, stacklevel=2)
    if cluster is not None and cluster.attach:
        result.clock_offsets = cluster.clock_offsets()
    return result


# help(train) and Jupyter's tooltip list TrainConfig's fields (with their defaults) as keywords.
_written = inspect.signature(train, eval_str=True)
train.__signature__ = _written.replace(
    parameters=[
        _written.parameters["cluster"],
        _written.parameters["config"],
        *keywords(leave_out=FROM_THE_CLUSTER),
        _written.parameters["full_state"],
        _written.parameters["timeout"],
    ]
)
