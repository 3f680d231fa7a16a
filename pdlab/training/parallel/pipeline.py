"""Pipeline parallelism: the model's units cut into ``p`` contiguous stages, one per rank.

Each step splits this rank's batch into ``m`` micro-batches. Stage ``s`` receives a
micro-batch's activation from stage ``s-1``, runs its units, sends the result to ``s+1``;
backward runs the other way, sending the gradient of the stage's input. Two schedules:

- GPipe (Huang et al. 2019, arXiv 1811.06965): all ``m`` forwards, then all ``m`` backwards.
  Every stage holds ``m`` micro-batches' activations; the bubble (idle over busy time, with
  equal stage times: ``BUBBLE``) is ``(p-1)/m``.
  ``micro_batches=1`` is the naive pipeline: one stage busy at a time.
- 1F1B, PipeDream-Flush (Narayanan et al. 2021, arXiv 2104.04473): ``p-s-1`` warm-up
  forwards, then one forward one backward, then the cool-down backwards. Same bubble, but a
  stage holds at most ``p-s`` micro-batches' activations.
- ZB-H1, zero bubble (Qi et al. 2023, arXiv 2401.10241): each backward split in two, B (the
  gradient of the stage's input, which the previous stage waits for) and W (the weight
  gradients, which nobody waits for). Stage ``s`` runs 1F1B's order with B in place of the
  backward and each W ``p-1`` micro-batches later, where 1F1B's stages sat idle. With equal
  F, B and W times the bubble drops to ``(p-1)/(3m)`` for ``m >= p``; the traffic is 1F1B's,
  and a stage holds at most ``p`` micro-batches (1F1B's peak, on stage 0).
- Interleaved 1F1B (Narayanan et al. 2021, §2.2): the units cut into ``p·v`` stages, rank
  ``s`` holding ``v`` model chunks, stages ``s, s+p, ..., s+(v-1)p`` (``virtual_stages``).
  Megatron's order: micro-batches go through the chunks ``p`` at a time, a longer warm-up,
  then 1F1B over the ``m·v`` chunk passes. A chunk pass takes ``1/v`` of a stage's, so the
  bubble drops to ``(p-1)/(v·m)``; every micro-batch crosses ``p·v-1`` cuts instead of
  ``p-1``: about ``v`` times the point-to-point bytes.

The loss is the mean over micro-batches of each micro-batch's mean loss, so the gradients
equal the single-process full-batch gradient (micro-batches are equal-sized).

``PipelineScratch`` (``impl="scratch"``) runs a schedule over a ``StageLink``: ``isend`` +
``recv`` to the neighbouring stages (lab 03's exercise uses the same link).
``PipelineTorch`` (``impl="torch"``) runs the same partition with
``torch.distributed.pipelining``. ``Pipeline``, their base, holds what both share: the
stage's units, the shapes crossing its cuts and its timeline.
"""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise

import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from pdlab import compat
from pdlab.measure import memory
from pdlab.measure.comm import CommEvent, event
from pdlab.training import models, registry
from pdlab.training.data import load_dataset
from pdlab.training.layout import Layout
from pdlab.training.parallel.base import (
    Mesh,
    StepOutput,
    TrainConfig,
    full_tensor,
    meta_model,
    wire_device,
)
from pdlab.training.parallel.single import Single

Action = tuple[str, int]  # ("F" | "B" | "W", micro-batch index)
ChunkAction = tuple[str, int, int]  # the same and the model chunk (pp-interleaved)


# --- partition ---------------------------------------------------------------------------


