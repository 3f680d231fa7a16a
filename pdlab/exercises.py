"""The labs' exercises: a small function you write, checked on the cluster's real ranks.

Each ``check_*`` sends your function to every rank of a ``pdlab.Cluster``, runs it there
beside a reference (one process computing the same thing, or pdlab's own strategy code) and
prints PASS, or FAIL with what was expected, what came back and a hint. It returns whether
it passed. A function that raises, or waits forever in a collective, is a FAIL, not a stuck
notebook. The reference solutions are in ``pdlab.solutions``.

| lab | you write | checked by |
|---|---|---|
| 01 | ``allreduce_gradients(params, group)`` | ``check_gradient_allreduce`` |
| 02 | ``column_parallel_forward(x, linear, rank, world_size)`` | ``check_column_parallel`` |
| 03 | ``gpipe_step(stage, xs, ys, link)`` | ``check_gpipe`` |
| 04 | ``zero1_update(z)`` | ``check_zero1`` |
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pdlab import models, runtime
from pdlab.cluster import CallTimeout, Cluster, RankError
from pdlab.config import TrainConfig
from pdlab.data import load_dataset, points
from pdlab.parallel.base import Layout
from pdlab.parallel.pipeline import StageLink, partition
from pdlab.parallel.sharded import Zero1
from pdlab.training import mesh_for

TIMEOUT_S = 30.0  # a check whose ranks take longer is waiting in a collective a peer skipped
TOLERANCE = 1e-5

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


def _run(cluster: Cluster, name: str, rank_fn: Callable, *args: Any) -> list | None:
    """``rank_fn(*args)`` on every rank; on an error or a hang, print a FAIL and return None."""
    try:
        return cluster.run(rank_fn, *args, timeout=TIMEOUT_S)
    except CallTimeout as err:
        report(
            name,
            False,
            "the ranks never finished",
            "every rank returns",
            f"rank(s) {err.ranks} still waiting after {TIMEOUT_S:.0f} s",
            "a collective returns only when every rank of its group has called it: call it "
            "on every rank, in the same order, with tensors of the same shape",
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
                "read the error above: it is the last line of that rank's traceback",
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


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and _max_diff(a, b) <= TOLERANCE


def _show(t: torch.Tensor) -> str:
    return str([round(v, 5) for v in t.flatten()[:4].tolist()])


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


def _dp_on_rank(allreduce_gradients: Callable) -> list[torch.Tensor]:
    model, x, y = worked_example(runtime.rank(), runtime.world_size())
    squared_error(model(x), y).backward()
    params = list(model.parameters())
    allreduce_gradients(params, dist.group.WORLD)
    return [p.grad.detach().clone() for p in params]


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
    for rank, grads in enumerate(got):
        if all(_close(g, e) for g, e in zip(grads, full, strict=True)):
            continue
        expected, actual = (f"first weight's gradient {_show(t[0])}" for t in (full, grads))
        if all(_close(g, n * e) for g, e in zip(grads, full, strict=True)):
            hint = (
                f"rank {rank}'s gradients are {n} times too big: all_reduce sums; divide by "
                "the group's size for the mean"
            )
        elif _close(grads[0], worked_gradients(rank, n)[0]):
            hint = (
                f"rank {rank} still has the gradient of its own {WORKED_SAMPLES // n} "
                "samples only: all-reduce every p.grad over the group"
            )
        else:
            hint = "sum every p.grad over the group with dist.all_reduce, then divide by its size"
        return report(
            name, False, f"rank {rank}'s gradients differ from one process", expected, actual, hint
        )
    worst = max(_max_diff(g, e) for grads in got for g, e in zip(grads, full, strict=True))
    return report(
        name,
        True,
        f"all {n} ranks hold the gradient of all {WORKED_SAMPLES} samples "
        f"(max |Δ| vs one process = {worst:.1e})",
    )


# ---- lab 02: a column-parallel linear ------------------------------------------------------


def _example_linear() -> tuple[nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Linear(4, 8), torch.randn(5, 4)


def _tp_on_rank(column_parallel_forward: Callable) -> torch.Tensor:
    linear, x = _example_linear()
    return column_parallel_forward(x, linear, runtime.rank(), runtime.world_size()).detach()


def check_column_parallel(cluster: Cluster, column_parallel_forward: Callable) -> bool:
    """Check ``column_parallel_forward(x, linear, rank, world_size)``: rank r must return
    block r of the output's columns, ``Y_r = X A_r + b_r``, computed from its block alone."""
    name = "column-parallel linear"
    if not _splits(name, _example_linear()[0].out_features, cluster.world_size, "columns"):
        return False
    got = _run(cluster, name, _tp_on_rank, column_parallel_forward)
    if got is None:
        return False
    linear, x = _example_linear()
    with torch.no_grad():
        blocks = linear(x).chunk(cluster.world_size, dim=1)
    for rank, y in enumerate(got):
        if _close(y, blocks[rank]):
            continue
        expected = f"shape {tuple(blocks[rank].shape)}, values {_show(blocks[rank])}"
        actual = f"shape {tuple(y.shape)}, values {_show(y)}"
        if y.shape == (x.shape[0], linear.out_features):
            hint = (
                "that is the whole output: use only this rank's rows of linear.weight "
                "(nn.Linear stores A transposed) and of linear.bias"
            )
        elif any(_close(y, b) for b in blocks):
            hint = "that is another rank's block: pick block number `rank`"
        else:
            hint = (
                "take rows rank*k:(rank+1)*k of linear.weight and linear.bias, "
                f"k = out_features // world_size = {linear.out_features // cluster.world_size}"
            )
        return report(
            name, False, f"rank {rank}'s output is not its block of columns", expected, actual, hint
        )
    return report(
        name,
        True,
        f"each of {cluster.world_size} ranks computed its "
        f"{blocks[0].shape[1]} of the {linear.out_features} output columns; "
        "side by side they are one process's output",
    )


