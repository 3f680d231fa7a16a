"""Sharded data parallelism: ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054) and FSDP2.

Data parallelism keeps the whole model state on each of the N_d data-parallel ranks: per
parameter 4 bytes of weight, 4 of gradient and K = 8 of Adam state (fp32 here; the paper's
mixed-precision count is 2 + 2 + 12). ZeRO partitions that state over the ranks in stages:

- P_os (ZeRO-1, ``zero1``): optimizer states partitioned. Each rank owns 1/N_d of one flat,
  zero-padded parameter buffer and steps only that slice; gradients reach the owner by a
  reduce-scatter and the updated slices go back to everyone by an all-gather. An all-reduce
  *is* a reduce-scatter then an all-gather, so the bytes equal DP's; the Adam state is 1/N_d.
- P_os+g (ZeRO-2, ``zero2``): gradients partitioned too. Each unit's gradient is
  reduce-scattered as soon as backward has produced it and only the owned slice is kept;
  the updated slices are all-gathered after the step: DP's bytes, 1/N_d of the gradients.
- P_os+g+p (ZeRO-3, ``zero3``): parameters partitioned too. Each unit keeps 1/N_d of its flat
  parameters, all-gathers them just before its forward, frees them after, gathers them again
  for its backward and reduce-scatters its gradient: 1.5x DP's bytes, 1/N_d of every state.

``impl="torch"`` puts PyTorch's versions beside them: ``ZeroRedundancyOptimizer`` over DDP
(P_os), FSDP2 ``fully_shard(reshard_after_forward=False)`` (P_os+g, see ``Zero2Torch`` for
how it differs) and ``fully_shard`` (P_os+g+p).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from pdlab.compat import all_gather, reduce_scatter
from pdlab.measure import comm
from pdlab.measure.comm import CommEvent
from pdlab.training.layout import Layout
from pdlab.training.parallel.base import DTYPES, Mesh, TrainConfig, build_optimizer, meta_model
from pdlab.training.parallel.data import DDP, flatten
from pdlab.training.parallel.single import Single


def padded(numel: int, n: int) -> int:
    """``numel`` rounded up to a multiple of ``n``: a flat buffer that splits into n equal shards."""
    return -(-numel // n) * n


def _per_rank(ops: list[tuple[str, int]], config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """``(op, elements)`` issued by every rank of the dp group, as events of all ranks."""
    size = DTYPES[config.precision].itemsize
    events = [comm.event(op, size * numel, "dp", layout.dp) for op, numel in ops]
    return comm.on_ranks(events, range(layout.world_size))


# --- ZeRO-1 (P_os) ------------------------------------------------------------------------


class FlatShards:
    """``params`` made views of one flat buffer ``flat``, zero-padded (``padding`` elements)
    so it splits into N_d equal shards; ``owned`` is this rank's shard, a Parameter on the
    same storage (stepping it updates the parameters) with a gradient of its own: the mean
    gradient of that shard, once reduce-scattered."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup):
        self.params = params
        n, r = group.size(), group.rank()
        sizes = [p.numel() for p in params]
        self.flat = params[0].new_zeros(padded(sum(sizes), n))
        self.padding = len(self.flat) - sum(sizes)
        for p, view in zip(params, self.flat[: sum(sizes)].split(sizes), strict=True):
            view.copy_(p.detach().flatten())
            p.data = view.view_as(p)
        shard = len(self.flat) // n
        self.owned = nn.Parameter(self.flat[r * shard : (r + 1) * shard])
        self.owned.grad = torch.zeros_like(self.owned)


