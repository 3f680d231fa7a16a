"""The labs' exercises: a small function you write, checked on the cluster's real ranks.

Each ``check_*`` sends your function to every rank of a ``pdlab.Cluster``, runs it there
beside a reference (one process computing the same thing, or pdlab's own strategy code) and
prints PASS, or FAIL with what was expected, what came back and a hint naming the mistake. It
returns whether it passed. A function that raises, or waits forever in a collective, is a
FAIL, not a stuck notebook. The reference solutions are in ``pdlab.lab.solutions``.

A checker looks at *how* the answer got there, not only at its numbers: the collectives a
rank issued and their bytes (``pdlab.measure.comm.CommMeter``), the multiply-adds it did
(``torch.utils.flop_counter.FlopCounterMode``), what each pipeline stage sent its
neighbours, and the optimizer state a rank holds. So an answer that computes the right
numbers the wrong way (the whole output sliced, data parallelism passed off as ZeRO-1) fails.

| lab | you write | checked by |
|---|---|---|
| 01 | ``allreduce_gradients(params, group)`` | ``check_gradient_allreduce`` |
| 02 | ``column_parallel_forward(x, linear, rank, world_size)`` | ``check_column_parallel`` |
| 03 | ``gpipe_step(stage, xs, ys, link)`` | ``check_gpipe`` |
| 04 | ``zero1_update(z)`` | ``check_zero1`` |
| 04 | a ``strategy``, ``recompute`` and ``precision`` that fit a budget | ``check_fit`` |
| 08 | ``ring_step(state, q, k, v, q_pos, k_pos, scale)`` | ``check_ring_step`` |
| 08 | ``dispatch(routed, counts, group)`` | ``check_dispatch`` |
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pdlab.control import runtime
from pdlab.control.cluster import CallTimeout, Cluster, RankError
from pdlab.measure.comm import CommMeter
from pdlab.training import models
from pdlab.training.config import TrainConfig
from pdlab.training.data import load_dataset, points
from pdlab.training.layout import Layout
from pdlab.training.loop import mesh_for, train
from pdlab.training.parallel import context, expert
from pdlab.training.parallel.data import flatten
from pdlab.training.parallel.pipeline import StageLink, partition
from pdlab.training.parallel.sharded import Zero1

TIMEOUT_S = 30.0  # a check whose ranks take longer is waiting in a collective a peer skipped
TOLERANCE = 1e-5
COLLECTIVE_WAIT = (
    "a collective returns only when every rank of its group has called it: call it on every "
    "rank, in the same order, with tensors of the same shape"
)

# ---- reporting ----------------------------------------------------------------------------


def report(
    name: str, passed: bool, summary: str, expected: str = "", actual: str = "", hint: str = ""
) -> bool:
    """Print ``PASS name: summary``, or FAIL with expected, actual and a hint; return ``passed``."""
    if passed:
        print(f"PASS {name}: {summary}")
    else:
        print(
            f"FAIL {name}: {summary}\n  expected: {expected}\n  actual:   {actual}\n  hint: {hint}"
        )
    return passed


def _exception_line(err: RankError) -> str:
    """The failing rank's ``Type: message`` line (the last traceback line naming its type)."""
    lines = (err.remote_traceback or str(err)).strip().splitlines()
    named = [line for line in lines if err.exc_type and line.startswith(err.exc_type)]
    return (named or lines)[-1]


Explain = Callable[[str], str | None]  # an exception's last line -> a hint naming the mistake


def _run(
    cluster: Cluster,
    name: str,
    rank_fn: Callable,
    *args: Any,
    explain: Explain = lambda line: None,
    waiting: str = COLLECTIVE_WAIT,
) -> list | None:
    """``rank_fn(*args)`` on every rank; on an error or a hang, print a FAIL and return None.

    ``explain`` turns a known exception into a hint; ``waiting`` is the hint for a hang."""
    try:
        return cluster.run(rank_fn, *args, timeout=TIMEOUT_S)
    except CallTimeout as err:
        report(
            name,
            False,
            "the ranks never finished",
            "every rank returns",
            f"rank(s) {err.ranks} still waiting after {TIMEOUT_S:.0f} s",
            waiting,
        )
    except RankError as err:
        last = _exception_line(err)
        if last.startswith("NotImplementedError"):
            report(
                name,
                False,
                "not written yet",
                "your code",
                last,
                "replace the `raise NotImplementedError` in the exercise cell with your code",
            )
        else:
            report(
                name,
                False,
                f"rank {err.rank} raised an exception",
                "no exception",
                last,
                explain(last)
                or "read the error above: it is the last line of that rank's traceback",
            )
    return None


