"""Reference solutions to the labs' exercises (``pdlab.lab.exercises`` checks them).

Try each exercise before reading its answer here. Where pdlab's strategies already contain
the exact piece, the answer is that code, so you can read it in context.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pdlab.training.models import loss_fn
from pdlab.training.parallel.context import attend_block
from pdlab.training.parallel.data import allreduce_gradients
from pdlab.training.parallel.expert import dispatch
from pdlab.training.parallel.pipeline import StageLink
from pdlab.training.parallel.sharded import Zero1
from pdlab.training.parallel.tensor import ColumnParallelLinear

__all__ = [
    "all_reduce_time",
    "allreduce_gradients",
    "column_parallel_forward",
    "dispatch",
    "fit_choice",
    "gpipe_step",
    "ring_step",
    "zero1_update",
]

# Lab 01: ``allreduce_gradients(params, group)`` is data parallelism's gradient sync
# (``pdlab/training/parallel/data.py``): all-reduce (sum) the gradients in buckets, divide by the size.

# Lab 04: a ZeRO-1 step is ``Zero1.update`` (``pdlab/training/parallel/sharded.py``): reduce-scatter the
# mean gradient into this rank's shard, step the shard, all-gather the shards back.
zero1_update = Zero1.update

# Lab 04, make it fit: ZeRO-2 shards gradients and Adam state for DP's bytes on the wire, full
# recompute keeps only each block's input, bf16 halves parameters, gradients and activations
# (the optimizer keeps fp32 master weights of its shard): 2.13 MB a rank at 2 ranks, within
# exercises.FIT_BUDGET. zero3 fits too, for 1.5x the traffic.
fit_choice = {"strategy": "zero2", "recompute": "full", "precision": "bf16"}


# Lab 08: one ring-attention step is ``attend_block`` (``pdlab/training/parallel/context.py``): the
# block's scores masked by the global positions, the running max m raised to the block's, the
# earlier o and l rescaled by exp(m_old - m_new), the block's exp(S - m)·V and exp(S - m) added.
ring_step = attend_block

# Lab 08: expert parallelism's ``dispatch`` (``pdlab/training/parallel/expert.py``): exchange the
# counts per expert with one all-to-all, then the rows with ``all_to_all_single``, split per rank
# by the sums of those counts.


def column_parallel_forward(
    x: torch.Tensor, linear: nn.Linear, rank: int, world_size: int
) -> torch.Tensor:
    """Lab 02: ``Y_r = X A_r + b_r`` with this rank's block of ``A``'s columns (the rows of
    ``linear.weight``, which stores ``Aᵀ``): ``ColumnParallelLinear`` in pdlab/parallel/tensor.py."""
    return ColumnParallelLinear(linear, rank, world_size)(x)


def gpipe_step(
    stage: nn.Module, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor], link: StageLink
) -> None:
    """Lab 03: GPipe (Huang et al. 2019): every micro-batch's forward, then every backward.

    ``link`` is the ``StageLink`` the scratch pipelines run on (pdlab/parallel/pipeline.py);
    ``PipelineScratch.run_schedule`` is this loop for any schedule, with a timeline.
    """
    inputs, outputs = [], []
    for x, y in zip(xs, ys, strict=True):
        h = x if link.is_first else link.recv_forward()
        out = stage(h)
        if link.is_last:
            out = loss_fn(out, y) / len(xs)  # the batch's loss is the micro-batches' mean
        else:
            link.send_forward(out)
        inputs.append(h)
        outputs.append(out)
    for h, out in zip(inputs, outputs, strict=True):
        out.backward(None if link.is_last else link.recv_backward())
        if not link.is_first:
            link.send_backward(h.grad)


# Lab 07: a ring all-reduce's time on one link (``pdlab.lab.exercises_cost`` checks it).
def all_reduce_time(payload_bytes: float, ranks: int, bandwidth: float, latency: float) -> float:  # fmt: skip
    """The answer: 2(n-1) ring steps of latency, plus 2(n-1)/n of the payload at the bandwidth."""
    n = ranks
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * payload_bytes / bandwidth