class Zero1(Single):
    """ZeRO stage 1, P_os, from scratch: full parameters and gradients, sharded optimizer.

    The parameters become views of one flat buffer, padded so it splits into N_d equal
    shards; rank r owns shard r and its optimizer holds only that shard (1/N_d of DP's Adam
    moments). After backward: reduce-scatter (mean) the flat gradient so rank r receives its
    shard's, step the shard, and all-gather the shards straight back into the parameters.
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.group = mesh.group("dp")
        self.params = list(self.model.parameters())
        shards = FlatShards(self.params, self.group)
        self.flat_param, self.owned, self.padding = shards.flat, shards.owned, shards.padding
        self.optimizer = build_optimizer([self.owned], config)

    def update(self) -> None:
        grads = nn.functional.pad(flatten([p.grad for p in self.params]), (0, self.padding))
        reduce_scatter(self.owned.grad, grads, group=self.group)  # SUM: gloo's AVG is newer
        self.owned.grad /= self.group.size()
        self.optimizer.step()
        # In place: the input is this rank's own slice of the output (NCCL and gloo allow it).
        all_gather(self.flat_param, self.owned.detach(), group=self.group)

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """Reduce-scatter and all-gather of the padded flat size S: DP's all-reduce, in halves."""
        s = padded(sum(p.numel() for p in meta_model(config).parameters()), layout.dp)
        return _per_rank([("reduce_scatter", s), ("all_gather", s)], config, layout)


def zero_partition(numels: list[int], n: int) -> list[int]:
    """Elements per rank as ``ZeroRedundancyOptimizer`` partitions tensors of ``numels``:
    largest tensor first, each to the least-loaded rank (ties: the lowest rank)."""
    loads = [0] * n
    for numel in sorted(numels, reverse=True):
        loads[loads.index(min(loads))] += numel
    return loads


class Zero1Torch(DDP):
    """P_os with PyTorch: DDP all-reduces the gradients, ``ZeroRedundancyOptimizer`` shards Adam.

    Unlike the scratch version it partitions whole tensors (``zero_partition``), not a flat
    buffer, and after its step each rank *broadcasts* its partition (one flat bucket per rank
    with ``parameters_as_bucket_view``). ``optimizer`` is its local optimizer over this rank's
    partition: the state this rank holds, which memory accounting and checkpoints read.
    """

    counts_own_comm = False  # the optimizer's broadcasts are not in DDP's hook

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.zero = ZeroRedundancyOptimizer(
            self.model.parameters(),
            optimizer_class=lambda params: build_optimizer(params, config),
            process_group=mesh.group("dp"),
            parameters_as_bucket_view=True,
        )
        self.optimizer = self.zero.optim

    def update(self) -> None:
        self.zero.step()  # steps this rank's partition, then every rank broadcasts its own

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        numels = [p.numel() for p in meta_model(config).parameters()]
        n = layout.dp  # pure data parallelism: dp ranks are global ranks
        size = DTYPES[config.precision].itemsize
        broadcasts = [  # rank ``root`` sends its partition; every rank takes part
            comm.event("broadcast", size * numel, "dp", n, rank, position=(rank - root) % n)
            for rank in range(n)
            for root, numel in enumerate(zero_partition(numels, n))
        ]
        return DDP.expected_comm(config, layout) + broadcasts


# --- ZeRO-2 (P_os+g) ----------------------------------------------------------------------


