"""Pipeline parallelism: the model's units cut into ``p`` contiguous stages, one per rank.

Each step splits this rank's batch into ``m`` micro-batches. Stage ``s`` receives a
micro-batch's activation from stage ``s-1``, runs its units, sends the result to ``s+1``;
backward runs the other way, sending the gradient of the stage's input. Two schedules:

- GPipe (Huang et al. 2019, arXiv 1811.06965): all ``m`` forwards, then all ``m`` backwards.
  Every stage holds ``m`` micro-batches' activations; the bubble is ``(p-1)/(m+p-1)``.
  ``micro_batches=1`` is the naive pipeline: one stage busy at a time.
- 1F1B, PipeDream-Flush (Narayanan et al. 2021, arXiv 2104.04473): ``p-s-1`` warm-up
  forwards, then one forward one backward, then the cool-down backwards. Same bubble, but a
  stage holds at most ``p-s`` micro-batches' activations.
- ZB-H1, zero bubble (Qi et al. 2023, arXiv 2401.10241): each backward split in two, B (the
  gradient of the stage's input, which the previous stage waits for) and W (the weight
  gradients, which nobody waits for). Stage ``s`` runs 1F1B's order with B in place of the
  backward and each W ``p-1`` micro-batches later, where 1F1B's stages sat idle. With equal
  F, B and W times the bubble drops to ``(p-1)/(3m+p-1)`` of the step (``(p-1)/(3m)`` of the
  compute) for ``m >= p``; the traffic is 1F1B's, and a stage holds at most ``p``
  micro-batches (1F1B's peak, on stage 0).

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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleavedZeroBubble,
)

from pdlab import compat
from pdlab.measure import memory
from pdlab.measure.comm import CommEvent, event
from pdlab.training import models
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
    units = len(meta_model(config))
    if layout.pp > units:
        raise ValueError(
            f"{layout.pp} pipeline stages but model {config.model!r} has only {units} units: "
            f"use at most {units} stages"
        )
    per_rank = config.batch_size // layout.dp
    if config.micro_batches < 1 or per_rank % config.micro_batches:
        raise ValueError(
            f"the batch per data-parallel rank ({per_rank}) does not split into "
            f"{config.micro_batches} micro-batches: use a divisor of {per_rank}"
        )


def _example_microbatch(config: TrainConfig, layout: Layout) -> torch.Tensor:
    """A micro-batch of real inputs: its shape and dtype fix every activation's."""
    mb = config.batch_size // layout.dp // config.micro_batches
    return load_dataset(config.model, config.seed).x[:mb]