# ---- lab 03: a GPipe step ------------------------------------------------------------------


PIPE_MODEL, PIPE_BATCH = "mlp", 16


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


def _gpipe_on_rank(gpipe_step: Callable, m: int) -> dict:
    rank, stages = runtime.rank(), runtime.world_size()
    stage, link = _pipe_stage(models.build_model(PIPE_MODEL), rank, stages, m)
    order: list[str] = []
    stage.register_forward_pre_hook(lambda *_: order.append("F"))
    next(stage.parameters()).register_post_accumulate_grad_hook(lambda _: order.append("B"))
    x, y = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)
    gpipe_step(stage, x.tensor_split(m), y.tensor_split(m), link)
    link.wait()
    return {"order": "".join(order), "grads": {k: p.grad for k, p in stage.named_parameters()}}


def check_gpipe(cluster: Cluster, gpipe_step: Callable, micro_batches: int = 4) -> bool:
    """Check ``gpipe_step(stage, xs, ys, link)``: every stage runs all ``m`` forwards, then all
    ``m`` backwards, and ends with the gradients one process gets from the whole batch."""
    name, m = "GPipe step", micro_batches
    if not _splits(name, PIPE_BATCH, m, "samples into micro-batches"):
        return False
    got = _run(cluster, name, _gpipe_on_rank, gpipe_step, m)
    if got is None:
        return False
    model = models.build_model(PIPE_MODEL)
    x, y = load_dataset(PIPE_MODEL).batch(0, PIPE_BATCH)
    models.loss_fn(model(x), y).backward()
    full = dict(model.named_parameters())
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
        for key, grad in out["grads"].items():
            want = full[key].grad
            if grad is not None and _close(grad, want):
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
        f"{len(got)} stages ran {'F' * m + 'B' * m} and hold the "
        "whole batch's gradients, as one process computes them",
    )


# ---- lab 04: a ZeRO-1 update ---------------------------------------------------------------

ZERO_STEPS = 2


def _zero_config(world_size: int, lr: float = 0.1) -> TrainConfig:
    return TrainConfig(
        strategy="zero1",
        model="mlp",
        steps=ZERO_STEPS,
        batch_size=16,
        optimizer="sgd",
        lr=lr,
        world_size=world_size,
    )


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _zero1_on_rank(zero1_update: Callable) -> dict:
    config = _zero_config(runtime.world_size())
    mesh = mesh_for(Layout(dp=config.world_size), runtime.device())  # groups made once
    z = Zero1(models.build_model(config.model, config.seed), config, mesh)
    z.update = types.MethodType(zero1_update, z)
    data = load_dataset(config.model, config.seed)
    for step in range(config.steps):
        x, y = data.batch(step, config.batch_size, mesh.dp_rank, config.world_size)
        z.train_step(x, y)
    return {"params": _flat_params(z.model), "shard": len(z.owned)}


def _single_params(lr: float) -> torch.Tensor:
    """Parameters after one process trains the same steps with SGD at ``lr``."""
    config = _zero_config(1, lr)
    model = models.build_model(config.model, config.seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    data = load_dataset(config.model, config.seed)
    for step in range(config.steps):
        x, y = data.batch(step, config.batch_size)
        optimizer.zero_grad()
        models.loss_fn(model(x), y).backward()
        optimizer.step()
    return _flat_params(model)


def _where(params: torch.Tensor, want: torch.Tensor, shard: int) -> str:
    """Where flat ``params`` differ most from ``want``, and whose shard that element is in."""
    diff = (params - want).abs()
    i = int(diff.argmax())
    return f"max |Δ| = {diff[i]:.1e}, at flat element {i} (in rank {i // shard}'s shard)"


def check_zero1(cluster: Cluster, zero1_update: Callable) -> bool:
    """Check ``zero1_update(z)`` (a ZeRO-1 step, see ``pdlab.parallel.sharded.Zero1``): after
    two SGD steps every rank must hold the parameters one process reaches on the whole batch."""
    name, n = "ZeRO-1 update", cluster.world_size
    if not _splits(name, _zero_config(n).batch_size, n, "samples"):
        return False
    got = _run(cluster, name, _zero1_on_rank, zero1_update)
    if got is None:
        return False
    want = _single_params(_zero_config(1).lr)
    initial = _flat_params(models.build_model("mlp"))
    for rank, out in enumerate(got):
        params, k = out["params"], out["shard"]
        if _close(params, want):
            continue
        others = torch.ones_like(params, dtype=torch.bool)
        others[rank * k : (rank + 1) * k] = False
        if _close(params, initial):
            hint = (
                "nothing changed: reduce-scatter the flat gradient into z.owned.grad "
                "(the optimizer steps z.owned only), then step"
            )
        elif _close(params, _single_params(n * _zero_config(1).lr)):
            hint = (
                f"the update is {n} times too big: the gradients were summed; divide the "
                "reduced shard by the group's size"
            )
        elif _close(params[others], initial[others]):
            hint = (
                "only this rank's shard changed: all-gather every rank's z.owned back "
                "into z.flat_param after the step"
            )
        else:
            hint = (
                "reduce-scatter the mean gradient into z.owned.grad, step z.optimizer, then "
                "all-gather z.owned into z.flat_param"
            )
        return report(
            name,
            False,
            f"rank {rank}'s parameters differ from one process",
            "one process's parameters, to 1e-5",
            _where(params, want, k),
            hint,
        )
    return report(
        name,
        True,
        f"after {ZERO_STEPS} steps all {n} ranks hold one process's "
        f"parameters, each having stepped only its {got[0]['shard']} elements",
    )