def _splits(name: str, total: int, parts: int, what: str) -> bool:
    """False, with a FAIL saying which cluster to use, when ``total`` won't split in ``parts``."""
    if total % parts == 0:
        return True
    return report(
        name,
        False,
        f"this check splits {total} {what} evenly over the ranks, and {parts} don't divide it",
        f"a world size that divides {total}",
        f"world size {parts}",
        "run the check on a cluster of 2 or 4 ranks: pdlab.Cluster(2)",
    )


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _close(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return a is not None and a.shape == b.shape and _max_diff(a, b) <= TOLERANCE


def _show(t: torch.Tensor) -> str:
    return str([round(v, 5) for v in t.flatten()[:4].tolist()])


def _ops(meter: CommMeter) -> list[tuple[str, int]]:
    """The collectives and sends a meter saw, as ``(op, payload bytes)``."""
    return [(e.op, e.payload_bytes) for e in meter.events]


# ---- lab 01: the worked example and the gradient all-reduce --------------------------------

WORKED_SAMPLES = 20
WORKED_LR = 0.1


def worked_example(
    shard: int = 0, num_shards: int = 1, seed: int = 0
) -> tuple[nn.Sequential, torch.Tensor, torch.Tensor]:
    """The article's worked example: a 2 -> 10 -> 3 network with sigmoid activations, and
    shard ``shard`` of ``num_shards`` (contiguous, equal) of its 20 samples, targets one-hot."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 10), nn.Sigmoid(), nn.Linear(10, 3), nn.Sigmoid())
    x, labels = points(WORKED_SAMPLES, seed)
    y = F.one_hot(labels, 3).float()
    per = WORKED_SAMPLES // num_shards
    return model, x[shard * per : (shard + 1) * per], y[shard * per : (shard + 1) * per]


def squared_error(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``½ Σ (f - y)²`` over the classes, averaged over the samples.

    A mean, so the mean of equal shards' gradients is the whole batch's gradient.
    """
    return 0.5 * ((f - y) ** 2).sum(dim=1).mean()


def worked_gradients(shard: int = 0, num_shards: int = 1) -> list[torch.Tensor]:
    """One backward of the worked example on one shard: each parameter's gradient."""
    model, x, y = worked_example(shard, num_shards)
    squared_error(model(x), y).backward()
    return [p.grad for p in model.parameters()]


def _dp_on_rank(allreduce_gradients: Callable) -> dict:
    model, x, y = worked_example(runtime.rank(), runtime.world_size())
    squared_error(model(x), y).backward()
    params = list(model.parameters())
    with CommMeter() as meter:
        allreduce_gradients(params, dist.group.WORLD)
    return {"grads": [p.grad.detach().clone() for p in params], "ops": _ops(meter)}


def _allreduce_hint(rank: int, n: int, grads: list, ops: list, full: list) -> str:
    """What a rank whose gradients differ from one process's did wrong."""
    own = worked_gradients(rank, n)
    names = [name for name, _ in worked_example()[0].named_parameters()]
    averaged = [_close(g, e) for g, e in zip(grads, full, strict=True)]
    kinds = {op for op, _ in ops}
    if all(_close(g, n * e) for g, e in zip(grads, full, strict=True)):
        return (
            f"rank {rank}'s gradients are {n} times too big: all_reduce sums; divide by the "
            "group's size for the mean"
        )
    if "reduce" in kinds and "all_reduce" not in kinds:
        return (
            "dist.reduce leaves the sum on one rank (its dst) only: dist.all_reduce gives every "
            "rank the sum"
        )
    if any(averaged):
        left = [name for name, ok in zip(names, averaged, strict=True) if not ok]
        return (
            f"only some parameters were averaged: {', '.join(left)} still hold rank {rank}'s "
            "own gradient: all-reduce the .grad of every p in params"
        )
    if all(_close(g, e) for g, e in zip(grads, own, strict=True)):
        if not ops:
            return (
                f"rank {rank} still has the gradient of its own {WORKED_SAMPLES // n} samples "
                "and issued no collective: all-reduce every p.grad over the group"
            )
        return (
            f"rank {rank} all-reduced {sum(b for _, b in ops)} bytes, yet its p.grad is still "
            "its own: all_reduce changes the tensor you give it, in place; a copy (.clone(), "
            "torch.cat, .data of something else) is reduced and thrown away: reduce p.grad"
        )
    return "sum every p.grad over the group with dist.all_reduce, then divide by its size"


def check_gradient_allreduce(cluster: Cluster, allreduce_gradients: Callable) -> bool:
    """Check ``allreduce_gradients(params, group)``: afterwards every rank's ``p.grad`` must
    be the gradient of all 20 samples, as one process computes it."""
    name = "gradient all-reduce"
    if not _splits(name, WORKED_SAMPLES, cluster.world_size, "samples"):
        return False
    got = _run(cluster, name, _dp_on_rank, allreduce_gradients)
    if got is None:
        return False
    n = cluster.world_size
    full = worked_gradients()
    for rank, out in enumerate(got):
        grads = out["grads"]
        wrong = [i for i, (g, e) in enumerate(zip(grads, full, strict=True)) if not _close(g, e)]
        if not wrong:
            continue
        name_of = [name for name, _ in worked_example()[0].named_parameters()][wrong[0]]
        expected, actual = (f"{name_of}'s gradient {_show(t[wrong[0]])}" for t in (full, grads))
        return report(
            name,
            False,
            f"rank {rank}'s gradients differ from one process",
            expected,
            actual,
            _allreduce_hint(rank, n, grads, out["ops"], full),
        )
    worst = max(_max_diff(g, e) for out in got for g, e in zip(out["grads"], full, strict=True))
    return report(
        name,
        True,
        f"all {n} ranks hold the gradient of all {WORKED_SAMPLES} samples "
        f"(max |Δ| vs one process = {worst:.1e}), each all-reducing "
        f"{sum(b for op, b in got[0]['ops'] if op == 'all_reduce')} bytes",
    )


# ---- lab 02: a column-parallel linear ------------------------------------------------------


def _example_linear() -> tuple[nn.Linear, torch.Tensor]:
    """A linear whose input and output widths differ (6 -> 8), so rows and columns can't be
    confused silently, and a batch of 5."""
    torch.manual_seed(0)
    return nn.Linear(6, 8), torch.randn(5, 6)


def _tp_on_rank(column_parallel_forward: Callable) -> dict:
    linear, x = _example_linear()
    with FlopCounterMode(display=False) as flops:
        y = column_parallel_forward(x, linear, runtime.rank(), runtime.world_size())
    return {"y": y.detach(), "flops": flops.get_total_flops()}


def _explain_linear(line: str) -> str | None:
    if "cannot be multiplied" in line or "size of tensor a" in line:
        return (
            "nn.Linear stores A transposed: linear.weight is (out_features, in_features), so "
            "a block of A's columns is a block of weight's *rows*, weight[r*k:(r+1)*k], and "
            "the bias splits the same way, bias[r*k:(r+1)*k]"
        )
    return None


def check_column_parallel(cluster: Cluster, column_parallel_forward: Callable) -> bool:
    """Check ``column_parallel_forward(x, linear, rank, world_size)``: rank r must return
    block r of the output's columns, ``Y_r = X A_r + b_r``, computed from its block alone
    (counted: its multiply-adds must be its block's, not the whole layer's)."""
    name = "column-parallel linear"
    linear, x = _example_linear()
    n = cluster.world_size
    if not _splits(name, linear.out_features, n, "columns"):
        return False
    got = _run(cluster, name, _tp_on_rank, column_parallel_forward, explain=_explain_linear)
    if got is None:
        return False
    k = linear.out_features // n
    block_flops = 2 * x.shape[0] * linear.in_features * k  # a multiply-add is 2 FLOPs
    with torch.no_grad():
        blocks = linear(x).chunk(n, dim=1)
        biases = linear.bias.chunk(n)
    for rank, out in enumerate(got):
        y, want = out["y"], blocks[rank]
        expected = f"shape {tuple(want.shape)}, values {_show(want)}"
        actual = f"shape {tuple(y.shape)}, values {_show(y)}"
        if _close(y, want):
            if out["flops"] <= block_flops:
                continue
            return report(
                name,
                False,
                f"rank {rank}'s block is right, but it did {out['flops'] / block_flops:g}x "
                "its block's work",
                f"{block_flops} FLOPs: X {tuple(x.shape)} times A_{rank}, "
                f"{linear.in_features} x {k}",
                f"{out['flops']} FLOPs",
                f"you multiplied by all {linear.out_features} columns and kept your {k}: "
                f"{out['flops'] / block_flops:g}x the work of your block. Take this rank's "
                "rows of linear.weight and linear.bias first, then multiply: a rank that holds "
                "only its block can't do otherwise",
            )
        if y.shape == (x.shape[0], linear.out_features):
            hint = (
                "that is the whole output: use only this rank's rows of linear.weight "
                "(nn.Linear stores A transposed) and of linear.bias"
            )
        elif any(_close(y, b) for b in blocks):
            hint = "that is another rank's block: pick block number `rank`"
        elif _close(y, want - biases[rank]):
            hint = (
                f"the bias is missing: add this rank's block of it, bias[{rank * k}:{rank * k + k}]"
            )
        else:
            hint = (
                "take rows rank*k:(rank+1)*k of linear.weight and linear.bias, "
                f"k = out_features // world_size = {k}"
            )
        return report(
            name, False, f"rank {rank}'s output is not its block of columns", expected, actual, hint
        )
    return report(
        name,
        True,
        f"each of {n} ranks computed its {k} of the {linear.out_features} output columns "
        f"with {block_flops} FLOPs, 1/{n} of the layer's; side by side they are one "
        "process's output",
    )


# ---- lab 03: a GPipe step ------------------------------------------------------------------


PIPE_MODEL, PIPE_BATCH = "mlp", 16
PIPE_WAITING = (
    "a stage waited forever for its neighbour: every link.recv_forward() needs the previous "
    "stage's link.send_forward(out), and every link.recv_backward() the next stage's "
    "link.send_backward(h.grad): the last stage sends nothing forward, the first nothing back"
)


def _pipe_stage(model: nn.Sequential, stage: int, stages: int, m: int):
    """Stage ``stage`` of ``model`` as ``partition`` cuts it, with its link for micro-batches of
    ``PIPE_BATCH / m`` samples."""
    start, stop = partition(model, stages)[stage]
    h = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)[0].tensor_split(m)[0]
    with torch.no_grad():
        h_in = model[:start](h)
        h_out = model[start:stop](h_in)
    link = StageLink(None, h_in, h_out, h.device)  # the stages are the world's ranks
    return models.stage(model, start, stop), link


