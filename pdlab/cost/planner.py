"""Which layout trains a model fastest on a cluster you choose, and does it fit?

    rows = pdlab.plan("llama3-8b", "8xH100", global_batch=64, seq_len=4096)
    rows.iloc[0]                       # the fastest layout that fits (rows are sorted)
    pdlab.plan(7.5e9, world_size=64)   # a bare parameter count: model states only
    python -m pdlab plan --model llama3-8b --topology 2x8xH100-ib-ndr400 --json

For every layout of the topology's GPUs — dp, zero1-3, tp, pp, and dp×tp, dp×pp, dp×tp×pp
(plain or ZeRO-1 data parallelism), each with activation recompute off and on — a row gives
the memory per GPU (``pdlab.cost.footprint``), whether it fits and by how much it doesn't, the step
time (compute, tensor- and pipeline-parallel communication, exposed data-parallel
communication, the pipeline bubble), tokens/s, MFU, and the bytes each GPU puts on the
intra- and inter-node links per step (bus bytes; a group spanning nodes is counted on the
inter link). Communication times come from ``pdlab.cost.costmodel``. Every assumption is in
``Assumptions``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pdlab import checks
from pdlab.cost.calibration import Ranks, this_machine
from pdlab.cost.costmodel import op_time
from pdlab.cost.footprint import (
    MODEL_NAMES,
    PRECISIONS,
    ModelSpec,
    Precision,
    flops_per_token,
    get_precision,
    layer_activation_bytes,
    model_spec,
    model_state_bytes,
)
from pdlab.cost.topology import THIS_MACHINE, Topology
from pdlab.measure.comm import bus_bytes

# More GPUs than any cluster built (2026: ~200k): refused, rather than searched for minutes.
MAX_WORLD = 1 << 20
BARE_NOTE = "model states only: a bare parameter count has no shape, so activations, tp and pp are not computed"  # fmt: skip


@dataclass(frozen=True)
class Assumptions:
    """Everything the planner assumes, in one place.

    Compute: each GPU runs its share of the step's FLOPs (``pdlab.cost.footprint.flops_per_token``;
    layers split evenly over pipeline stages, parameters evenly over tp·pp) at
    ``efficiency`` × the device's dense peak for the precision's matmul dtype (bf16 for
    "mixed" and "bf16"; fp32 for "fp32", torch's default with TF32 off). The backward takes
    twice the forward; full recompute adds a forward to it. The optimizer step is not timed.

    Schedule, per GPU, with m = global_batch / (dp · micro_batch_size) micro-batches a step:
    - Each micro-batch's slot is forward + backward compute + its tensor-parallel
      communication (on the critical path: Megatron's 2 all-reduces of b·s·h in the forward
      and 2 in the backward per layer, 2 more with recompute; all-gather + reduce-scatter
      pairs of the same size with sequence parallelism) + its pipeline sends (one activation
      forward, one gradient back, b·s·h, divided by t with sequence parallelism).
    - A pipeline of p stages takes (m + p - 1) slots (1F1B or GPipe alike): the bubble is
      (p - 1) slots, (p - 1)/(m + p - 1) of the step. Without a pipeline: m slots.
    - Data parallelism: the gradient all-reduce (ZeRO-1: reduce-scatter) overlaps the last
      micro-batch's backward, except the last ``bucket_bytes`` (DDP's 25 MiB buckets);
      ZeRO-2 reduce-scatters every micro-batch, each overlapping that backward; ZeRO-1/2's
      parameter all-gather after the optimizer step is exposed; ZeRO-3 all-gathers the
      parameters in each micro-batch's forward and again in its backward (with the
      gradients' reduce-scatter), overlapped with that compute except one bucket's worth.
      With m = 1 the volumes are the ZeRO paper's 2Ψ (DP, ZeRO-1/2) and 3Ψ (ZeRO-3).
    - Placement: ranks form the grid dp × pp × tp (tp fastest, as ``pdlab.training.parallel``), and
      rank r sits on node r // gpus_per_node: TP stays inside a node when it fits there
      (when it doesn't, it is costed on the inter link), PP and DP span nodes. A group
      spanning nodes runs at its slowest link (``algorithm="hierarchical"`` for all-reduces
      across nodes). Concurrent groups don't slow each other (each GPU has its own link).

    Memory: model states as in the ZeRO paper; activations as in Korthikanti et al. 2022 for
    the stage that holds most (1F1B: the first holds min(p, m) micro-batches of its L/p
    layers; the last holds one, plus the loss's fp32 logits, 4·s·b·V/t bytes); full
    recompute keeps each layer's input plus one layer's full working set. No allowance for
    the framework, fragmentation or communication buffers: "fits" is an upper bound.
    """

    efficiency: float = 0.5  # of peak; Korthikanti et al. reach 54.2% MFU on a 530B model
    sequence_parallel: bool = True  # with tp > 1 (Korthikanti et al.): same bytes, less memory
    flash_attention: bool = False  # drop the stored attention scores (5·a·s/h)
    bucket_bytes: float = 25 * 2**20
    algorithm: str = "ring"  # or "hierarchical" (pdlab.cost.costmodel)

    def __post_init__(self) -> None:
        checks.number(self.efficiency, "efficiency (a fraction of peak)", above=0, most=1)


@dataclass(frozen=True)
class Layout:
    """A grid of dp × pp × tp GPUs, ZeRO stage ``zero`` across dp, recompute on or off."""

    dp: int
    tp: int
    pp: int
    zero: int
    recompute: bool | None  # None: not applicable (a bare parameter count)

    @property
    def strategy(self) -> str:
        data = ("dp" if self.zero == 0 else f"zero{self.zero}") if self.dp > 1 else ""
        parts = (data, "tp" if self.tp > 1 else "", "pp" if self.pp > 1 else "")
        return "×".join(p for p in parts if p) or "single"


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def layouts(
    spec: ModelSpec | None, world: int, global_batch: int, micro_batch_size: int
) -> list[Layout]:
    """Every layout the model can be split into on ``world`` GPUs (heads divisible by tp,
    layers by pp, the batch by dp × micro_batch_size)."""
    found = []
    for tp in divisors(world):
        for pp in divisors(world // tp):
            dp = world // (tp * pp)
            if global_batch % (dp * micro_batch_size):
                continue
            if spec is None:
                if tp == pp == 1:
                    found += [Layout(dp, 1, 1, zero, None) for zero in range(4 if dp > 1 else 1)]
                continue
            if spec.n_head % tp or spec.n_kv_head % tp or spec.n_layer % pp:
                continue
            zeros = range(4) if tp == pp == 1 else (0, 1)
            for zero in zeros if dp > 1 else (0,):
                found += [Layout(dp, tp, pp, zero, recompute) for recompute in (False, True)]
    return found


class _Links:
    """Times and counts the communication of one layout: each dim's group is the widest of
    the grid along that dim (the one spanning the most nodes); its bytes go on the inter
    link if it spans nodes, else on the intra link."""

    def __init__(self, layout: Layout, topology: Topology, algorithm: str):
        grid = np.arange(topology.world_size).reshape(layout.dp, layout.pp, layout.tp)
        self.topology, self.algorithm = topology, algorithm
        self.spans: dict[str, tuple[int, int]] = {}  # each dim's widest group: size, nodes
        for axis, dim in enumerate(("dp", "pp", "tp")):
            groups = np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis])
            # Nodes each group spans, in numpy: a million GPUs are planned in seconds. Ranks
            # rise along every axis of the grid, and so do their nodes: count the changes.
            nodes = groups // topology.gpus_per_node
            spans = 1 + (np.diff(nodes, axis=1) != 0).sum(axis=1)
            self.spans[dim] = grid.shape[axis], int(spans.max())
        self.bytes = {"intra": 0.0, "inter": 0.0}

    def seconds(self, op: str, payload: float, dim: str) -> float:
        size, nodes = self.spans[dim]
        return op_time(op, payload, size, self.topology, nodes=nodes, algorithm=self.algorithm)

    def cost(self, op: str, payload: float, dim: str, count: int = 1) -> float:
        """Seconds of ``count`` ops on the ``dim`` group, counting their bytes."""
        size, nodes = self.spans[dim]
        self.bytes["inter" if nodes > 1 else "intra"] += count * bus_bytes(op, payload, size)
        return count * self.seconds(op, payload, dim)


def _data_parallel_exposed(
    links: _Links, zero: int, grads: float, weights: float, forward: float, backward: float,
    micro_batches: int, bucket_bytes: float,
) -> float:  # fmt: skip
    """Seconds of data-parallel communication the compute doesn't hide (``Assumptions``)."""

    def behind(op: str, payload: float, window: float, count: int = 1, extra: float = 0.0) -> float:
        last_bucket = links.seconds(op, min(payload, bucket_bytes), "dp")
        each = links.cost(op, payload, "dp", count) / count + extra
        return count * max(last_bucket, each - window)

    m = micro_batches
    if zero == 0:
        return behind("all_reduce", grads, backward)
    if zero in (1, 2):  # ZeRO-2 reduces every micro-batch's gradients into its shard
        scatter = behind("reduce_scatter", grads, backward, m if zero == 2 else 1)
        return scatter + links.cost("all_gather", weights, "dp")
    scatter = links.cost("reduce_scatter", grads, "dp", m) / m
    gather_forward = behind("all_gather", weights, forward, m)
    return gather_forward + behind("all_gather", weights, backward, m, extra=scatter)


def evaluate(
    spec: ModelSpec | float,
    topology: Topology,
    layout: Layout,
    global_batch: int,
    seq_len: int,
    prec: Precision,
    micro_batch_size: int,
    assume: Assumptions,
) -> dict:
    """One row of the plan (see the module docstring and ``Assumptions``)."""
    shaped = isinstance(spec, ModelSpec)
    params = spec.params if shaped else float(spec)
    world, (dp, tp, pp) = topology.world_size, (layout.dp, layout.tp, layout.pp)
    links = _Links(layout, topology, assume.algorithm)

    # Compute, per micro-batch on one stage.
    peak = topology.device.peak(prec.compute_dtype)
    model_flops = flops_per_token(spec, seq_len) if shaped else 6 * params
    micro_batches = global_batch // (dp * micro_batch_size)
    forward = micro_batch_size * seq_len * model_flops / 3 / (tp * pp) / (peak * assume.efficiency)
    backward = 2 * forward + (forward if layout.recompute else 0)

    # Tensor and pipeline parallelism over the step, on the critical path.
    tp_time = pp_time = 0.0
    sp = assume.sequence_parallel and tp > 1
    if shaped:
        activation = micro_batch_size * seq_len * spec.hidden * prec.activation_bytes
        ops = micro_batches * spec.n_layer // pp * (6 if layout.recompute else 4)
        if sp:
            tp_time = links.cost("all_gather", activation, "tp", ops)
            tp_time += links.cost("reduce_scatter", activation, "tp", ops)
        elif tp > 1:
            tp_time = links.cost("all_reduce", activation, "tp", ops)
        if pp > 1:
            pp_time = links.cost("send", activation / (tp if sp else 1), "pp", 2 * micro_batches)
    slot = forward + backward + (tp_time + pp_time) / micro_batches
    bubble = (pp - 1) * slot

    weights = params / (tp * pp)
    exposed = 0.0
    if dp > 1:
        exposed = _data_parallel_exposed(
            links, layout.zero, weights * prec.grad_bytes, weights * prec.param_bytes,
            forward, backward, micro_batches, assume.bucket_bytes,
        )  # fmt: skip
    step = micro_batches * slot + bubble + exposed

    states = model_state_bytes(weights, prec, layout.zero, dp)
    act = (
        _activation_bytes(spec, layout, seq_len, micro_batch_size, micro_batches, prec, assume)
        if shaped
        else float("nan")
    )
    total = sum(states.values()) + (act if shaped else 0.0)
    memory = topology.device.memory_bytes
    tokens = global_batch * seq_len
    return {
        "strategy": layout.strategy,
        "dp": dp,
        "tp": tp,
        "pp": pp,
        "zero": layout.zero,
        "recompute": layout.recompute,
        "micro_batches": micro_batches,
        **states,
        "activation_bytes": act,
        "total_bytes": total,
        "memory_bytes": memory,
        "fits": bool(total <= memory),
        "over_bytes": max(0.0, total - memory),
        "compute_time": micro_batches * (forward + backward),
        "tp_time": tp_time,
        "pp_time": pp_time,
        "bubble_time": bubble,
        "dp_exposed_time": exposed,
        "step_time": step,
        "tokens_per_s": tokens / step,
        "mfu": tokens * model_flops / (step * world * peak),
        "intra_bytes": links.bytes["intra"],
        "inter_bytes": links.bytes["inter"],
        "note": "" if shaped else BARE_NOTE,
    }


def _activation_bytes(
    spec: ModelSpec,
    layout: Layout,
    seq_len: int,
    micro_batch_size: int,
    micro_batches: int,
    prec: Precision,
    assume: Assumptions,
) -> float:
    """Activation bytes on the pipeline stage that holds most (see ``Assumptions``)."""
    sp = assume.sequence_parallel and layout.tp > 1
    scale = prec.activation_bytes / 2  # Korthikanti et al. count 16-bit activations

    def per_layer(recompute: bool) -> float:
        return scale * layer_activation_bytes(
            seq_len, micro_batch_size, spec.hidden, spec.n_head, layout.tp,
            sequence_parallel=sp, recompute=recompute, flash_attention=assume.flash_attention,
        )  # fmt: skip

    kept = spec.n_layer // layout.pp * per_layer(bool(layout.recompute))
    working = per_layer(False) if layout.recompute else 0.0
    logits = 4 * seq_len * micro_batch_size * spec.vocab_size / layout.tp
    first = min(layout.pp, micro_batches) * kept + working
    return max(first, kept + working + logits)


def default_topology(world_size: int) -> Topology:
    """H100 SXM over NVLink 4, 8 a node, nodes over InfiniBand NDR 400 (what --world-size means)."""
    if checks.whole(world_size, "world_size", most=MAX_WORLD) <= 8:
        return Topology(1, world_size, intra="nvlink4")
    if world_size % 8:
        raise ValueError(
            f"world_size {world_size} is more than one 8-GPU node but not a multiple of 8: "
            "use a multiple of 8, or give a topology ('3x4 nvlink4 ib-ndr400')"
        )
    return Topology(world_size // 8, 8, intra="nvlink4", inter="ib-ndr400")


def plan(
    model: str | ModelSpec | float,
    topology: Topology | str | None = None,
    global_batch: int | None = None,
    seq_len: int | None = None,
    precision: str = "mixed",
    *,
    world_size: int | None = None,
    micro_batch_size: int = 1,
    assumptions: Assumptions | None = None,
    cluster: Ranks | None = None,
) -> pd.DataFrame:
    """Every layout of ``model`` on ``topology``, one row each, the fastest that fits first.

    ``model``: a name (``pdlab.cost.footprint.MODEL_NAMES``), a ``ModelSpec``, or a parameter count
    (model states only). ``topology``: a ``Topology`` or anything ``Topology.parse`` reads
    ("this-machine" with ``cluster=``); without one, ``world_size`` H100s
    (``default_topology``). ``global_batch`` sequences of ``seq_len`` tokens a step (defaults:
    one sequence per GPU; the model's context, or 2048). ``precision``: "mixed", "bf16"
    or "fp32". ``best(rows)`` picks the first row, or says why nothing fits.
    """
    assume = assumptions or Assumptions()
    if topology is None:
        if world_size is None:
            raise ValueError("give a topology ('8xH100', '2x8 nvlink4 ib-ndr400') or a world_size")
        topo = default_topology(world_size)
    else:
        is_here = isinstance(topology, str) and topology.strip().lower() == THIS_MACHINE
        topo = this_machine(cluster) if is_here else Topology.parse(topology)
        if world_size is not None and world_size != topo.world_size:
            raise ValueError(
                f"world_size {world_size} disagrees with topology {topo.name!r} "
                f"({topo.world_size} GPUs): give one or the other"
            )
    checks.whole(topo.world_size, "the topology's GPU count", most=MAX_WORLD)
    if isinstance(model, (int, float)) and not isinstance(model, bool):
        spec: ModelSpec | float = checks.number(model, "a parameter count", above=0)
    else:
        spec = model_spec(model)
    shaped = isinstance(spec, ModelSpec)
    if global_batch is None:
        global_batch = topo.world_size
    if seq_len is None:
        seq_len = spec.context if shaped else 2048
    checks.whole(global_batch, "global_batch")
    checks.whole(seq_len, "seq_len")
    micro_batch_size = checks.whole(micro_batch_size, "micro_batch_size")
    if shaped and spec.learned_positions and seq_len > spec.context:
        raise ValueError(
            f"{spec.name} has learned positions for {spec.context} tokens: "
            f"use seq_len <= {spec.context}"
        )
    prec = get_precision(precision)
    candidates = layouts(spec if shaped else None, topo.world_size, global_batch, micro_batch_size)
    rows = [
        evaluate(spec, topo, layout, global_batch, seq_len, prec, micro_batch_size, assume)
        for layout in candidates
    ]
    if not rows:
        raise ValueError(
            f"no layout splits a global batch of {global_batch} (micro-batches of "
            f"{micro_batch_size}) over {topo.world_size} GPUs: use a global_batch that is a "
            f"multiple of {micro_batch_size} × a divisor of {topo.world_size}"
        )
    table = pd.DataFrame(rows)
    # Fitting rows fastest first (then smallest); the others by how far they miss.
    how_good = table.step_time.where(table.fits, table.over_bytes)
    order = np.lexsort((table.total_bytes, how_good, ~table.fits))
    table = table.iloc[order].reset_index(drop=True)
    table.attrs["topology"] = str(topo)
    return table


def best(rows: pd.DataFrame) -> pd.Series:
    """The fastest layout that fits (the first row of ``plan``), or why none does."""
    fitting = rows[rows.fits]
    if fitting.empty:
        closest = rows.sort_values("over_bytes").iloc[0]
        raise ValueError(
            f"no layout fits: the closest, {closest.strategy} (dp={closest.dp}, tp={closest.tp}, "
            f"pp={closest.pp}, recompute={closest.recompute}), needs "
            f"{closest.over_bytes / 1e9:.3g} GB more per GPU. Use more GPUs, recompute, a "
            "smaller micro-batch or sequence, or a precision with smaller optimizer states."
        )
    return fitting.iloc[0]


# ---- python -m pdlab plan --------------------------------------------------------------------

TABLE_COLUMNS = {
    "strategy": ("strategy", None), "dp": ("dp", None), "tp": ("tp", None), "pp": ("pp", None),
    "zero": ("zero", None), "recompute": ("recompute", None), "micro_batches": ("m", None),
    "total_bytes": ("GB/GPU", 1e9), "over_bytes": ("over GB", 1e9), "step_time": ("step ms", 1e-3),
    "tokens_per_s": ("tokens/s", None), "mfu": ("MFU", None),
    "intra_bytes": ("intra GB", 1e9), "inter_bytes": ("inter GB", 1e9),
}  # fmt: skip


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register ``plan`` on ``python -m pdlab``'s subcommands."""
    p = commands.add_parser("plan", help="memory, step time and MFU of every layout of a model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", choices=MODEL_NAMES)
    what.add_argument("--params", type=float, help="a bare parameter count: model states only")
    p.add_argument("--topology", help="a preset, 'this-machine', or e.g. '2x8 nvlink4 ib-ndr400'")
    p.add_argument("--world-size", type=int, help="GPUs (H100s, 8 a node) when no topology")
    p.add_argument("--global-batch", type=int, help="sequences a step (default: one a GPU)")
    p.add_argument("--seq-len", type=int, help="tokens a sequence (default: the context, or 2048)")
    p.add_argument("--precision", default="mixed", choices=PRECISIONS)
    p.add_argument("--micro-batch-size", type=int, default=1)
    defaults = Assumptions()
    p.add_argument("--efficiency", type=float, default=defaults.efficiency)
    p.add_argument("--no-sequence-parallel", action="store_true")
    p.add_argument("--flash-attention", action="store_true")
    p.add_argument(
        "--hierarchical", action="store_true", help="hierarchical all-reduce across nodes"
    )
    p.add_argument("--best", action="store_true", help="only the fastest layout that fits")
    p.add_argument("--json", action="store_true", help="one JSON object per row")


def run_command(args: argparse.Namespace, measure_here: Callable[[int], Topology]) -> int:
    """``python -m pdlab plan ...``: print the rows (a table, or JSON lines with --json).

    ``measure_here(world_size)``: the topology of that many ranks here, measured."""
    model = args.params if args.params is not None else args.model
    topology = args.topology
    try:
        if (topology or "").strip().lower() == THIS_MACHINE:
            world = 2 if args.world_size is None else args.world_size  # 0 is refused, not 2
            topology = measure_here(world)  # its ranks are what is measured
        request = (model, topology, args.global_batch, args.seq_len, args.precision)
        assume = Assumptions(
            efficiency=args.efficiency,
            sequence_parallel=not args.no_sequence_parallel,
            flash_attention=args.flash_attention,
            algorithm="hierarchical" if args.hierarchical else "ring",
        )
        options = {"micro_batch_size": args.micro_batch_size, "assumptions": assume}
        world_size = None if isinstance(topology, Topology) else args.world_size
        rows = plan(*request, world_size=world_size, **options)
        if args.best:
            picked = best(rows).to_frame().T
            picked.attrs = rows.attrs  # the topology line above the table
            rows = picked
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        for record in json.loads(rows.to_json(orient="records")):
            print(json.dumps(record))
        return 0
    shown = rows[list(TABLE_COLUMNS)].copy()
    for column, (_, unit) in TABLE_COLUMNS.items():
        if unit:
            shown[column] = shown[column] / unit
    shown["mfu"] = shown["mfu"] * 100
    shown.columns = [label for label, _ in TABLE_COLUMNS.values()]
    print(rows.attrs.get("topology", ""))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if rows.note.iloc[0]:
        print(f"note: {rows.note.iloc[0]}")
    return 0