class Zero2(Single):
    """ZeRO stage 2, P_os+g, from scratch: full parameters, sharded gradients and optimizer.

    ZeRO-1 with the gradients partitioned too. Each unit's parameters get a ``FlatShards``
    of their own (a bucket, where ZeRO-1 has one for the whole model); the moment backward
    has accumulated a unit's last gradient (a post-accumulate-grad hook), the unit's
    gradient is reduce-scattered into its owned shard's and dropped, so no rank holds more
    than one unit's full gradient. Memory 2Ψ + (2 + K)Ψ/N_d in the paper's mixed-precision
    bytes; here (fp32) 4Ψ of parameters, 4Ψ/N_d of gradients, 8Ψ/N_d of Adam moments. After
    backward: step the owned shards, all-gather each unit's shards back into its parameters.
    The bytes are ZeRO-1's, a unit at a time: 2Ψ on a ring, as DP (ZeRO paper §7).
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.group = mesh.group("dp")
        self.buckets = [FlatShards(list(unit.parameters()), self.group) for unit in self.model]
        self.ready = [0] * len(self.buckets)  # a bucket's gradients accumulated so far
        for i, bucket in enumerate(self.buckets):
            for p in bucket.params:
                p.register_post_accumulate_grad_hook(lambda _, i=i: self._grad_ready(i))
        self.optimizer = build_optimizer([b.owned for b in self.buckets], config)

    def _grad_ready(self, i: int) -> None:
        """In backward, after each gradient of bucket ``i``: once all are in, shard them."""
        bucket, self.ready[i] = self.buckets[i], self.ready[i] + 1
        if self.ready[i] < len(bucket.params):
            return
        self.ready[i] = 0
        grads = nn.functional.pad(flatten([p.grad for p in bucket.params]), (0, bucket.padding))
        reduce_scatter(bucket.owned.grad, grads, group=self.group)  # SUM: gloo's AVG is newer
        bucket.owned.grad /= self.group.size()
        self.drop_gradients(bucket)

    def drop_gradients(self, bucket: FlatShards) -> None:
        """ZeRO-2's saving: the unit's full gradient goes once its shard has been reduced."""
        for p in bucket.params:
            p.grad = None

    def update(self) -> None:
        self.optimizer.step()
        for b in self.buckets:
            all_gather(b.flat, b.owned.detach(), group=self.group)  # in place, as ZeRO-1

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """Per unit, S_u its flat size padded to a multiple of N_d: a reduce-scatter (in
        backward) and an all-gather (after the step)."""
        return _unit_comm(config, layout, ("reduce_scatter", "all_gather"), _padded_unit(layout))


# --- ZeRO-3 (P_os+g+p) --------------------------------------------------------------------


ZERO3_OPS = ("all_gather", "all_gather", "reduce_scatter")  # a unit's, each step


class _GatherParams(torch.autograd.Function):
    """Shard -> full flat parameters by all-gather; its backward reduce-scatters the gradient.

    The pair is ZeRO-3's data-parallel gradient sync: the mean gradient of the whole unit
    arrives at each rank already cut down to the shard it owns.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        full = shard.new_empty(shard.numel() * group.size())
        all_gather(full, shard, group=group)
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_full.new_empty(grad_full.numel() // ctx.group.size())
        reduce_scatter(grad, grad_full.contiguous(), group=ctx.group)  # SUM: gloo's AVG is newer
        grad /= ctx.group.size()
        return grad, None


class ShardedUnit(nn.Module):
    """One unit whose parameters live only as this rank's 1/N_d shard of their flat buffer.

    Forward gathers the full parameters, runs the unit with them and drops them. Gather and
    unit run under activation checkpointing, so nothing of the full parameters is kept for
    backward: backward re-runs gather + unit (the second all-gather) before computing the
    gradients. The price is one extra forward of the unit; FSDP avoids it by hooking the
    gather into backward directly.
    """

    def __init__(self, unit: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        named = dict(unit.named_parameters())
        self.shapes = {name: p.shape for name, p in named.items()}
        flat = torch.cat([p.detach().flatten() for p in named.values()])
        self.numel = len(flat)
        flat = nn.functional.pad(flat, (0, padded(self.numel, group.size()) - self.numel))
        self.shard = nn.Parameter(flat.chunk(group.size())[group.rank()].clone())
        for name in named:  # the unit keeps its code, not its weights
            owner, _, attr = name.rpartition(".")
            delattr(unit.get_submodule(owner), attr)
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._gather_and_run, self.shard, x, use_reentrant=False)

    def _gather_and_run(self, shard: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.unit, self.unflatten(_GatherParams.apply(shard, self.group)), x)

    def unflatten(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unit's named parameters as views of the gathered flat buffer."""
        sizes = [s.numel() for s in self.shapes.values()]
        pieces = full[: self.numel].split(sizes)
        return {name: t.view(s) for (name, s), t in zip(self.shapes.items(), pieces, strict=True)}


def _unit_comm(
    config: TrainConfig,
    layout: Layout,
    ops: tuple[str, ...],
    unit_numel: Callable[[nn.Module], int],
) -> list[CommEvent]:
    """``ops`` (in order) on each unit's ``unit_numel`` elements, unit after unit."""
    units = meta_model(config)
    return _per_rank([(op, unit_numel(unit)) for unit in units for op in ops], config, layout)


def _padded_unit(layout: Layout) -> Callable[[nn.Module], int]:
    """A unit's flat size padded to a multiple of N_d (the scratch ZeROs' buckets)."""
    return lambda unit: padded(sum(p.numel() for p in unit.parameters()), layout.dp)


class Zero3(Single):
    """ZeRO stage 3, P_os+g+p, from scratch: each unit of the model becomes a ``ShardedUnit``.

    Parameters, gradients and optimizer states are all 1/N_d per rank (plus padding); a unit
    is whole only while it computes.
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        group = mesh.group("dp")
        units = (ShardedUnit(u, group) for u in model.to(mesh.device))
        super().__init__(nn.Sequential(*units), config, mesh)

    @staticmethod
    def check(config: TrainConfig, layout: Layout) -> None:
        if config.recompute != "none":
            raise ValueError(
                f"zero3/scratch recomputes every unit already (that is how it frees the "
                f"gathered parameters): recompute={config.recompute!r} would run it a third "
                "time. Use recompute='none', or impl='torch' (FSDP2) to choose it"
            )

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        with torch.no_grad():
            for i, unit in enumerate(self.model):
                params = unit.unflatten(_GatherParams.apply(unit.shard, unit.group))
                state |= {f"{i}.{name}": t.cpu().clone() for name, t in params.items()}
        return state

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """Per unit (S_u its flat size padded to a multiple of N_d): all-gather (forward),
        all-gather (backward), reduce-scatter (gradient)."""
        return _unit_comm(config, layout, ZERO3_OPS, _padded_unit(layout))


def fsdp_numel(shape: torch.Size, n: int) -> int:
    """Elements FSDP2 all-gathers for one parameter: dim 0 padded to a multiple of ``n``."""
    return padded(shape[0], n) * shape[1:].numel()


class Zero3Torch(Single):
    """P_os+g+p with PyTorch: FSDP2 ``fully_shard`` on each unit, then on the root.

    FSDP2 shards every parameter on dim 0 as a DTensor (padding its rows to a multiple of
    N_d), all-gathers a unit's shards as one flat buffer before its forward and again before
    its backward, and reduce-scatters the unit's gradients the same way. The root holds no
    parameters of its own, so it adds no collective.
    """

    reshard_after_forward = True  # free a unit's gathered parameters after its forward
    ops = ZERO3_OPS  # a unit's collectives a step

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        dp_mesh = mesh.device_mesh["dp"]
        model.to(mesh.device)
        for unit in model:
            fully_shard(unit, mesh=dp_mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(model, mesh=dp_mesh)
        super().__init__(model, config, mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().cpu() for k, v in self.model.state_dict().items()}

    @classmethod
    def expected_comm(cls, config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """S_u = the sum of the unit's parameters, each padded by rows (``fsdp_numel``)."""
        return _unit_comm(
            config,
            layout,
            cls.ops,
            lambda unit: sum(fsdp_numel(p.shape, layout.dp) for p in unit.parameters()),
        )


class Zero2Torch(Zero3Torch):
    """P_os+g with PyTorch: FSDP2 ``fully_shard(unit, reshard_after_forward=False)``.

    Told not to reshard after a unit's forward, FSDP2 keeps the gathered parameters through
    the backward, which needs no second all-gather: one all-gather and one reduce-scatter a
    unit, ZeRO-2's 2Ψ (padded by rows, ``fsdp_numel``). What differs from ZeRO-2 (checked on
    torch 2.13): the all-gather comes before the next forward, not after the optimizer step
    (the same bytes a step, the first step included), and after backward FSDP2 reshards
    (``reshard_after_backward``): between steps a rank holds 1/N_d of the parameters, as in
    ZeRO-3, and all of them only from its first forward to the end of its backward. So
    ``result.memory``, read after the step, shows ZeRO-3's split; ZeRO-2's is its peak.
    """

    reshard_after_forward = False
    ops = ("all_gather", "reduce_scatter")