def _recording(send: Callable, sent: list) -> Callable:
    """``send``, keeping a copy of every tensor it sends in ``sent``."""

    def wrapped(t: torch.Tensor) -> None:
        sent.append(t.detach().clone())
        send(t)

    return wrapped


def _gpipe_on_rank(gpipe_step: Callable, m: int) -> dict:
    rank, stages = runtime.rank(), runtime.world_size()
    stage, link = _pipe_stage(models.build_model(PIPE_MODEL), rank, stages, m)
    order: list[str] = []
    stage.register_forward_pre_hook(lambda *_: order.append("F"))
    next(stage.parameters()).register_post_accumulate_grad_hook(lambda _: order.append("B"))
    forward, backward = [], []
    link.send_forward = _recording(link.send_forward, forward)
    link.send_backward = _recording(link.send_backward, backward)
    x, y = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)
    gpipe_step(stage, x.tensor_split(m), y.tensor_split(m), link)
    link.wait()
    grads = {k: p.grad for k, p in stage.named_parameters()}
    return {"order": "".join(order), "grads": grads, "forward": forward, "backward": backward}


def _one_process_cuts(stages: int, m: int) -> list[dict]:
    """What crosses each cut of one process's model, per micro-batch: the activation forward
    and, backward, the gradient of the mean loss over the micro-batches with respect to it."""
    model = models.build_model(PIPE_MODEL)
    x, y = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)
    cuts = []
    for _, stop in partition(model, stages)[:-1]:
        acts, grads = [], []
        for xi, yi in zip(x.tensor_split(m), y.tensor_split(m), strict=True):
            h = model[:stop](xi).detach().requires_grad_()
            (models.loss_fn(model[stop:](h), yi) / m).backward()
            acts.append(h.detach())
            grads.append(h.grad)
        cuts.append({"forward": acts, "backward": grads})
    return cuts


