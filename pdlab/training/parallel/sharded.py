"""Sharded data parallelism: ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054) and FSDP2.

Data parallelism keeps the whole model state on each of the N_d data-parallel ranks: per
parameter 4 bytes of weight, 4 of gradient and K = 8 of Adam state (fp32 here; the paper's
mixed-precision count is 2 + 2 + 12). ZeRO partitions that state over the ranks in stages:

- P_os (ZeRO-1, ``zero1``): optimizer states partitioned. Each rank owns 1/N_d of one flat,
  zero-padded parameter buffer and steps only that slice; gradients reach the owner by a
  reduce-scatter and the updated slices go back to everyone by an all-gather. An all-reduce
  *is* a reduce-scatter then an all-gather, so the bytes equal DP's; the Adam state is 1/N_d.
- P_os+g (ZeRO-2): gradients partitioned too (keep only the reduce-scattered slice). Not a
  strategy of its own here: on top of ``zero1`` it only frees the full gradient earlier.
- P_os+g+p (ZeRO-3, ``zero3``): parameters partitioned too. Each unit keeps 1/N_d of its flat
  parameters, all-gathers them just before its forward, frees them after, gathers them again
  for its backward and reduce-scatters its gradient: 1.5x DP's bytes, 1/N_d of every state.

``impl="torch"`` puts PyTorch's versions beside them: ``ZeroRedundancyOptimizer`` over DDP
(P_os) and FSDP2 ``fully_shard`` (P_os+g+p).
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
from pdlab.training.parallel.base import Mesh, TrainConfig, build_optimizer, meta_model
from pdlab.training.parallel.data import DDP, flatten
from pdlab.training.parallel.single import Single


def padded(numel: int, n: int) -> int:
    """``numel`` rounded up to a multiple of ``n``: a flat buffer that splits into n equal shards."""
    return -(-numel // n) * n


def _per_rank(ops: list[tuple[str, int]], layout: Layout) -> list[CommEvent]:
    """``(op, float32 elements)`` issued by every rank of the dp group, as events of all ranks."""
    events = [comm.event(op, 4 * numel, "dp", layout.dp) for op, numel in ops]
    return comm.on_ranks(events, range(layout.world_size))


# --- ZeRO-1 (P_os) ------------------------------------------------------------------------


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
        n, r = self.group.size(), self.group.rank()
        self.params = list(self.model.parameters())
        sizes = [p.numel() for p in self.params]
        self.flat_param = self.params[0].new_zeros(padded(sum(sizes), n))
        self.padding = len(self.flat_param) - sum(sizes)
        for p, view in zip(self.params, self.flat_param[: sum(sizes)].split(sizes), strict=True):
            view.copy_(p.detach().flatten())
            p.data = view.view_as(p)
        shard = len(self.flat_param) // n
        # A Parameter made from a view shares its storage: stepping it updates the model.
        self.owned = nn.Parameter(self.flat_param[r * shard : (r + 1) * shard])
        self.owned.grad = torch.zeros_like(self.owned)  # the mean gradient of the owned shard
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
        return _per_rank([("reduce_scatter", s), ("all_gather", s)], layout)


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
        broadcasts = [  # rank ``root`` sends its partition; every rank takes part
            comm.event("broadcast", 4 * numel, "dp", n, rank, position=(rank - root) % n)
            for rank in range(n)
            for root, numel in enumerate(zero_partition(numels, n))
        ]
        return DDP.expected_comm(config, layout) + broadcasts


# --- ZeRO-3 (P_os+g+p) --------------------------------------------------------------------


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


def _gather_comm(
    config: TrainConfig, layout: Layout, unit_numel: Callable[[nn.Module], int]
) -> list[CommEvent]:
    """Per unit: all-gather (forward), all-gather (backward), reduce-scatter (gradient)."""
    ops = []
    for unit in meta_model(config):
        s = unit_numel(unit)
        ops += [("all_gather", s), ("all_gather", s), ("reduce_scatter", s)]
    return _per_rank(ops, layout)


class Zero3(Single):
    """ZeRO stage 3, P_os+g+p, from scratch: each unit of the model becomes a ``ShardedUnit``.

    Parameters, gradients and optimizer states are all 1/N_d per rank (plus padding); a unit
    is whole only while it computes.
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        group = mesh.group("dp")
        units = (ShardedUnit(u, group) for u in model.to(mesh.device))
        super().__init__(nn.Sequential(*units), config, mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        with torch.no_grad():
            for i, unit in enumerate(self.model):
                params = unit.unflatten(_GatherParams.apply(unit.shard, unit.group))
                state |= {f"{i}.{name}": t.cpu().clone() for name, t in params.items()}
        return state

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """S_u = the unit's flat size, padded to a multiple of N_d."""
        return _gather_comm(
            config,
            layout,
            lambda unit: padded(sum(p.numel() for p in unit.parameters()), layout.dp),
        )


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

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        dp_mesh = mesh.device_mesh["dp"]
        model.to(mesh.device)
        for unit in model:
            fully_shard(unit, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)
        super().__init__(model, config, mesh)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor().cpu() for k, v in self.model.state_dict().items()}

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """S_u = the sum of the unit's parameters, each padded by rows (``fsdp_numel``)."""
        return _gather_comm(
            config,
            layout,
            lambda unit: sum(fsdp_numel(p.shape, layout.dp) for p in unit.parameters()),
        )
