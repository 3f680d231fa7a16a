"""Data parallelism: every rank holds the whole model and computes on its shard of the batch.

Averaging the ranks' gradients gives the gradient of the whole batch (the shards are equal
and the loss is a mean), so every rank takes the same optimizer step as one process would.

- ``dp`` scratch, ``DataParallel``: after backward, all-reduce the gradients in buckets
  (Li et al. 2020, "PyTorch Distributed", VLDB, §3.2: bucketing amortises per-op latency).
- ``dp`` torch, ``DDP``: ``DistributedDataParallel`` itself, which launches each bucket's
  all-reduce during backward as soon as its gradients are ready, overlapping the two.
- ``ps`` scratch, ``ParameterServer``: workers push gradients to a server that updates the
  parameters and sends them back (Li et al. 2014, "Scaling Distributed Machine Learning
  with the Parameter Server", OSDI). Rank 0 of the dp group is the server and a worker too.

Communication per step, S = the model's gradient bytes, N = the dp size (``expected_comm``):

- ring all-reduce (dp): each rank all-reduces S, so payload N·S and bus N · 2(N-1)/N·S
  = 2(N-1)·S, spread evenly: every link carries 2(N-1)/N·S.
- parameter server: N-1 workers each send S (push) and the server sends S to each (pull):
  payload = bus = 2(N-1)·S. The same total traffic as the ring, but the server's link carries
  2(N-1)·S of it, (N-1)·S out and (N-1)·S in, where a ring rank sends 2(N-1)/N·S: the server
  becomes the bottleneck as N grows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from pdlab.measure import comm
from pdlab.measure.comm import CommEvent
from pdlab.training.data import load_dataset
from pdlab.training.layout import Layout
from pdlab.training.models import loss_fn
from pdlab.training.parallel.base import Mesh, TrainConfig, meta_model, wire_device
from pdlab.training.parallel.single import Single

BUCKET_BYTES = 256 * 1024  # small enough that the GPT's ~0.8 MB of gradients fill 4 buckets


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors one after another in one 1-D tensor (a bucket, a shard's source)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive pieces of ``flat`` into ``tensors`` (the inverse of ``_flat``)."""
    with torch.no_grad():
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            t.copy_(piece.view_as(t))


def buckets(params: list[torch.Tensor], bucket_bytes: int) -> list[list[torch.Tensor]]:
    """``params`` from last to first (the order backward produces gradients), in buckets of
    at most ``bucket_bytes`` (a larger parameter gets a bucket of its own)."""
    out: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in reversed(params):
        if out[-1] and size + _nbytes(p) > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append(p)
        size += _nbytes(p)
    return out


def allreduce_gradients(
    params: list[torch.Tensor], group: dist.ProcessGroup, bucket_bytes: int = BUCKET_BYTES
) -> None:
    """Average the gradients of ``params`` over ``group``: one all-reduce per bucket.

    Every bucket is launched before any is waited on, so the transfers queue back to back.
    """
    pending = []
    for bucket in buckets(params, bucket_bytes):
        flat = flatten([p.grad for p in bucket])
        pending.append((bucket, flat, dist.all_reduce(flat, group=group, async_op=True)))
    for bucket, flat, work in pending:
        work.wait()
        flat /= group.size()  # gloo has no ReduceOp.AVG: sum, then divide
        _unflat_into([p.grad for p in bucket], flat)


def allreduce_comm(
    layout: Layout,
    params_of: Callable[[int], list[torch.Tensor]],
    dim: str = "dp",
    bucket_bytes: int = BUCKET_BYTES,
) -> list[CommEvent]:
    """One step of ``allreduce_gradients`` over ``dim`` on every rank; rank ``r`` averages the
    gradients of ``params_of(r)`` (the whole model in DP, its shard or stage in hybrids;
    the whole model over ``cp`` in context parallelism, the replicated parameters in expert
    parallelism)."""
    size = getattr(layout, dim)
    return [
        comm.event("all_reduce", sum(map(_nbytes, bucket)), dim, size, rank)
        for rank in range(layout.world_size)
        for bucket in buckets(params_of(rank), bucket_bytes)
    ]


def whole_model(config: TrainConfig) -> Callable[[int], list[torch.Tensor]]:
    """``params_of`` for pure data parallelism: every rank holds every parameter."""
    params = list(meta_model(config).parameters())
    return lambda rank: params