def _messages_hint(stage: int, what: str, sent: list, want: list, m: int) -> str | None:
    """A hint if what ``stage`` sent ``what`` ("forward", "backward") isn't ``want``."""
    if len(sent) == len(want) and all(_close(s, w) for s, w in zip(sent, want, strict=True)):
        return None
    if len(sent) != len(want):
        return (
            f"stage {stage} sent {len(sent)} tensor(s) {what} where GPipe sends one per "
            f"micro-batch, {len(want)}"
        )
    if what == "forward":
        return (
            f"stage {stage} sent forward something other than its output: send_forward(out) "
            "each micro-batch's output of this stage, in micro-batch order"
        )
    if all(_close(s, m * w) for s, w in zip(sent, want, strict=True)):
        return (
            f"the gradients are m = {m} times too big: divide each micro-batch's loss by the "
            "number of micro-batches (the batch's loss is their mean)"
        )
    return (
        f"stage {stage} sent back something other than the gradient of its input: after "
        "out.backward(...), send_backward(h.grad), where h is what recv_forward() returned "
        "for that micro-batch"
    )


def check_gpipe(cluster: Cluster, gpipe_step: Callable, micro_batches: int = 4) -> bool:
    """Check ``gpipe_step(stage, xs, ys, link)``: every stage runs all ``m`` forwards, then all
    ``m`` backwards; sends each micro-batch's output forward and the gradient of its input
    back (both compared with one process's); and ends with one process's gradients."""
    name, m = "GPipe step", micro_batches
    if not _splits(name, PIPE_BATCH, m, "samples into micro-batches"):
        return False
    got = _run(cluster, name, _gpipe_on_rank, gpipe_step, m, waiting=PIPE_WAITING)
    if got is None:
        return False
    for rank, out in enumerate(got):
        if out["order"] != "F" * m + "B" * m:
            return report(
                name,
                False,
                f"stage {rank} ran its micro-batches in another order",
                "F" * m + "B" * m,
                out["order"],
                "GPipe runs every micro-batch's forward first, then every backward",
            )
    cuts = _one_process_cuts(len(got), m)
    for rank, out in enumerate(got):
        for what, cut in (("forward", rank), ("backward", rank - 1)):
            want = cuts[cut][what] if 0 <= cut < len(cuts) else []
            hint = _messages_hint(rank, what, out[what], want, m)
            if hint is not None:
                sent = out[what]
                return report(
                    name,
                    False,
                    f"stage {rank} sent the wrong tensors {what}",
                    f"{len(want)} tensor(s), the first {_show(want[0]) if want else '-'}",
                    f"{len(sent)} tensor(s), the first {_show(sent[0]) if sent else '-'}",
                    hint,
                )
    model = models.build_model(PIPE_MODEL)
    x, y = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)
    models.loss_fn(model(x), y).backward()
    full = dict(model.named_parameters())
    for rank, out in enumerate(got):
        for key, grad in out["grads"].items():
            want = full[key].grad
            if _close(grad, want):
                continue
            if grad is not None and _close(grad, m * want):
                hint = (
                    f"the gradients are m = {m} times too big: divide each micro-batch's "
                    "loss by the number of micro-batches (the batch's loss is their mean)"
                )
            else:
                hint = (
                    "each stage must backward through every micro-batch: the last stage "
                    "from its loss, the others from link.recv_backward()"
                )
            actual = "no gradient" if grad is None else _show(grad)
            return report(
                name,
                False,
                f"stage {rank}'s gradient of {key} differs from one process",
                _show(want),
                actual,
                hint,
            )
    return report(
        name,
        True,
        f"{len(got)} stages ran {'F' * m + 'B' * m}, passed each micro-batch's activation "
        "forward and its gradient back, and hold the whole batch's gradients, as one process "
        "computes them",
    )


# ---- lab 04: a ZeRO-1 update ---------------------------------------------------------------

ZERO_STEPS = 2
ZERO_LR = 0.01


def _zero_config(world_size: int) -> TrainConfig:
    """Adam: its two moments a weight are the state ZeRO-1 shards (SGD would have none)."""
    return TrainConfig(
        strategy="zero1",
        model="mlp",
        steps=ZERO_STEPS,
        batch_size=16,
        optimizer="adam",
        lr=ZERO_LR,
        world_size=world_size,
    )