def _unit_outputs(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Each unit's output for input ``x``, as meta tensors (shapes and dtypes, no data)."""
    outs, h = [], x.to("meta")
    for unit in copy.deepcopy(model).to("meta"):  # the copy keeps the weights where they are
        h = unit(h)
        outs.append(h)
    return outs


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """One step's traffic on every rank of the ``pp`` group (and of each ``dp`` replica).

    Per micro-batch and stage boundary: the activation forward and its gradient backward,
    each a send of ``b * activation shape * dtype size`` bytes (``b`` = micro-batch size;
    its payload counted at the sender) and the matching recv (payload 0; it receives those
    bytes). Both impls send exactly this:
    torch's one-time handshake runs when the strategy is built, not in a step.
    """
    model, m, p = meta_model(config), config.micro_batches, layout.pp
    outs = _unit_outputs(model, _example_microbatch(config, layout))
    stage_of = [layout.coords(rank)[1] for rank in range(layout.world_size)]
    events = []
    for s, (_, stop) in enumerate(partition(model, p)[:-1]):
        size = outs[stop - 1].nbytes
        # The ranks of stage s and of stage s+1, replica by replica (dp-pp has several).
        pairs = zip(
            [r for r, t in enumerate(stage_of) if t == s],
            [r for r, t in enumerate(stage_of) if t == s + 1],
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
}
SPLIT_BACKWARD = ("pp-zb",)  # the schedules whose backward is B then W


# --- the link between stages ------------------------------------------------------------


class StageLink:
    """One pipeline stage's line to its neighbours in ``group``: activations forward, the
    gradients of those activations backward.

    The stage is this rank's place in ``group`` (``None``: the world), its neighbours the
    ranks before and after it. ``input_like`` and ``output_like`` are one micro-batch's input
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
    ):
        self.group = group or dist.group.WORLD
        self.stage, self.stages = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.is_first, self.is_last = self.stage == 0, self.stage == self.stages - 1
        self.input_like, self.output_like = input_like, output_like
        self.device, self.wire = device, wire_device(self.group, device)
        self._sends: list[dist.Work] = []

    def recv_forward(self) -> torch.Tensor:
        """The previous stage's activation, ready for autograd: after backward, its ``.grad``
        is what ``send_backward`` returns to that stage."""
        return self._recv(self.input_like, self.stage - 1).requires_grad_()

    def send_forward(self, out: torch.Tensor) -> None:
        """Start sending this stage's output to the next stage."""
        self._isend(out.detach(), self.stage + 1)

    def recv_backward(self) -> torch.Tensor:
        """The gradient of this stage's output, from the next stage."""
        return self._recv(self.output_like, self.stage + 1)

    def send_backward(self, grad: torch.Tensor) -> None:
        """Start sending the gradient of this stage's input to the previous stage."""
        self._isend(grad, self.stage - 1)

    def wait(self) -> None:
        """Wait until every send started so far is done."""
        for work in self._sends:
            work.wait()
        self._sends = []

    def _isend(self, t: torch.Tensor, peer: int) -> None:
        # The Work holds the tensor it sends (a copy on the CPU, on gloo) until it is done.
        t = t.to(self.wire).contiguous()
        self._sends.append(dist.isend(t, group=self.group, group_dst=peer))

    def _recv(self, like: torch.Tensor, peer: int) -> torch.Tensor:
        buf = torch.empty(like.shape, dtype=like.dtype, device=self.wire)
        dist.recv(buf, group=self.group, group_src=peer)
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
        self._held: set[int] = set()  # micro-batches between their forward and backward
        self.events: list[dict] = []

    @contextmanager
    def record(self, mb: int, phase: str) -> Iterator[None]:
        start = time.time()
        yield
        if phase == "F":
            self._held.add(mb)
        elif phase == self._done:
            self._held.remove(mb)
        self.events.append(
            {
                "mb": mb,
                "phase": phase,
                "stage": self.stage,
                "start": start,
                "end": time.time(),
                "held": len(self._held),
                "held_bytes": memory.saved_bytes(),
            }
        )


def bubble_fraction(events: list[dict]) -> float:
    """Measured bubble: the idle share of the ranks' time over the step, from their events.

    Events are told apart by ``rank`` where they carry it (several pipelines side by side, as
    in ``dp-pp``), else by ``stage`` (one pipeline).
    """
    lanes = len({e.get("rank", e["stage"]) for e in events})
    span = max(e["end"] for e in events) - min(e["start"] for e in events)
    busy = sum(e["end"] - e["start"] for e in events)
    return 1 - busy / (lanes * span)


def analytic_bubble(p: int, m: int, strategy: str = "pp-1f1b") -> float:
    """The idle share of a step with equal phase times on every stage.

    GPipe and 1F1B: ``(p-1)/(m+p-1)``, the ``p-1`` fill and drain slots of F+B beside ``m``
    busy ones. ZB-H1 (``m >= p``): ``(p-1)/(3m+p-1)``; each stage is busy ``3m`` (F, B, W)
    and idle ``p-1`` ticks of one phase, the ``(p-1)(F+B-W)`` of the paper.
    """
    if strategy == "pp-zb":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)


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
        self.is_first, self.is_last = self.s == 0, self.s == self.p - 1
        self.group = mesh.group("pp")
        start, stop = partition(model, self.p)[self.s]
        super().__init__(models.stage(model, start, stop), config, mesh)
        self.timeline = Timeline(self.s, config.strategy in SPLIT_BACKWARD)
        # What crosses this stage's cuts per micro-batch: the shapes of what it receives.
        x = _example_microbatch(config, mesh.layout)
        outs = _unit_outputs(model, x)
        self.input_like = outs[start - 1] if start else x
        self.output_like = outs[stop - 1]

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
        self.link = StageLink(self.group, self.input_like, self.output_like, mesh.device)

    def run_schedule(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        xs, ys, link = x.tensor_split(self.m), y.tensor_split(self.m), self.link
        inputs, outputs, losses = {}, {}, []
        pending_w = {}  # micro-batch -> each unit's output and its gradient, for its W
        for phase, i in SCHEDULES[self.config.strategy](self.m, self.p, self.s):
            if phase == "F":
                h = xs[i] if self.is_first else link.recv_forward()
                with self.timeline.record(i, "F"):
                    outs = self._forward_units(h)
                    if self.is_last:
                        losses.append(models.loss_fn(outs[-1], ys[i]))
                        outs[-1] = losses[-1] / self.m  # mean over micro-batches = full-batch loss
                if not self.is_last:
                    link.send_forward(outs[-1])
                inputs[i], outputs[i] = h, outs
            elif phase == "B" and self.config.strategy not in SPLIT_BACKWARD:
                grad = None if self.is_last else link.recv_backward()
                with self.timeline.record(i, "B"):
                    torch.autograd.backward(outputs.pop(i)[-1], grad)
                h = inputs.pop(i)
                if not self.is_first:
                    link.send_backward(h.grad)
            elif phase == "B":
                grad = None if self.is_last else link.recv_backward()
                with self.timeline.record(i, "B"):
                    h, outs = inputs.pop(i), outputs.pop(i)
                    grads = backward_input(h, outs, grad)
                if not self.is_first:
                    link.send_backward(grads[0])
                pending_w[i] = (outs, [*grads[1:], grad])
            else:
                with self.timeline.record(i, "W"):
                    backward_weight(self.module, *pending_w.pop(i))
        link.wait()
        return [loss.detach() for loss in losses]

    def _forward_units(self, h: torch.Tensor) -> list[torch.Tensor]:
        """Each unit's output in turn; the last is the stage's. ZB's W starts at each one."""
        if self.config.strategy not in SPLIT_BACKWARD:
            return [self.module(h)]
        outs = []
        for unit in self.module:
            h = unit(h)
            outs.append(h)
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
        with self.timeline.record(fwd_chunk_id, "F"):
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record(bwd_chunk_id, "B"):
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        with self.timeline.record(bwd_chunk_id, "W"):
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
        stage = _TimedStage(
            self.timeline,
            self.module,
            self.s,
            self.p,
            mesh.device,
            # Static shapes (no metadata exchange); requires_grad says which grads flow.
            input_args=self._empty(self.input_like).requires_grad_(not self.is_first),
            output_args=self._empty(self.output_like).requires_grad_(),
            group=self.group,
        )
        schedule = TORCH_SCHEDULES[config.strategy]
        multi = schedule is ScheduleInterleavedZeroBubble  # a looped schedule: takes a list
        self._schedule = schedule(
            [stage] if multi else stage, n_microbatches=self.m, loss_fn=models.loss_fn
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