class DataParallel(Single):
    """``dp`` from scratch: backward, then a bucketed all-reduce of the gradients, then step."""

    def __init__(
        self,
        model: nn.Sequential,
        config: TrainConfig,
        mesh: Mesh,
        bucket_bytes: int = BUCKET_BYTES,
    ):
        super().__init__(model, config, mesh)
        self.group = mesh.group("dp")
        self.bucket_bytes = bucket_bytes

    def update(self) -> None:
        allreduce_gradients(list(self.model.parameters()), self.group, self.bucket_bytes)
        self.optimizer.step()

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        return allreduce_comm(layout, whole_model(config))


def rebuild_buckets(
    ddp: DistributedDataParallel, config: TrainConfig, device: torch.device
) -> None:
    """Run DDP's one-time bucket rebuild now, not in the first training step.

    DDP's first backward all-reduces every gradient in one bucket and notes the order they
    became ready; the next forward rebuilds the buckets in that order and broadcasts the
    layout from rank 0 (two small int tensors; torch >= 2.6). Here: one backward on an
    example, one forward under ``no_sync`` (which rebuilds, and expects no backward), and
    the example's gradients dropped. Nothing is stepped, so training is unchanged.
    """
    example = load_dataset(config.model, config.seed, block_size=config.seq_len)
    x, y = example.x[:1].to(device), example.y[:1].to(device)
    loss_fn(ddp(x), y).backward()
    with ddp.no_sync():
        ddp(x)
    ddp.module.zero_grad(set_to_none=True)


def _counted_allreduce_hook(group, bucket):
    """DDP's default hook (divide by N, all-reduce), counted by hand.

    No annotations: DDP checks them as objects and ``from __future__ import annotations``
    makes them strings; the second parameter must be named ``bucket``.

    The meter might not see ops the reducer issues from an autograd thread, so the bucket is
    recorded here and the op itself runs unmetered: counted once either way. On an emulated
    link ``record`` hands back a future that completes when the link would have.
    """
    with comm.unmetered():
        future = default_hooks.allreduce_hook(group, bucket)
    return comm.record("all_reduce", _nbytes(bucket.buffer()), group, future=future)


class DDP(Single):
    """``dp`` with PyTorch: ``DistributedDataParallel`` all-reduces buckets during backward.

    Its comm hook records every bucket, so it runs without the per-op meter (the step time
    then matches plain DDP; see benchmarks/overhead.py). DDP's first backward runs here, on
    one example (``rebuild_buckets``), so that every training step sends the gradients only.
    """

    counts_own_comm = True

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        group = mesh.group("dp")
        self.module = DistributedDataParallel(
            self.model,
            device_ids=[mesh.device.index] if mesh.device.type == "cuda" else None,
            process_group=group,
            bucket_cap_mb=BUCKET_BYTES / 2**20,
        )
        rebuild_buckets(self.module, config, mesh.device)
        self.module.register_comm_hook(group, _counted_allreduce_hook)

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        # DDP buckets by its own rule (its first bucket is smaller); the bytes are the same.
        return allreduce_comm(layout, whole_model(config))


class ParameterServer(Single):
    """``ps`` from scratch: push gradients to the server (dp rank 0), which averages them and
    steps the only optimizer; then every worker pulls the new parameters."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.group = mesh.group("dp")
        self.is_server = self.group.rank() == 0
        if not self.is_server:
            self.optimizer = None  # workers keep no optimizer state
        self.wire = wire_device(self.group, mesh.device)

    def update(self) -> None:
        params = list(self.model.parameters())
        grads = flatten([p.grad for p in params]).to(self.wire)
        workers = range(1, self.group.size())
        if self.is_server:
            pushed = torch.empty_like(grads)
            for src in workers:  # one at a time: the server's link is the bottleneck
                dist.recv(pushed, group=self.group, group_src=src)
                grads += pushed
            _unflat_into([p.grad for p in params], grads / self.group.size())
            self.optimizer.step()
            new_params = flatten([p.detach() for p in params]).to(self.wire)
            for dst in workers:
                dist.send(new_params, group=self.group, group_dst=dst)
        else:
            dist.send(grads, group=self.group, group_dst=0)
            new_params = torch.empty_like(grads)
            dist.recv(new_params, group=self.group, group_src=0)
            _unflat_into(params, new_params)

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        s = sum(_nbytes(p) for p in meta_model(config).parameters())
        events = []
        for worker in range(1, layout.dp):  # pure data parallelism: dp ranks are global ranks
            for src, dst in ((worker, 0), (0, worker)):  # push the gradient, pull the parameters
                events += [comm.event("send", s, "dp", layout.dp, src)]
                events += [comm.event("recv", s, "dp", layout.dp, dst)]
        return events