def _zero1_on_rank(zero1_update: Callable) -> dict:
    config = _zero_config(runtime.world_size())
    mesh = mesh_for(Layout(dp=config.world_size), runtime.device())  # groups made once
    z = Zero1(models.build_model(config.model, config.seed), config, mesh)
    z.update = types.MethodType(zero1_update, z)
    data = load_dataset(config.model, config.seed)
    steps = []
    for step in range(config.steps):
        x, y = data.batch(step, config.batch_size, mesh.dp_rank, config.world_size)
        with CommMeter() as meter:
            z.train_step(x, y)
        steps.append({"ops": _ops(meter), "shard_grad": z.owned.grad.detach().clone()})
    state = [t for s in z.optimizer.state.values() for t in s.values() if t.dim() > 0]
    return {
        "params": flatten([p.detach() for p in z.model.parameters()]),
        "shard": len(z.owned),
        "flat": len(z.flat_param),
        "state_elements": sum(t.numel() for t in state),
        "steps": steps,
    }


def _one_process_zero() -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One process, Adam on the whole batch: the final flat parameters and, each step, the
    flat gradient that step applied."""
    config = _zero_config(1)
    model = models.build_model(config.model, config.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    data = load_dataset(config.model, config.seed)
    grads = []
    for step in range(config.steps):
        x, y = data.batch(step, config.batch_size)
        optimizer.zero_grad()
        models.loss_fn(model(x), y).backward()
        grads.append(flatten([p.grad for p in model.parameters()]))
        optimizer.step()
    return flatten([p.detach() for p in model.parameters()]), grads


def _explain_zero1(line: str) -> str | None:
    if "size" in line.lower() or "shape" in line.lower():
        return (
            "the flat gradient must be as long as z.flat_param, which splits evenly over the "
            "ranks: pad the torch.cat of the gradients with z.padding zeros "
            "(torch.nn.functional.pad(flat, (0, z.padding))); z.owned.grad is this rank's shard"
        )
    return None


def _zero1_hint(rank: int, out: dict, n: int, want: torch.Tensor, grads: list) -> str | None:
    """What ``rank`` of a ZeRO-1 answer did wrong, or None if nothing."""
    k, flat_bytes = out["shard"], 4 * out["flat"]
    kinds = {op for s in out["steps"] for op, _ in s["ops"]}
    if "all_reduce" in kinds and out["state_elements"] == 0:
        return (
            "that is plain data parallelism: you all-reduced every gradient and stepped every "
            "parameter on every rank, so every rank holds the whole Adam state. ZeRO-1 "
            "reduce-scatters the gradient so each rank gets only its shard (z.owned.grad), "
            "steps z.optimizer (Adam's moments for that shard alone) and all-gathers the shards"
        )
    if out["state_elements"] == 0:
        return (
            "z.optimizer holds no state, so it never stepped: call z.optimizer.step() after "
            "the reduce-scatter; it updates z.owned, this rank's shard"
        )
    if "all_reduce" in kinds:
        return (
            f"you all-reduced the gradient: every rank received all {flat_bytes} bytes of "
            f"it, then used its 1/{n}. dist.reduce_scatter_single (reduce_scatter_tensor "
            "before torch 2.12) hands each rank just its shard's sum; on a ring it sends half "
            "an all-reduce's bytes (gloo's happens to run an all-reduce inside)"
        )
    # The first step's gradient is one process's whatever the update did (later ones are not).
    shard_grad, full = (
        out["steps"][0]["shard_grad"],
        F.pad(grads[0], (0, out["flat"] - len(grads[0]))),
    )
    mine = full[rank * k : (rank + 1) * k]
    if _close(shard_grad, n * mine):
        return (
            f"z.owned.grad is {n} times the mean gradient: reduce-scatter sums; divide the "
            "reduced shard by the group's size"
        )
    if not _close(shard_grad, mine):
        return (
            "z.owned.grad is not the mean gradient of this rank's shard: reduce-scatter the "
            "flat gradient (padded to z.flat_param's length) into z.owned.grad, then divide "
            "by the group's size"
        )
    if ("all_gather", flat_bytes) not in [op for s in out["steps"] for op in s["ops"]]:
        return (
            "only this rank's shard changed: all-gather every rank's z.owned back into "
            "z.flat_param after the step (dist.all_gather_single, all_gather_into_tensor "
            "before torch 2.12)"
        )
    if not _close(out["params"], want):
        return (
            "reduce-scatter the mean gradient into z.owned.grad, step z.optimizer, then "
            "all-gather z.owned into z.flat_param"
        )
    return None


def _where(params: torch.Tensor, want: torch.Tensor, shard: int) -> str:
    """Where flat ``params`` differ most from ``want``, and whose shard that element is in."""
    diff = (params - want).abs()
    i = int(diff.argmax())
    return f"max |Δ| = {diff[i]:.1e}, at flat element {i} (in rank {i // shard}'s shard)"


def check_zero1(cluster: Cluster, zero1_update: Callable) -> bool:
    """Check ``zero1_update(z)`` (a ZeRO-1 step, see ``pdlab.training.parallel.sharded.Zero1``) over two
    Adam steps: each rank's optimizer holds Adam's moments for its own shard only, receives
    its shard's mean gradient by a reduce-scatter, all-gathers the parameters, and ends with
    the parameters one process reaches on the whole batch."""
    name, n = "ZeRO-1 update", cluster.world_size
    if not _splits(name, _zero_config(n).batch_size, n, "samples"):
        return False
    got = _run(cluster, name, _zero1_on_rank, zero1_update, explain=_explain_zero1)
    if got is None:
        return False
    want, grads = _one_process_zero()
    for rank, out in enumerate(got):
        hint = _zero1_hint(rank, out, n, want, grads)
        if hint is None:
            continue
        k = out["shard"]
        return report(
            name,
            False,
            f"rank {rank} did not take a ZeRO-1 step",
            f"Adam state for {k} elements, a reduce-scatter and an all-gather of "
            f"{4 * out['flat']} bytes a step, one process's parameters to {TOLERANCE:g}",
            f"Adam state for {out['state_elements'] // 2} elements; ops "
            f"{out['steps'][-1]['ops']}; parameters: {_where(out['params'], want, k)}",
            hint,
        )
    k, flat = got[0]["shard"], got[0]["flat"]
    return report(
        name,
        True,
        f"after {ZERO_STEPS} Adam steps all {n} ranks hold one process's parameters; each "
        f"kept Adam's moments for its {k} of {flat} elements ({8 * k:,} of {8 * flat:,} bytes), "
        f"reduce-scattered the gradient and all-gathered the parameters ({4 * flat:,} bytes each)",
    )


# ---- lab 04: make it fit ---------------------------------------------------------------------

FIT_RUN = {"model": "gpt", "batch_size": 16, "steps": 2}  # the run whose memory must fit
# Bytes a rank may hold (parameters + gradients + optimizer state + activations), measured on
# FIT_RUN: the reference (zero2, full recompute, bf16) holds 2.13 MB at 2 ranks and 1.28 MB at
# 4; plain dp with every lever 3.60 and 3.47; zero1 or fp32 with every other lever 2.54-2.55
# and 1.69 MB.
FIT_BUDGET = {2: 2_250_000, 4: 1_400_000}
FIT_CHOICES = ("strategy", "recompute", "precision")
FIT_STRATEGIES = ("zero1", "zero2", "zero3")  # and dp, measured to show it can't fit
FIT_TIMEOUT_S = 120.0  # a first run on fresh ranks imports the trainer (~10 s on a busy CPU)
PARTS = {
    "param_bytes": "parameters",
    "grad_bytes": "gradients",
    "optimizer_bytes": "optimizer state",
    "activation_bytes": "activations",
}


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.2f} MB"


def _fit_hint(choice: Mapping[str, str], parts: dict[str, int], over: int) -> str:
    """The lever to pull next for ``choice``, whose rank holds ``parts`` (bytes by part),
    ``over`` bytes past the budget: the levers in the order that costs the least traffic."""
    total, act = sum(parts.values()), parts["activation_bytes"]
    strategy, recompute = choice["strategy"], choice["recompute"]
    if strategy not in FIT_STRATEGIES:
        return (
            "plain data parallelism keeps the whole model state on every rank, whatever the "
            "other levers; shard it with zero1, zero2 or zero3"
        )
    if recompute != "full" and act == max(parts.values()):
        kept = "selective recomputes attention's core only; " if recompute == "selective" else ""
        return (
            f"activations are {_mb(act)} of your {_mb(total)}, {_mb(over)} over budget: "
            f"{kept}try recompute='full' (each block keeps only its input and recomputes the "
            "rest in backward)"
        )
    if strategy == "zero1":
        return (
            f"gradients are {_mb(parts['grad_bytes'])} of your {_mb(total)}, {_mb(over)} over "
            "budget: zero1 keeps every full gradient (and its reduced shard); zero2 shards the "
            "gradients too, for the same bytes on the wire"
        )
    if choice["precision"] == "fp32":
        return (
            f"parameters, gradients and activations are "
            f"{_mb(total - parts['optimizer_bytes'])} of your {_mb(total)}, {_mb(over)} over "
            "budget, all in fp32: try precision='bf16', which halves them (the optimizer "
            "keeps fp32 master weights of its shard)"
        )
    if strategy == "zero2":
        return (
            f"parameters are {_mb(parts['param_bytes'])} of your {_mb(total)}, {_mb(over)} over "
            "budget, whole on every rank: zero3 shards them too, for 1.5x DP's bytes"
        )
    return f"{_mb(over)} over budget: pull the levers left, recompute='full' and precision='bf16'"


def _fit_on_ranks(cluster: Cluster, name: str, choice: Mapping[str, str]) -> pd.DataFrame | None:
    """``result.memory`` of FIT_RUN trained with ``choice``, or None after a FAIL saying why."""
    if not isinstance(choice, Mapping) or set(choice) != set(FIT_CHOICES):
        got = sorted(choice) if isinstance(choice, Mapping) else type(choice).__name__
        report(
            name,
            False,
            "the choice is not a dict of the three levers",
            f"a dict with keys {', '.join(FIT_CHOICES)}",
            str(got),
            "write choice = dict(strategy=..., recompute=..., precision=...)",
        )
        return None
    if choice["strategy"] not in ("dp", *FIT_STRATEGIES):
        report(
            name,
            False,
            f"strategy {choice['strategy']!r} is not data parallelism",
            f"one of {', '.join(FIT_STRATEGIES)}",
            repr(choice["strategy"]),
            "this budget is met by sharding data parallelism's state: choose zero1, zero2 or zero3",
        )
        return None
    try:
        return train(cluster, **FIT_RUN, **choice, timeout=FIT_TIMEOUT_S).memory
    except ValueError as err:  # refused before any rank trained: the message says what to change
        report(name, False, "pdlab.train refused the choice", "a run", "ValueError", str(err))
    return None


def check_fit(cluster: Cluster, choice: Mapping[str, str]) -> bool:
    """Check ``choice`` (``strategy``: zero1, zero2 or zero3; ``recompute``; ``precision``):
    trained on the ranks (``FIT_RUN``), each rank's parameters, gradients, optimizer state and
    activations, as ``result.memory`` measures them, must fit ``FIT_BUDGET`` bytes."""
    name, n = "make it fit", cluster.world_size
    if n not in FIT_BUDGET:
        return report(
            name,
            False,
            f"the budget is set for {' or '.join(map(str, FIT_BUDGET))} ranks",
            f"a world size in {sorted(FIT_BUDGET)}",
            f"world size {n}",
            "run the check on a cluster of 2 or 4 ranks: pdlab.Cluster(2)",
        )
    memory = _fit_on_ranks(cluster, name, choice)
    if memory is None:
        return False
    budget, totals = FIT_BUDGET[n], memory[list(PARTS)].sum(axis=1)
    worst = memory.loc[totals.idxmax(), list(PARTS)].astype(int).to_dict()
    split = ", ".join(f"{what} {_mb(worst[part])}" for part, what in PARTS.items())
    shown = ", ".join(f"{k}={v!r}" for k, v in choice.items())
    if totals.max() <= budget:
        return report(
            name,
            True,
            f"{shown} holds {_mb(totals.max())} a rank, within the {_mb(budget)} budget: {split}",
        )
    return report(
        name,
        False,
        f"{shown} holds {_mb(totals.max())} on its fullest rank",
        f"at most {_mb(budget)} a rank",
        f"{_mb(totals.max())}: {split}",
        _fit_hint(choice, worst, int(totals.max()) - budget),
    )


# ---- lab 08: a ring-attention step -------------------------------------------------------------

RING_RUN = {"model": "gpt", "steps": 2, "optimizer": "sgd", "lr": 0.1}  # checked on the ranks
RING_TIMEOUT_S = 120.0  # a first cp run on fresh ranks imports the trainer
_OWN_STEP: dict[str, Callable] = {}  # on a rank: its own attend_block, kept at the first swap


def _probe(ring_step: Callable, rank: int, scores: tuple[float, float]) -> torch.Tensor:
    """Rank ``rank`` of a 2-rank ring on 8 tokens (rank 0 holds positions 0, 1, 6, 7, rank 1
    2..5): its own block, then the other rank's, every key of a block scoring as given (one
    head of width 1: q = 1, k = the score)."""
    q_pos = context.positions(rank, 2, 8)
    q, v, state = torch.ones(4, 1), torch.arange(8.0).view(2, 4, 1), None
    for score, src, values in zip(scores, (rank, 1 - rank), v, strict=True):
        k = torch.full((4, 1), score)
        state = ring_step(state, q, k, values, q_pos, context.positions(src, 2, 8), 1.0)
    return state.result()[0]


# Rank 0's queries: rank 1's keys (2..5) come after its queries 0, 1 and before 6, 7. With its
# own block scoring higher, the max never moves: nothing to rescale, only the mask matters.
MASK_PROBE = (0, (5.0, 0.0))
# Rank 1's queries (2..5) all see rank 0's keys 0, 1, which score higher: every row's max
# rises, and what the row summed before must be rescaled.
RESCALE_PROBE = (1, (0.0, 5.0))


def _ring_step_hint(ring_step: Callable) -> str | None:
    """The mistake ``ring_step`` makes in the two probes, or None if it makes neither."""
    mask, rescale = (
        (_probe(ring_step, *p), _probe(context.attend_block, *p))
        for p in (MASK_PROBE, RESCALE_PROBE)
    )
    if mask[0].isnan().any() or rescale[0].isnan().any():
        return (
            "NaN: a row whose keys in this block are all masked has a block max of -inf, and "
            "exp(-inf - (-inf)) is NaN: fold the block in against m = max(state.m, block max), "
            "finite since every row saw its own diagonal key in the first block"
        )
    if not _close(mask[0][:2], mask[1][:2]):
        return (
            "wrong causal mask: rank 0's queries at positions 0, 1 saw rank 1's keys at 2..5, "
            "which come after them. Mask by the global positions q_pos and k_pos (a key later "
            "than its query gets -inf), not by the places in the block: only the diagonal block "
            "is the usual triangle"
        )
    if not _close(mask[0], mask[1]):
        return (
            "wrong causal mask: rank 0's queries at positions 6, 7 come after all of rank 1's "
            "keys (2..5) and must see every one of them; mask by the global positions q_pos and "
            "k_pos, not by the places in the block"
        )
    if not _close(rescale[0], rescale[1]):
        return (
            "a new block raised the row's max m but the earlier o and l were summed against the "
            "old one: multiply both by exp(m_old - m_new) before adding the new block's "
            "exp(S - m_new)·V and exp(S - m_new) (the online-softmax rescale)"
        )
    return None


def _use_ring_step(ring_step: Callable | None) -> None:
    """On a rank: ring attention's forward runs ``ring_step`` (None: the rank's own again).

    The rank's own is kept here, not sent back from the driver: ``context.attend_block``
    pickles by name, and on a rank that name is whatever step was swapped in last."""
    own = _OWN_STEP.setdefault("attend_block", context.attend_block)
    context.attend_block = ring_step or own


def check_ring_step(cluster: Cluster, ring_step: Callable) -> bool:
    """Check ``ring_step(state, q, k, v, q_pos, k_pos, scale) -> context.Partial``, one rank's
    update with one block of keys and values (``pdlab.training.parallel.context.attend_block``):
    first a ring of 2 and 4 ranks simulated in this process (``context.simulate_ring``) against
    torch's causal attention, then a cp training run on the cluster's ranks, each running
    your step in its ring attention, against one process."""
    name = "ring-attention step"
    cfg = models.GPTConfig()
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(2, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head, generator=g)
        for _ in range(3)
    )
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    try:
        got = {cp: context.simulate_ring(q, k, v, cp, ring_step) for cp in (2, 4)}
        hint = _ring_step_hint(ring_step)
    except NotImplementedError:
        return report(
            name,
            False,
            "not written yet",
            "your code",
            "NotImplementedError",
            "replace the `raise NotImplementedError` in the exercise cell with your code",
        )
    except Exception as err:  # the learner's code: any error is a FAIL with its message
        return report(
            name,
            False,
            "your step raised an exception",
            "no exception",
            f"{type(err).__name__}: {err}",
            "return context.Partial(o, m, l): the "
            "state after this block (state is None for a rank's first, own block)",
        )
    wrong = [cp for cp, out in got.items() if not _close(out, want)]
    if wrong or hint:
        cp = (wrong or [2])[0]
        return report(
            name,
            False,
            f"a simulated ring of {cp} ranks computed the wrong attention",
            f"torch's causal attention, to {TOLERANCE:g}",
            f"max |Δ| = {_max_diff(got[cp], want):.2g}"
            if wrong
            else "right here, wrong in a probe",
            hint or "O = o / l after the last block: o = Σ exp(S - m)·V, l = Σ exp(S - m)",
        )
    if not _splits(name, cfg.block_size // 2, cluster.world_size, "chunks of the sequence"):
        return False
    baseline = train(strategy="single", **RING_RUN).steps.loss
    if _run(cluster, name, _use_ring_step, ring_step) is None:
        return False
    try:
        loss = train(cluster, strategy="cp", timeout=RING_TIMEOUT_S, **RING_RUN).steps.loss
    except RankError as err:  # a step that calls context.attend_block calls itself there
        return report(
            name, False, f"rank {err.rank} raised an exception in cp's ring attention",
            "no exception", _exception_line(err),
            "write the step from torch operations: on the ranks context.attend_block is your "
            "step, so a step that calls it recurses",
        )  # fmt: skip
    finally:
        cluster.run(_use_ring_step, None)
    if not _close(torch.tensor(loss.to_numpy()), torch.tensor(baseline.to_numpy())):
        return report(
            name,
            False,
            f"on {cluster.world_size} ranks, cp's loss differs from one process's",
            f"{baseline.tolist()}",
            f"{loss.tolist()}",
            "your step matched in one process: on the ranks it must use only its arguments "
            "(q_pos and k_pos, not positions computed for a ring of another size)",
        )
    return report(
        name,
        True,
        f"a simulated ring of 2 and 4 ranks matches torch's causal attention, and "
        f"{RING_RUN['steps']} steps of cp on {cluster.world_size} ranks, each running your "
        f"step, one process's loss (to {TOLERANCE:g})",
    )


# ---- lab 08: the MoE dispatch ------------------------------------------------------------------

DISPATCH_EXPERTS = 4  # E in the check: each rank's example rows and counts (expert.example_counts)


def _dispatch_on_rank(dispatch: Callable, n_expert: int) -> list[str]:
    group, rank = dist.group.WORLD, dist.get_rank()
    counts = expert.example_counts(rank, n_expert)
    received, received_counts = dispatch(expert.example_rows(rank, n_expert), counts, group)
    return expert.dispatch_problems(received, received_counts, rank, n_expert, group.size())


def _explain_dispatch(line: str) -> str | None:
    if "split" in line.lower():
        return (
            "wrong split sizes: all_to_all_single takes one split per rank of the group, not "
            "per expert. input_split_sizes[j]: the rows this rank sends rank j, the sum of its "
            "counts for j's E/P experts; output_split_sizes[j]: the rows it receives from j, "
            "the sum of the counts j sent it (the exchanged counts); the output tensor has "
            "their total rows"
        )
    return None


def check_dispatch(cluster: Cluster, dispatch: Callable) -> bool:
    """Check ``dispatch(routed, counts, group) -> (received, received_counts)``, expert
    parallelism's send of each row to the rank holding its expert (``expert.dispatch``), on
    every rank with uneven example routings (some experts get no rows): each rank must
    receive exactly the rows every rank routed to its experts, in order (source rank, then
    expert), and the counts ``[P, E/P]`` that say how many."""
    name, n = "MoE dispatch", cluster.world_size
    if not _splits(name, DISPATCH_EXPERTS, n, "experts"):
        return False
    got = _run(cluster, name, _dispatch_on_rank, dispatch, DISPATCH_EXPERTS, explain=_explain_dispatch)  # fmt: skip
    if got is None:
        return False
    for rank, problems in enumerate(got):
        if problems:
            return report(
                name, False, f"rank {rank} did not receive its experts' rows",
                "every rank's rows for this rank's experts", problems[0].split(":")[0],
                problems[0],
            )  # fmt: skip
    return report(
        name,
        True,
        f"each of {n} ranks received every rank's rows for its {DISPATCH_EXPERTS // n} "
        "experts, in order, and the counts of them, from uneven routings",
    )
