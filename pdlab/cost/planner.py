"""Which layout trains a model fastest on a cluster you choose, and does it fit?

    rows = pdlab.plan("llama3-8b", "8xH100", global_batch=64, seq_len=4096)
    rows.iloc[0]                       # the fastest layout that fits (rows are sorted)
    pdlab.plan("mixtral-8x7b", "4x8xH100-ib-ndr400", 256, 4096, only={"ep": 8})
    pdlab.plan(7.5e9, world_size=64)   # a bare parameter count: model states only
    python -m pdlab plan --model llama3-8b --topology 2x8xH100-ib-ndr400 --json

The search, over the topology's GPUs: every grid dp × ep × pp × cp × tp (ep only for a
mixture of experts), and on each ZeRO stage 0-3, tensor parallelism with or without sequence
parallelism, the pipeline schedule (1F1B, ZB-H1, interleaved 1F1B with v = 2 or 4 chunks a
rank), activation recompute none | selective | full and the precision. A row gives the
memory per GPU (``pdlab.cost.footprint``), whether it fits and by how much it doesn't, the
step time (compute, the communication of each dimension that isn't hidden, the pipeline
bubble), tokens/s, MFU, and the bytes each GPU puts on the intra- and inter-node links per
step (bus bytes; a group spanning nodes is counted on the inter link). Each dimension's cost
is one small function below, its source in its docstring; communication times come from
``pdlab.cost.costmodel``. Every assumption is in ``Assumptions``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd

from pdlab import checks
from pdlab.cost.calibration import Ranks, this_machine
from pdlab.cost.costmodel import op_time
from pdlab.cost.footprint import (
    MODEL_NAMES,
    PRECISIONS,
    RECOMPUTE,
    ModelSpec,
    Precision,
    flops_per_token,
    get_precision,
    layer_activation_bytes,
    model_spec,
    model_state_bytes,
    moe_extra_activation_bytes,
    recompute_flops_per_token,
)
from pdlab.cost.topology import THIS_MACHINE, Topology
from pdlab.measure.comm import bus_bytes

# More GPUs than any cluster built (2026: ~200k): refused, rather than searched for minutes.
MAX_WORLD = 1 << 20
BARE_NOTE = "model states only: a bare parameter count has no shape, so activations, tp and pp are not computed"  # fmt: skip
SCHEDULES = ("1f1b", "zb-h1", "interleaved")
CHUNKS = (2, 4)  # virtual stages a rank the search tries for interleaved 1F1B


@dataclass(frozen=True)
class Assumptions:
    """Everything the planner assumes, in one place.

    Compute: each GPU runs its share of the step's FLOPs (``pdlab.cost.footprint.flops_per_token``;
    a stage's share is its ceil(L/p) layers of L; the rest split evenly over tp·cp) at
    ``efficiency`` × the device's dense peak for the precision's matmul dtype (bf16 for
    "mixed" and "bf16"; fp32 for "fp32", torch's default with TF32 off). The backward takes
    twice the forward; recompute adds its FLOPs (``recompute_flops_per_token``). A mixture of
    experts balances its tokens: each rank runs top_k experts' worth of MLP a token. The
    optimizer step is not timed.

    Schedule, per GPU, with m = global_batch / (dp · ep · micro_batch_size) micro-batches:
    - Each micro-batch's slot is forward + backward compute + the communication that sits
      on its critical path: tensor parallelism's collectives (``tp_collectives``), the
      pipeline's sends (``p2p_sends``), expert parallelism's all-to-alls
      (``moe_all_to_all_bytes``), and the part of the ring attention's KV passing
      (``ring_attention_bytes``) that outlasts the attention compute it overlaps.
    - A pipeline of p stages adds ``bubble_fraction`` × m slots: (p-1)/m for 1F1B,
      (p-1)/(v·m) interleaved, (p-1)/(3m) ZB-H1. Without a pipeline: m slots.
    - Data parallelism (dense weights over dp·ep·cp ranks, experts over dp·cp): the gradient
      all-reduce (ZeRO-1: reduce-scatter) overlaps the last micro-batch's backward, except
      the last ``bucket_bytes`` (DDP's 25 MiB buckets); ZeRO-2 reduce-scatters every
      micro-batch, each overlapping that backward; ZeRO-1/2's parameter all-gather after
      the optimizer step is exposed; ZeRO-3 all-gathers the parameters in each
      micro-batch's forward and again in its backward (with the gradients'
      reduce-scatter), overlapped with that compute except one bucket's worth. With m = 1
      the volumes are the ZeRO paper's 2Ψ (DP, ZeRO-1/2) and 3Ψ (ZeRO-3).
    - Placement: ranks form the grid dp × ep × pp × cp × tp (tp fastest, as
      ``pdlab.training.layout``), rank r on node r // gpus_per_node: TP stays inside a node
      when it fits there, the others span nodes as the grid puts them. A group spanning
      nodes runs at its slowest link (``algorithm="hierarchical"`` for all-reduces across
      nodes). Concurrent groups don't slow each other (each GPU has its own link).

    Memory: model states as in the ZeRO paper, sharded over each weight's data-parallel
    group; activations as in Korthikanti et al. 2022 (``layer_activation_bytes``, divided by
    cp) on the stage that holds most (``stage_micro_batches``: 1F1B's first stage holds
    min(p, m) micro-batches of its layers, interleaved (1 + (p-1)/(p·v)) times that; the
    last holds one, plus the loss's fp32 logits, 4·s·b·V/(t·cp) bytes); full recompute
    keeps each layer's input plus one layer's full working set. No allowance for the
    framework, fragmentation or communication buffers: "fits" is an upper bound.
    """

    efficiency: float = 0.5  # of peak; Korthikanti et al. reach 54.2% MFU on a 530B model
    flash_attention: bool = False  # drop the stored attention scores (5·a·s/h)
    bucket_bytes: float = 25 * 2**20
    algorithm: str = "ring"  # or "hierarchical" (pdlab.cost.costmodel)

    def __post_init__(self) -> None:
        checks.number(self.efficiency, "efficiency (a fraction of peak)", above=0, most=1)


@dataclass(frozen=True)
class Layout:
    """A grid of dp × ep × pp × cp × tp GPUs and how it runs: ZeRO stage ``zero`` over the
    data-parallel ranks, sequence parallelism ``sp`` with tp, the pipeline ``schedule`` with
    ``v`` chunks a rank, ``recompute`` and ``precision``."""

    dp: int
    tp: int = 1
    pp: int = 1
    cp: int = 1
    ep: int = 1
    zero: int = 0
    sp: bool = False
    schedule: str = ""  # "" without a pipeline, else one of SCHEDULES
    v: int = 1
    recompute: str | None = "none"  # None: not applicable (a bare parameter count)
    precision: str = "mixed"

    @property
    def strategy(self) -> str:
        """pdlab's strategy names, joined: ``zero1×tp-sp×pp-interleaved``."""
        data = "dp" if self.zero == 0 else f"zero{self.zero}"
        pipeline = {"1f1b": "pp-1f1b", "zb-h1": "pp-zb", "interleaved": "pp-interleaved"}
        parts = (
            data if self.dp > 1 or self.zero else "",
            "ep" if self.ep > 1 else "",
            ("tp-sp" if self.sp else "tp") if self.tp > 1 else "",
            "cp" if self.cp > 1 else "",
            pipeline.get(self.schedule, ""),
        )
        return "×".join(p for p in parts if p) or "single"


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return small + [n // d for d in reversed(small) if d * d != n]


def grids(world: int, moe: bool) -> Iterator[tuple[int, int, int, int, int]]:
    """Every ``(dp, tp, pp, cp, ep)`` whose product is ``world`` (ep = 1 unless ``moe``)."""
    for tp in divisors(world):
        for pp in divisors(world // tp):
            for cp in divisors(world // (tp * pp)):
                rest = world // (tp * pp * cp)
                for ep in divisors(rest) if moe else (1,):
                    yield rest // ep, tp, pp, cp, ep


def layouts(
    spec: ModelSpec | None,
    world: int,
    global_batch: int,
    micro_batch_size: int,
    seq_len: int = 1,
    precisions: Sequence[str] = ("mixed",),
) -> list[Layout]:
    """Every layout the model can be split into on ``world`` GPUs: heads and KV heads
    divisible by tp, at most one stage a layer (pp·v <= L), the sequence by cp, the experts
    by ep, the batch by dp · ep · micro_batch_size; interleaved 1F1B with m a multiple of p
    (Megatron's rule)."""
    found = []
    for dp, tp, pp, cp, ep in grids(world, spec is not None and spec.experts > 1):
        if global_batch % (dp * ep * micro_batch_size):
            continue
        zeros = range(4) if dp * ep * cp > 1 else (0,)
        if spec is None:
            if tp == pp == cp == 1:
                found += [Layout(dp, zero=z, recompute=None, precision=p) for z in zeros for p in precisions]  # fmt: skip
            continue
        if spec.n_head % tp or spec.n_kv_head % tp or pp > spec.n_layer or seq_len % cp or spec.experts % ep:  # fmt: skip
            continue
        m = global_batch // (dp * ep * micro_batch_size)
        schedules = [("", 1)]
        if pp > 1:
            schedules = [("1f1b", 1), ("zb-h1", 1)]
            schedules += [("interleaved", v) for v in CHUNKS if pp * v <= spec.n_layer and m % pp == 0]  # fmt: skip
        found += [
            Layout(dp, tp, pp, cp, ep, zero, sp, schedule, v, recompute, precision)
            for zero, sp, (schedule, v), recompute, precision in itertools.product(
                zeros, (False, True) if tp > 1 else (False,), schedules, RECOMPUTE, precisions
            )
        ]
    return found


# ---- the formulas, one a dimension --------------------------------------------------------


def bubble_fraction(schedule: str, p: int, m: int, v: int = 1) -> float:
    """The pipeline bubble over the ideal time of m micro-batches: 1F1B (p-1)/m (Narayanan
    et al. 2021, §2.2.1); interleaved with v chunks a rank (p-1)/(v·m) (§2.2.2); ZB-H1 with
    equal F, B and W times (p-1)/(3m) (Qi et al. 2023, arXiv 2401.10241, §3)."""
    if p == 1:
        return 0.0
    divide = {"1f1b": 1, "interleaved": v, "zb-h1": 3}[schedule]
    return (p - 1) / (divide * m)


def stage_micro_batches(schedule: str, p: int, m: int, v: int = 1) -> float:
    """Micro-batches' worth of its layers' activations the first stage holds at its peak:
    1F1B and ZB-H1 min(p, m) (Narayanan et al. 2021; Qi et al. 2023: ZB-H1 keeps 1F1B's
    memory); interleaved (1 + (p-1)/(p·v)) times that (Megatron's
    ``theoretical_memory_usage.py``)."""
    held = min(p, m)
    return held * (1 + (p - 1) / (p * v)) if schedule == "interleaved" else held


def p2p_sends(schedule: str, v: int = 1) -> int:
    """Sends a stage makes a micro-batch: one activation forward and one gradient back, ×v
    for interleaved 1F1B, whose every chunk sends (Narayanan et al. 2021, §2.2.2)."""
    return 2 * (v if schedule == "interleaved" else 1)


def tp_collectives(recompute: str) -> int:
    """Collectives of s·b·h a layer a micro-batch under tensor parallelism: 2 in the forward
    and 2 in the backward (Megatron's f and g, Shoeybi et al. 2019, §3), 2 more when full
    recompute reruns the forward; with sequence parallelism each is an all-gather plus a
    reduce-scatter, the same bytes on a ring (Korthikanti et al. 2022, §4.2.2)."""
    return 6 if recompute == "full" else 4


def ring_attention_bytes(b: int, s: int, cp: int, kv_width: int, nbytes: int, recompute: str) -> float:  # fmt: skip
    """Bytes a rank sends a layer a micro-batch in ring attention (Liu et al. 2023; picotron's
    ``cp_communications.py``): cp-1 steps of K and V, 2·b·(s/cp)·h_kv, forward; the backward
    passes K, V and dK, dV (twice that); full recompute reruns the forward."""
    forward = (cp - 1) * 2 * b * (s / cp) * kv_width * nbytes
    return forward * (4 if recompute == "full" else 3)


def moe_all_to_all_bytes(tokens: float, k: int, h: int, nbytes: int, ep: int) -> float:
    """Bytes a rank sends a MoE layer's forward for ``tokens`` tokens: dispatch and combine,
    each token's h-vector to and from k experts, of which (ep-1)/ep live on other ranks:
    2·k·h·bytes·(ep-1)/ep a token (derived; the backward sends as much again)."""
    return tokens * 2 * k * h * nbytes * (ep - 1) / ep


# ---- a layout's step and memory -----------------------------------------------------------

# Each group the planner costs: the grid's dimensions it runs along. Dense weights are
# data-parallel over dp·ep·cp (EP ranks read other samples, CP ranks other tokens), experts
# over dp·cp (Megatron's expert-data-parallel group).
GROUPS = {"tp": ("tp",), "cp": ("cp",), "pp": ("pp",), "ep": ("ep",), "dp": ("dp", "ep", "cp"), "edp": ("dp", "cp")}  # fmt: skip
GRID = ("dp", "ep", "pp", "cp", "tp")  # pdlab.training.layout.DIMS: tp fastest


class _Links:
    """Times and counts the communication of one layout: each group is the widest of the
    grid along its dims (the one spanning the most nodes); its bytes go on the inter link if
    it spans nodes, else on the intra link."""

    def __init__(self, layout: Layout, topology: Topology, algorithm: str):
        sizes = tuple(getattr(layout, dim) for dim in GRID)
        self.topology, self.algorithm = topology, algorithm
        self.spans = _group_spans(sizes, topology.gpus_per_node)  # each group: size, nodes
        self.bytes = {"intra": 0.0, "inter": 0.0}

    def seconds(self, op: str, payload: float, group: str) -> float:
        size, nodes = self.spans[group]
        return op_time(op, payload, size, self.topology, nodes=nodes, algorithm=self.algorithm)

    def cost(self, op: str, payload: float, group: str, count: float = 1) -> float:
        """Seconds of ``count`` ops on ``group``, counting their bytes."""
        size, nodes = self.spans[group]
        self.bytes["inter" if nodes > 1 else "intra"] += count * bus_bytes(op, payload, size)
        return count * self.seconds(op, payload, group)


@functools.lru_cache(maxsize=256)  # a search costs many layouts on each grid
def _group_spans(sizes: tuple[int, ...], gpus_per_node: int) -> dict[str, tuple[int, int]]:
    """Each group's size and the most nodes one of its instances spans, on the grid
    ``sizes`` (along ``GRID``) with rank r on node r // gpus_per_node."""
    grid = np.arange(math.prod(sizes)).reshape(sizes)
    spans = {}
    for name, dims in GROUPS.items():
        axes = [GRID.index(d) for d in dims]
        size = math.prod(sizes[a] for a in axes)
        groups = np.moveaxis(grid, axes, range(-len(axes), 0)).reshape(-1, size)
        # Nodes each group spans, in numpy: a million GPUs are planned in seconds. Ranks
        # rise along every group, and so do their nodes: count the changes.
        nodes = groups // gpus_per_node
        spans[name] = size, int((1 + (np.diff(nodes, axis=1) != 0).sum(axis=1)).max())
    return spans


def _data_parallel_exposed(
    links: _Links, group: str, zero: int, grads: float, weights: float, forward: float,
    backward: float, micro_batches: int, bucket_bytes: float,
) -> float:  # fmt: skip
    """Seconds of one group's data-parallel communication the compute doesn't hide
    (``Assumptions``)."""
    if links.spans[group][0] == 1 or grads == 0:
        return 0.0

    def behind(op: str, payload: float, window: float, count: int = 1, extra: float = 0.0) -> float:
        last_bucket = links.seconds(op, min(payload, bucket_bytes), group)
        each = links.cost(op, payload, group, count) / count + extra
        return count * max(last_bucket, each - window)

    m = micro_batches
    if zero == 0:
        return behind("all_reduce", grads, backward)
    if zero in (1, 2):  # ZeRO-2 reduces every micro-batch's gradients into its shard
        scatter = behind("reduce_scatter", grads, backward, m if zero == 2 else 1)
        return scatter + links.cost("all_gather", weights, group)
    scatter = links.cost("reduce_scatter", grads, group, m) / m
    gather_forward = behind("all_gather", weights, forward, m)
    return gather_forward + behind("all_gather", weights, backward, m, extra=scatter)


def evaluate(
    spec: ModelSpec | float,
    topology: Topology,
    layout: Layout,
    global_batch: int,
    seq_len: int,
    micro_batch_size: int,
    assume: Assumptions,
) -> dict:
    """One row of the plan (see the module docstring and ``Assumptions``)."""
    shaped = isinstance(spec, ModelSpec)
    prec = get_precision(layout.precision)
    world, (dp, tp, pp, cp, ep) = topology.world_size, (layout.dp, layout.tp, layout.pp, layout.cp, layout.ep)  # fmt: skip
    links = _Links(layout, topology, assume.algorithm)
    m = global_batch // (dp * ep * micro_batch_size)
    b, s = micro_batch_size, seq_len

    # Compute, per micro-batch on the busiest stage: its ceil(L/p) layers of L.
    peak = topology.device.peak(prec.compute_dtype)
    rate = peak * assume.efficiency
    model_flops = flops_per_token(spec, seq_len) if shaped else 6 * float(spec)
    stage = math.ceil(spec.n_layer / pp) / spec.n_layer if shaped else 1.0
    tokens = b * s / cp  # a rank's tokens a micro-batch
    forward = tokens * model_flops / 3 * stage / tp / rate
    extra = recompute_flops_per_token(spec, s, layout.recompute) if shaped else 0.0
    backward = 2 * forward + tokens * extra * stage / tp / rate

    # Communication on the critical path, over the step.
    tp_time = pp_time = cp_time = ep_time = 0.0
    if shaped:
        layers = math.ceil(spec.n_layer / pp)
        activation = tokens * spec.hidden * prec.activation_bytes  # b·(s/cp)·h
        ops = m * layers * tp_collectives(layout.recompute)
        if layout.sp:
            tp_time = links.cost("all_gather", activation, "tp", ops)
            tp_time += links.cost("reduce_scatter", activation, "tp", ops)
        elif tp > 1:
            tp_time = links.cost("all_reduce", activation, "tp", ops)
        if pp > 1:
            sends = m * p2p_sends(layout.schedule, layout.v)
            pp_time = links.cost("send", activation / (tp if layout.sp else 1), "pp", sends)
        if cp > 1:
            ring = ring_attention_bytes(b, s, cp, spec.kv_width, prec.activation_bytes, layout.recompute)  # fmt: skip
            ring_time = links.cost("send", ring / (cp - 1), "cp", m * layers * (cp - 1))
            attention = 3 * m * layers * 4 * tokens * s * spec.hidden / tp / rate  # 12·h·s a token
            cp_time = max(0.0, ring_time - attention)  # ring attention overlaps its blocks
        if ep > 1:
            # With sequence parallelism each TP rank dispatches its 1/t of the tokens.
            routed = tokens / (tp if layout.sp else 1)
            a2a = moe_all_to_all_bytes(routed, spec.top_k, spec.hidden, prec.activation_bytes, ep)  # fmt: skip
            payload = a2a / 2 * ep / (ep - 1)  # one all-to-all's payload: dispatch or combine
            rounds = 4 + (2 if layout.recompute == "full" else 0)  # fwd 2, bwd 2, recompute 2
            ep_time = links.cost("all_to_all", payload, "ep", m * layers * rounds)
    slot = forward + backward + (tp_time + pp_time + cp_time + ep_time) / m
    bubble = bubble_fraction(layout.schedule, pp, m, layout.v) * m * slot

    # Weights a GPU holds: dense ones split over tp·pp, experts over tp·pp·ep.
    expert = spec.expert_params if shaped else 0.0
    dense = ((spec.params if shaped else float(spec)) - expert) / (tp * pp)
    experts = expert / (tp * pp * ep)
    exposed = sum(
        _data_parallel_exposed(
            links,
            group,
            layout.zero,
            weights * prec.grad_bytes,
            weights * prec.param_bytes,
            forward,
            backward,
            m,
            assume.bucket_bytes,
        )
        for group, weights in (("dp", dense), ("edp", experts))
    )
    step = m * slot + bubble + exposed

    states = model_state_bytes(dense, prec, layout.zero, dp * ep * cp)
    for key, value in model_state_bytes(experts, prec, layout.zero, dp * cp).items():
        states[key] += value
    act = _activation_bytes(spec, layout, seq_len, micro_batch_size, m, prec, assume) if shaped else float("nan")  # fmt: skip
    total = sum(states.values()) + (act if shaped else 0.0)
    memory = topology.device.memory_bytes
    return {
        "strategy": layout.strategy,
        **asdict(layout),
        "micro_batches": m,
        **states,
        "activation_bytes": act,
        "total_bytes": total,
        "memory_bytes": memory,
        "fits": bool(total <= memory),
        "over_bytes": max(0.0, total - memory),
        "compute_time": m * (forward + backward),
        "tp_time": tp_time,
        "pp_time": pp_time,
        "cp_time": cp_time,
        "ep_time": ep_time,
        "bubble_time": bubble,
        "dp_exposed_time": exposed,
        "step_time": step,
        "tokens_per_s": global_batch * seq_len / step,
        "mfu": global_batch * seq_len * model_flops / (step * world * peak),
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
    s, b, t, cp = seq_len, micro_batch_size, layout.tp, layout.cp
    scale = prec.activation_bytes / 2  # Korthikanti et al. count 16-bit activations

    def per_layer(recompute: str) -> float:
        dense = layer_activation_bytes(
            s, b, spec.hidden, spec.n_head, t, sequence_parallel=layout.sp, recompute=recompute,
            flash_attention=assume.flash_attention,
        )  # fmt: skip
        moe = moe_extra_activation_bytes(s, b, spec.hidden, spec.top_k, t) if recompute != "full" else 0.0  # fmt: skip
        return scale * (dense + moe) / cp  # ring attention: each rank s/cp of the tokens

    layers = math.ceil(spec.n_layer / layout.pp)
    kept = layers * per_layer(layout.recompute)
    working = per_layer("none") if layout.recompute == "full" else 0.0
    logits = 4 * s * b * spec.vocab_size / (t * cp)
    held = stage_micro_batches(layout.schedule, layout.pp, micro_batches, layout.v)
    first = held * kept + working
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
    precision: str | Sequence[str] | None = None,
    *,
    world_size: int | None = None,
    micro_batch_size: int = 1,
    assumptions: Assumptions | None = None,
    cluster: Ranks | None = None,
    only: Mapping[str, object] | None = None,
) -> pd.DataFrame:
    """Every layout of ``model`` on ``topology``, one row each, the fastest that fits first.

    ``model``: a name (``pdlab.cost.footprint.MODEL_NAMES``), a ``ModelSpec``, or a parameter count
    (model states only). ``topology``: a ``Topology`` or anything ``Topology.parse`` reads
    ("this-machine" with ``cluster=``); without one, ``world_size`` H100s
    (``default_topology``). ``global_batch`` sequences of ``seq_len`` tokens a step (defaults:
    one sequence per GPU; the model's context, or 2048). ``precision``: "mixed", "bf16",
    "fp32", or several (default: all three). ``only``: keep the layouts whose ``Layout``
    fields have these values (``{"tp": 8, "schedule": "interleaved"}``). ``best(rows)``
    picks the first row, or says why nothing fits.
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
    names = list(PRECISIONS) if precision is None else [precision] if isinstance(precision, str) else list(precision)  # fmt: skip
    for name in names:
        get_precision(name)
    candidates = layouts(spec if shaped else None, topo.world_size, global_batch, micro_batch_size, seq_len, names)  # fmt: skip
    candidates = [c for c in candidates if _matches(c, only or {})]
    if not candidates:
        raise ValueError(
            f"no layout splits a global batch of {global_batch} (micro-batches of "
            f"{micro_batch_size}) over {topo.world_size} GPUs{' with ' + str(dict(only)) if only else ''}: "
            f"use a global_batch that is a multiple of {micro_batch_size} × a divisor of "
            f"{topo.world_size}{', or fewer constraints in only=' if only else ''}"
        )  # fmt: skip
    rows = [
        evaluate(spec, topo, layout, global_batch, seq_len, micro_batch_size, assume)
        for layout in candidates
    ]
    table = pd.DataFrame(rows)
    # Fitting rows fastest first (then smallest); the others by how far they miss.
    how_good = table.step_time.where(table.fits, table.over_bytes)
    order = np.lexsort((table.total_bytes, how_good, ~table.fits))
    table = table.iloc[order].reset_index(drop=True)
    table.attrs["topology"] = str(topo)
    return table


def _matches(layout: Layout, only: Mapping[str, object]) -> bool:
    known = {f.name for f in fields(Layout)}
    if unknown := set(only) - known:
        raise ValueError(f"only= names {sorted(unknown)}: use Layout's fields, {', '.join(sorted(known))}")  # fmt: skip
    return all(getattr(layout, key) == value for key, value in only.items())


def describe(row: pd.Series) -> str:
    """A row's layout in one line: ``zero1×tp-sp (dp=4, tp=2, ..., precision=mixed)``."""
    parts = [f"{k}={row[k]}" for k in ("dp", "tp", "pp", "cp", "ep", "v") if row[k] != 1]
    parts += [f"recompute={row.recompute}"] if row.recompute is not None else []
    return f"{row.strategy} ({', '.join([*parts, f'precision={row.precision}'])})"


def best(rows: pd.DataFrame) -> pd.Series:
    """The fastest layout that fits (the first row of ``plan``), or why none does."""
    fitting = rows[rows.fits]
    if fitting.empty:
        closest = rows.sort_values("over_bytes").iloc[0]
        raise ValueError(
            f"no layout fits: the closest, {describe(closest)}, needs "
            f"{three_figures(closest.over_bytes / 1e9)} GB more per GPU. Use more GPUs, recompute, a "
            "smaller micro-batch or sequence, or a precision with smaller optimizer states."
        )
    return fitting.iloc[0]


# ---- python -m pdlab plan --------------------------------------------------------------------

TABLE_COLUMNS = {  # column: (label, unit it is divided by)
    "strategy": ("strategy", None), "dp": ("dp", None), "tp": ("tp", None), "pp": ("pp", None),
    "cp": ("cp", None), "ep": ("ep", None), "v": ("v", None), "zero": ("zero", None),
    "recompute": ("recompute", None), "precision": ("precision", None),
    "micro_batches": ("m", None), "total_bytes": ("GB/GPU", 1e9), "over_bytes": ("over GB", 1e9),
    "step_time": ("step s", 1), "bubble_time": ("bubble s", 1), "tokens_per_s": ("tokens/s", 1),
    "mfu": ("MFU %", 0.01), "intra_bytes": ("intra GB", 1e9), "inter_bytes": ("inter GB", 1e9),
}  # fmt: skip


def three_figures(value: float) -> str:
    """``value`` to 3 significant figures, without an exponent: 72,200,000,000, 0.463, 12."""
    if not math.isfinite(value) or value == 0:
        return "-" if math.isnan(value) else f"{value:g}"
    digits = 2 - math.floor(math.log10(abs(value)))
    rounded = round(value, digits)
    return f"{rounded:,.{max(digits, 0)}f}"


def table_text(rows: pd.DataFrame) -> str:
    """The rows as the CLI prints them: units in the header, 3 significant figures."""
    shown = pd.DataFrame(index=rows.index)
    for column, (label, unit) in TABLE_COLUMNS.items():
        values = rows[column]
        if unit is not None:
            values = (values / unit).map(three_figures)
        shown[label] = values
    return shown.to_string(index=False)


def _value(text: str) -> object:
    """``--only`` values: whole numbers, true/false, or names."""
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text.lower(), text)


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
    p.add_argument(
        "--precision", nargs="+", choices=PRECISIONS, help="precisions searched (default: all)"
    )
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument(
        "--only", action="append", default=[], metavar="FIELD=VALUE",
        help="keep layouts with this value: dp tp pp cp ep zero sp schedule v recompute "
        "(e.g. --only tp=8 --only schedule=interleaved --only sp=true)",
    )  # fmt: skip
    defaults = Assumptions()
    p.add_argument("--efficiency", type=float, default=defaults.efficiency)
    p.add_argument("--flash-attention", action="store_true")
    p.add_argument(
        "--hierarchical", action="store_true", help="hierarchical all-reduce across nodes"
    )
    p.add_argument("--best", action="store_true", help="only the fastest layout that fits")
    p.add_argument("--top", type=int, default=20, help="rows shown in the table (0: all)")
    p.add_argument("--json", action="store_true", help="one JSON object per row (every row)")


def run_command(args: argparse.Namespace, measure_here: Callable[[int], Topology]) -> int:
    """``python -m pdlab plan ...``: print the rows (a table, or JSON lines with --json).

    ``measure_here(world_size)``: the topology of that many ranks here, measured."""
    model = args.params if args.params is not None else args.model
    topology = args.topology
    try:
        only = {}
        for item in args.only:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(f"--only takes FIELD=VALUE (e.g. --only tp=8), got {item!r}")
            only[key.strip()] = _value(text.strip())
        if (topology or "").strip().lower() == THIS_MACHINE:
            world = 2 if args.world_size is None else args.world_size  # 0 is refused, not 2
            topology = measure_here(world)  # its ranks are what is measured
        request = (model, topology, args.global_batch, args.seq_len, args.precision)
        assume = Assumptions(
            efficiency=args.efficiency,
            flash_attention=args.flash_attention,
            algorithm="hierarchical" if args.hierarchical else "ring",
        )
        options = {"micro_batch_size": args.micro_batch_size, "assumptions": assume, "only": only}
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
    print(rows.attrs.get("topology", ""))
    top = rows if args.top <= 0 else rows.head(args.top)
    print(table_text(top))
    if len(top) < len(rows):
        print(f"... {len(rows) - len(top)} more layouts ({rows.fits.sum()} fit in all): --top 0 shows them")  # fmt: skip
    if rows.note.iloc[0]:
        print(f"note: {rows.note.iloc[0]}")
    return 0