def partition(model: nn.Sequential, p: int) -> list[tuple[int, int]]:
    """Cut the units into ``p`` contiguous ``(start, stop)`` stages balanced by parameter count.

    Each cut goes where the running parameter count is nearest ``k/p`` of the total, leaving
    at least one unit per stage. Parameters stand in for compute: true for linears and
    attention projections, not for embeddings (a lookup), which are small here.
    """
    sizes = [sum(q.numel() for q in unit.parameters()) for unit in model]
    prefix = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    cuts = [0]
    for k in range(1, p):
        lo, hi = cuts[-1] + 1, len(sizes) - (p - k)  # keep >= 1 unit on each side
        cuts.append(min(range(lo, hi + 1), key=lambda i: abs(prefix[i] - k * prefix[-1] / p)))
    cuts.append(len(sizes))
    return list(pairwise(cuts))


def check(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, saying what to change, if ``config`` cannot run as a ``layout.pp`` pipeline."""
    units, stages = len(meta_model(config)), layout.pp * chunks_per_rank(config)
    if stages > units:
        chunks = f" ({layout.pp} ranks x {chunks_per_rank(config)})" if stages > layout.pp else ""
        raise ValueError(
            f"{stages} pipeline stages{chunks} but model {config.model!r} has only {units} "
            f"units: use at most {units} stages"
        )
    per_rank = config.batch_size // layout.dp
    if config.micro_batches < 1 or per_rank % config.micro_batches:
        raise ValueError(
            f"the batch per data-parallel rank ({per_rank}) does not split into "
            f"{config.micro_batches} micro-batches: use a divisor of {per_rank}"
        )
    if config.strategy == "pp-interleaved" and config.micro_batches % layout.pp:
        raise ValueError(
            f"interleaved 1F1B sends micro-batches through the chunks {layout.pp} at a time "
            f"(Megatron's order): use micro_batches a multiple of {layout.pp}, not "
            f"{config.micro_batches}"
        )


def chunks_per_rank(config: TrainConfig) -> int:
    """Model chunks a pipeline rank holds: ``virtual_stages``, or what the schedule needs
    (``registry``: 2 for pp-interleaved and ZBV's V, else 1)."""
    return registry.get(config.strategy).chunks_per_rank(config.virtual_stages)


def stages_of(strategy: str, p: int, s: int, v: int) -> list[int]:
    """The global stages of rank ``s``'s chunks, of ``p·v``: ``s, s+p, ...`` (looped), or
    ZBV's V, ``s`` down the ranks and ``2p-1-s`` back up (the last rank holds the turn)."""
    if strategy == "pp-zbv":
        return [s, 2 * p - 1 - s]
    return [s + k * p for k in range(v)]


def _example_microbatch(config: TrainConfig, layout: Layout) -> torch.Tensor:
    """A micro-batch of real inputs: its shape and dtype fix every activation's."""
    mb = config.batch_size // layout.dp // config.micro_batches
    return load_dataset(config.model, config.seed, block_size=config.seq_len).x[:mb]


def _unit_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Each unit's output for input ``x``, as meta tensors (shapes and dtypes, no data)."""
    outs, h = [], x.to("meta")
    for unit in copy.deepcopy(model).to("meta"):  # the copy keeps the weights where they are
        h = unit(h)
        outs.append(h)
    return outs


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """One step's traffic on every rank of the ``pp`` group (and of each ``dp`` replica).

    Per micro-batch and stage boundary (``p·v-1`` of them, stage ``k`` on pipeline rank
    ``k mod p``): the activation forward and its gradient backward,
    each a send of ``b * activation shape * dtype size`` bytes (``b`` = micro-batch size;
    its payload counted at the sender) and the matching recv (payload 0; it receives those
    bytes). Both impls send exactly this:
    torch's one-time handshake runs when the strategy is built, not in a step.
    """
    model, m, p = meta_model(config), config.micro_batches, layout.pp
    outs = _unit_outputs(model, _example_microbatch(config, layout))
    stage_of = [layout.coords(rank)["pp"] for rank in range(layout.world_size)]
    events = []
    v = chunks_per_rank(config)
    rank_of = {g: s for s in range(p) for g in stages_of(config.strategy, p, s, v)}
    for k, (_, stop) in enumerate(partition(model, p * v)[:-1]):
        size = outs[stop - 1].nbytes
        if rank_of[k] == rank_of[k + 1]:
            continue  # ZBV's turn: both stages on one rank, nothing sent
        # The ranks of stage k and of stage k+1, replica by replica (dp-pp has several).
        pairs = zip(
            [r for r, t in enumerate(stage_of) if t == rank_of[k]],
            [r for r, t in enumerate(stage_of) if t == rank_of[k + 1]],
            strict=True,
        )
        for before, after in pairs:
            forward = [event("send", size, "pp", p, before), event("recv", size, "pp", p, after)]
            backward = [event("send", size, "pp", p, after), event("recv", size, "pp", p, before)]
            events += (forward + backward) * m  # activations forward, their gradients back
    return events


# --- schedules: the order of one stage's actions ---------------------------------------


def gpipe(m: int, p: int, s: int) -> list[Action]:
    """GPipe: all ``m`` forwards, then all ``m`` backwards (fill, drain)."""
    return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]


def one_f_one_b(m: int, p: int, s: int) -> list[Action]:
    """1F1B (PipeDream-Flush): ``p-s-1`` warm-up forwards, then F/B pairs, then cool-down Bs."""
    warmup = min(p - s - 1, m)
    order = [("F", i) for i in range(warmup)]
    for i in range(m - warmup):
        order += [("F", warmup + i), ("B", i)]
    return order + [("B", i) for i in range(m - warmup, m)]


def zb_h1(m: int, p: int, s: int) -> list[Action]:
    """ZB-H1: at tick ``x``, ``F(x)``, then ``B(x-(p-1-s))`` (1F1B's pairing), then
    ``W(x-(p-1))``, each where its micro-batch exists (the paper's Figure 3, top)."""
    order = []
    for x in range(m + p - 1):
        triple = (("F", x), ("B", x - (p - 1 - s)), ("W", x - (p - 1)))
        order += [(phase, i) for phase, i in triple if 0 <= i < m]
    return order


def interleaved(m: int, p: int, s: int, v: int) -> list[ChunkAction]:
    """Interleaved 1F1B (Megatron's ``forward_backward_pipelining_with_interleaving``): the
    ``k``-th chunk pass of a rank is micro-batch ``(k // pv)·p + k % p`` on chunk
    ``(k // p) % v`` (backwards: chunks in reverse); ``2(p-s-1) + (v-1)p`` warm-up forwards,
    then one forward one backward, then the cool-down. ``m`` must be a multiple of ``p``."""

    def action(k: int, phase: str) -> ChunkAction:
        chunk = (k // p) % v
        return (phase, (k // (p * v)) * p + k % p, chunk if phase == "F" else v - 1 - chunk)

    passes = m * v
    warmup = min(2 * (p - s - 1) + (v - 1) * p, passes)
    order = [action(k, "F") for k in range(warmup)]
    for k in range(passes - warmup):
        order += [action(warmup + k, "F"), action(k, "B")]
    return order + [action(k, "B") for k in range(passes - warmup, passes)]


def actions(config: TrainConfig, p: int, s: int) -> list[ChunkAction]:
    """Stage ``s``'s actions in ``config``'s schedule, each with its model chunk."""
    if config.strategy == "pp-interleaved":
        return interleaved(config.micro_batches, p, s, chunks_per_rank(config))
    return [(phase, i, 0) for phase, i in SCHEDULES[config.strategy](config.micro_batches, p, s)]


SCHEDULES: dict[str, Callable[[int, int, int], list[Action]]] = {
    "pp-gpipe": gpipe,
    "pp-1f1b": one_f_one_b,
    "pp-zb": zb_h1,
}
# torch's zero-bubble schedule with one stage a rank runs ZB-H1's order (checked in
# tests/test_pipeline.py against ``zb_h1``).
TORCH_SCHEDULES = {
    "pp-gpipe": ScheduleGPipe,
    "pp-1f1b": Schedule1F1B,
    "pp-zb": ScheduleInterleavedZeroBubble,
    "pp-interleaved": ScheduleInterleaved1F1B,
    "pp-zbv": ScheduleZBVZeroBubble,
}
SPLIT_BACKWARD = ("pp-zb", "pp-zbv")  # the schedules whose backward is B then W


# --- the link between stages ------------------------------------------------------------


class StageLink:
    """One pipeline stage's line to its neighbours in ``group``: activations forward, the
    gradients of those activations backward.

    The stage is this rank's place in ``group`` (``None``: the world), its neighbours the
    ranks before and after it. With ``chunks`` model chunks a rank (interleaved 1F1B), this
    link is chunk ``chunk``'s: global stage ``stage + chunk·stages``, its neighbours wrap
    around the group (the last rank's chunk 0 feeds the first rank's chunk 1). Each cut's
    messages carry their own tag, activations and gradients apart, so two streams between the
    same pair of ranks never take each other's place. ``input_like`` and ``output_like`` are one micro-batch's input
    and output of the stage (meta tensors will do): their shapes and dtypes are what the
    receives expect. Tensors arrive on ``device``; on gloo they travel through the CPU
    (``wire_device``).

    A send never blocks (``isend``); ``wait`` finishes them all, so a stage never waits on a
    peer that waits on it (two blocking sends facing each other deadlock in 1F1B's steady
    phase). gloo's ``batch_isend_irecv`` is avoided: it hangs on CPU (PiPPy #989, pytorch
    #132644).
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        input_like: torch.Tensor,
        output_like: torch.Tensor,
        device: torch.device,
        chunk: int = 0,
        chunks: int = 1,
    ):
        self.group = group or dist.group.WORLD
        self.stage, self.stages = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.cut = self.stage + chunk * self.stages  # the cut behind this (global) stage
        self.is_first, self.is_last = self.cut == 0, self.cut == self.stages * chunks - 1
        self.prev, self.next = (self.stage - 1) % self.stages, (self.stage + 1) % self.stages
        self.input_like, self.output_like = input_like, output_like
        self.device, self.wire = device, wire_device(self.group, device)
        self._sends: list[dist.Work] = []

    def recv_forward(self) -> torch.Tensor:
        """The previous stage's activation, ready for autograd: after backward, its ``.grad``
        is what ``send_backward`` returns to that stage."""
        return self._recv(self.input_like, self.prev, 2 * self.cut - 2).requires_grad_()

    def send_forward(self, out: torch.Tensor) -> None:
        """Start sending this stage's output to the next stage."""
        self._isend(out.detach(), self.next, 2 * self.cut)

    def recv_backward(self) -> torch.Tensor:
        """The gradient of this stage's output, from the next stage."""
        return self._recv(self.output_like, self.next, 2 * self.cut + 1)

    def send_backward(self, grad: torch.Tensor) -> None:
        """Start sending the gradient of this stage's input to the previous stage."""
        self._isend(grad, self.prev, 2 * self.cut - 1)

    def wait(self) -> None:
        """Wait until every send started so far is done."""
        for work in self._sends:
            work.wait()
        self._sends = []

    def _isend(self, t: torch.Tensor, peer: int, tag: int) -> None:
        # The Work holds the tensor it sends (a copy on the CPU, on gloo) until it is done.
        t = t.to(self.wire).contiguous()
        self._sends.append(dist.isend(t, group=self.group, group_dst=peer, tag=tag))

    def _recv(self, like: torch.Tensor, peer: int, tag: int) -> torch.Tensor:
        buf = torch.empty(like.shape, dtype=like.dtype, device=self.wire)
        dist.recv(buf, group=self.group, group_src=peer, tag=tag)
        return buf.to(self.device)


# --- timeline and held activations -------------------------------------------------------


class Timeline:
    """One rank's compute events per step, with the activations held after each.

    ``held`` counts micro-batches whose forward ran and backward has not (GPipe: up to ``m``;
    1F1B: up to ``p-s``; with a split backward, until its W: ZB-H1 up to ``p``); ``held_bytes`` is the bytes of the tensors autograd has saved for
    their backward, parameters excluded, as the training loop's ``SavedTensors`` counts them
    (``pdlab.measure.memory.saved_bytes``). Times are ``time.time()``: the kernel lines up
    events from different processes, and only the wall clock is documented as shared by
    processes (``perf_counter``/``monotonic`` have an undefined reference point).
    """

    def __init__(self, stage: int, split_backward: bool = False):
        self.stage = stage
        self._done = "W" if split_backward else "B"  # the phase that frees a micro-batch
        self._held: set[tuple[int, int]] = set()  # (chunk, micro-batch) between F and backward
        self.events: list[dict] = []

    @contextmanager
    def record(self, mb: int, phase: str, chunk: int = 0) -> Iterator[None]:
        start = time.time()
        yield
        if phase == "F":
            self._held.add((chunk, mb))
        elif phase == self._done:
            self._held.remove((chunk, mb))
        self.events.append(
            {
                "mb": mb,
                "phase": phase,
                "chunk": chunk,
                "stage": self.stage,
                "start": start,
                "end": time.time(),
                "held": len(self._held),
                "held_bytes": memory.saved_bytes(),
            }
        )


def bubble_fraction(events: list[dict]) -> float:
    """Measured bubble, as the papers count it: the ranks' idle time in the step over their
    busy time (compute events), from their events. A rank's time outside its events (waiting
    for a peer's activation, a send, the loss) is idle.

    Events are told apart by ``rank`` where they carry it (several pipelines side by side, as
    in ``dp-pp``), else by ``stage`` (one pipeline).
    """
    lanes = len({e.get("rank", e["stage"]) for e in events})
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return lanes * span / busy - 1


# Each schedule's bubble with equal F, B (and W) times on every stage: a stage's idle time over
# its busy time, Narayanan et al.'s t_pb / t_id (Qi et al. count ZB-H1's the same way).
# ``analytic_bubble`` computes them; a step's share of idle time is bubble / (1 + bubble).
BUBBLE = {
    "pp-gpipe": "(p-1)/m",
    "pp-1f1b": "(p-1)/m",
    "dp-pp": "(p-1)/m",  # GPipe in each replica (hybrid.py)
    "pp-interleaved": "(p-1)/(v·m)",
    "pp-zb": "(p-1)/(3m)",
}


def analytic_bubble(p: int, m: int, strategy: str = "pp-1f1b", v: int = 1) -> float:
    """``BUBBLE[strategy]`` for ``p`` stages, ``m`` micro-batches and ``v`` chunks a rank.

    A stage waits ``p-1`` ticks of one stage's work in fill and drain (GPipe and 1F1B alike)
    beside its ``m`` busy ones. Interleaved, a tick is a chunk pass, ``1/v`` of a stage's
    work: ``v·m`` busy, ``p-1`` idle. ZB-H1 (``m >= p``): ticks of one phase, ``3m`` busy (F,
    B, W), ``p-1`` idle, the ``(p-1)(F+B-W)`` of the paper. ZBV has no entry: zero in theory.
    """
    if strategy not in BUBBLE:
        raise ValueError(f"no bubble formula for {strategy!r} here: use one of {', '.join(BUBBLE)}")
    busy = {"pp-interleaved": v * m, "pp-zb": 3 * m}.get(strategy, m)
    return (p - 1) / busy


def bubbles(config: TrainConfig, records: list[dict]) -> pd.DataFrame:
    """Each step's measured bubble beside ``config``'s formula: one row a step of ``records``
    (``TrainResult.timeline``), columns step, measured, formula (its text) and expected
    (its value; NaN where there is no formula, ZBV)."""
    p = registry.layout_for(config.strategy, config.world_size).pp
    m, v = config.micro_batches, chunks_per_rank(config)
    formula = BUBBLE.get(config.strategy)
    expected = analytic_bubble(p, m, config.strategy, v) if formula else math.nan
    by_step: dict[int, list[dict]] = {}
    for rec in records:
        by_step.setdefault(rec["step"], []).extend(
            {**e, "rank": rec["rank"]} for e in rec["timeline"]
        )
    rows = [
        {
            "step": step,
            "measured": bubble_fraction(events),
            "formula": formula or "-",
            "expected": expected,
        }
        for step, events in sorted(by_step.items())
    ]
    return pd.DataFrame(rows, columns=["step", "measured", "formula", "expected"])


def peak_held(events: list[dict]) -> int:
    """Most micro-batches whose activations one stage held at once."""
    return max(e["held"] for e in events)


# --- the strategies ----------------------------------------------------------------------


class Pipeline(Single):
    """What both impls share: this rank runs stage ``s = mesh.pp_rank`` of ``p = layout.pp``.

    Stage, peers and group come from the mesh's ``pp`` dimension, so the same classes run a
    pipeline inside each data-parallel replica (``dp-pp``, ``hybrid.py``). A subclass runs
    the schedule (``run_schedule``); ``forward_backward`` and ``update`` (an optimizer step)
    are the same for both.
    """

    expected_comm = staticmethod(expected_comm)
    check = staticmethod(check)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        self.check(config, mesh.layout)
        self.config, self.mesh = config, mesh
        self.p, self.s, self.m = mesh.layout.pp, mesh.pp_rank, config.micro_batches
        self.group = mesh.group("pp")
        # This rank's chunks: stages s, s+p, ... of p·v (one, unless pp-interleaved), or ZBV's.
        self.v = chunks_per_rank(config)
        cuts = partition(model, self.p * self.v)
        self.stage_ids = stages_of(config.strategy, self.p, self.s, self.v)
        # Whether it feeds the data in, and computes the loss (ZBV: rank 0 does both).
        self.is_first, self.is_last = 0 in self.stage_ids, self.p * self.v - 1 in self.stage_ids
        ranges = [cuts[g] for g in self.stage_ids]
        chunks = [models.stage(model, start, stop) for start, stop in ranges]
        units = OrderedDict(unit for chunk in chunks for unit in chunk.named_children())
        super().__init__(nn.Sequential(units) if self.v > 1 else chunks[0], config, mesh)
        self._chunks = chunks  # share the units with self.module (one chunk: it is self.module)
        self.timeline = Timeline(self.s, config.strategy in SPLIT_BACKWARD)
        # What crosses each chunk's cuts per micro-batch: the shapes of what it receives.
        x = _example_microbatch(config, mesh.layout)
        outs = _unit_outputs(model, x)
        self.likes = [(outs[start - 1] if start else x, outs[stop - 1]) for start, stop in ranges]

    @property
    def chunks(self) -> list[nn.Module]:
        """This rank's model chunks, each called on its own: one, or ``v`` (pp-interleaved, ZBV)."""
        return self._chunks

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """Run the schedule over ``m`` micro-batches; the last stage reports the mean loss."""
        self.model.zero_grad(set_to_none=True)
        self.timeline.events = []
        losses = self.run_schedule(x, y)
        loss = torch.stack(losses).mean().item() if self.is_last else None
        return StepOutput(loss, len(x) if self.is_last else 0, self.timeline.events)

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward every micro-batch; the last stage returns their losses."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All stages' parameters under the single-process names, on every rank of the pipeline."""
        local = {k: full_tensor(v).detach().cpu() for k, v in self.module.state_dict().items()}
        parts: list[dict | None] = [None] * self.p
        dist.all_gather_object(parts, local, group=self.group)
        return {k: v for part in parts for k, v in part.items()}


class PipelineScratch(Pipeline):
    """``pp-gpipe`` / ``pp-1f1b`` / ``pp-zb`` from scratch: the schedule's actions in order,
    over a ``StageLink``; the sends are waited on at the end of the step."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.links = [
            StageLink(self.group, *self.likes[c], mesh.device, chunk=c, chunks=self.v)
            for c in range(self.v)
        ]

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        xs, ys = x.tensor_split(self.m), y.tensor_split(self.m)
        inputs, outputs, losses = {}, {}, []  # inputs and outputs by (chunk, micro-batch)
        pending_w = {}  # (chunk, micro-batch) -> its units' outputs and gradients, for W
        for phase, i, c in actions(self.config, self.p, self.s):
            link, at = self.links[c], (c, i)
            if phase == "F":
                h = xs[i] if link.is_first else link.recv_forward()
                with self.timeline.record(i, "F", c):
                    outs = self._forward_units(self.chunks[c], h)
                    if link.is_last:
                        losses.append(models.loss_fn(outs[-1], ys[i]))
                        outs[-1] = losses[-1] / self.m  # mean over micro-batches = full-batch loss
                if not link.is_last:
                    link.send_forward(outs[-1])
                inputs[at], outputs[at] = h, outs
            elif phase == "B" and self.config.strategy not in SPLIT_BACKWARD:
                grad = None if link.is_last else link.recv_backward()
                with self.timeline.record(i, "B", c):
                    torch.autograd.backward(outputs.pop(at)[-1], grad)
                h = inputs.pop(at)
                if not link.is_first:
                    link.send_backward(h.grad)
            elif phase == "B":
                grad = None if link.is_last else link.recv_backward()
                with self.timeline.record(i, "B", c):
                    h, outs = inputs.pop(at), outputs.pop(at)
                    grads = backward_input(h, outs, grad)
                if not link.is_first:
                    link.send_backward(grads[0])
                pending_w[at] = (outs, [*grads[1:], grad])
            else:
                with self.timeline.record(i, "W", c):
                    backward_weight(self.chunks[c], *pending_w.pop(at))
        for link in self.links:
            link.wait()
        return [loss.detach() for loss in losses]

    def _forward_units(self, chunk: nn.Sequential, h: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's output in turn; the last is the chunk's. ZB's W starts at each one.
        The chunk itself is called, so hooks on it (a step's timed spans) see its forward."""
        if self.config.strategy not in SPLIT_BACKWARD:
            return [chunk(h)]
        outs: list[torch.Tensor] = []
        hooks = [unit.register_forward_hook(lambda _, __, out: outs.append(out)) for unit in chunk]
        try:
            chunk(h)
        finally:
            for hook in hooks:
                hook.remove()
        return outs


# --- the split backward (ZB's B and W) in plain autograd ---------------------------------


def backward_input(
    h: torch.Tensor, outs: list[torch.Tensor], grad: torch.Tensor | None
) -> list[torch.Tensor | None]:
    """B: the gradients of the stage's input ``h`` and of every unit's input after the first
    (the earlier units' outputs), from ``grad``, the gradient of the last output.

    ``torch.autograd.grad`` follows only the paths to the tensors asked for, so no weight
    gradient is computed, and ``retain_graph`` keeps the graph for W. ``h`` of the first
    stage needs no gradient (the data, or token ids): its place in the answer is ``None``.
    """
    wanted = ([h] if h.requires_grad else []) + outs[:-1]
    got = list(torch.autograd.grad(outs[-1], wanted, grad, retain_graph=True)) if wanted else []
    return got if h.requires_grad else [None, *got]


def backward_weight(
    units: nn.Sequential, outs: list[torch.Tensor], grads: list[torch.Tensor | None]
) -> None:
    """W: every unit's weight gradients, accumulated into ``.grad``, from the gradient of its
    output that B found (``grads[k]`` for ``outs[k]``, the output of ``units[k]``).

    ``inputs=`` the unit's parameters: autograd goes back from the unit's output only along
    the paths to them, inside the unit (B already carried the gradient past it), and frees
    the graph behind it. Inside a unit those paths re-run part of B's work (a transformer
    block's attention backward, to reach its q, k, v weights); torch's own split
    (``stage_backward_weight``) keeps B's intermediate gradients to avoid that.
    """
    for unit, out, grad in zip(units, outs, grads, strict=True):
        params = [q for q in unit.parameters() if q.requires_grad]
        if params:
            torch.autograd.backward(out, grad, inputs=params)


class _TimedStage(PipelineStage):
    """torch's stage, recording each micro-batch's forward and backward in a Timeline: the
    full backward as B, or, under a zero-bubble schedule, its input half as B and its weight
    half (``backward_weight_one_chunk``) as W.

    The timings are exact for the stage's compute; the last stage's loss is computed by the
    schedule outside ``forward_one_chunk``, so it falls between events.
    """

    def __init__(self, timeline: Timeline, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeline = timeline

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record(fwd_chunk_id, "F", self.stage_index // self.group_size):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record(bwd_chunk_id, "B", self.stage_index // self.group_size):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record(bwd_chunk_id, "W", self.stage_index // self.group_size):
            return super().backward_weight_one_chunk(bwd_chunk_id, *args, **kwargs)


class PipelineTorch(Pipeline):
    """``pp-gpipe`` / ``pp-1f1b`` / ``pp-zb`` with PyTorch: the same stage given to a
    ``PipelineStage`` and run by ``ScheduleGPipe`` / ``Schedule1F1B`` /
    ``ScheduleInterleavedZeroBubble`` (one stage a rank: ZB-H1), which divide the gradients
    by ``m``. The zero-bubble one runs on gloo in torch 2.13 (the hang of pytorch issue
    132644 was fixed by PR 152938)."""

    @staticmethod
    def check(config: TrainConfig, layout: Layout) -> None:
        check(config, layout)
        if config.strategy == "pp-1f1b" and config.micro_batches < layout.pp:
            raise ValueError(
                f"torch's Schedule1F1B needs at least as many micro-batches as stages: use "
                f"micro_batches >= {layout.pp} (or impl='scratch', whose 1F1B runs any number)"
            )
        rounds = max(1, config.micro_batches // layout.pp)
        if config.strategy == "pp-zb" and config.micro_batches % rounds:
            raise ValueError(
                f"torch's ScheduleInterleavedZeroBubble runs micro-batches in rounds of "
                f"{layout.pp} and needs micro_batches ({config.micro_batches}) to be a "
                f"multiple of its {rounds} rounds: use a multiple of {layout.pp} (or "
                f"impl='scratch')"
            )

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        if wire_device(self.group, mesh.device) != mesh.device:
            raise ValueError(
                "torch.distributed.pipelining sends CUDA tensors point to point, which gloo "
                "cannot: run it with one GPU per rank (NCCL), or use impl='scratch'"
            )
        stages = [
            _TimedStage(
                self.timeline,
                chunk,
                self.stage_ids[c],
                self.p * self.v,
                mesh.device,
                # Static shapes (no metadata exchange); requires_grad says which grads flow.
                input_args=self._empty(input_like).requires_grad_(self.stage_ids[c] > 0),
                output_args=self._empty(output_like).requires_grad_(),
                group=self.group,
            )
            for c, (chunk, (input_like, output_like)) in enumerate(
                zip(self.chunks, self.likes, strict=True)
            )
        ]
        schedule = TORCH_SCHEDULES[config.strategy]
        looped = schedule in (
            ScheduleInterleavedZeroBubble,
            ScheduleInterleaved1F1B,
            ScheduleZBVZeroBubble,
        )
        self._schedule = schedule(
            stages if looped else stages[0], n_microbatches=self.m, loss_fn=models.loss_fn
        )
        # The one-time P2P handshake now rather than inside the first step, so every step
        # sends only activations and gradients.
        compat.initialize_pipeline_stage(self._schedule)

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        return torch.empty(like.shape, dtype=like.dtype, device=self.mesh.device)

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        self._schedule.step(*([x] if self.is_first else []), target=y, losses=losses)
        return losses
