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

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from pdlab.comm import CommEvent, event
from pdlab.models import loss_fn
from pdlab.parallel.base import Layout, Mesh, StepOutput, TrainConfig, build_optimizer, meta_model


def padded(numel: int, n: int) -> int:
    """``numel`` rounded up to a multiple of ``n``: a flat buffer that splits into n equal shards."""
    return -(-numel // n) * n


def _step(module: nn.Module, optimizer: torch.optim.Optimizer, x, y) -> StepOutput:
    """Forward, backward and step, for strategies whose communication hides in module/optimizer."""
    optimizer.zero_grad()
    loss = loss_fn(module(x), y)
    loss.backward()
    optimizer.step()
    return StepOutput(loss.item(), len(x))


# --- ZeRO-1 (P_os) from scratch -----------------------------------------------------------


def flatten_params(params: list[nn.Parameter], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``params`` and their gradients into two flat buffers padded to a multiple of ``n``.

    Each parameter becomes a view of the flat parameter buffer and its ``.grad`` a view of the
    flat gradient buffer (backward accumulates into it in place), so one collective on a buffer
    moves every tensor at once, and rank r's shard is the slice ``[r*S/n, (r+1)*S/n)``.
    """
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    flat_param = params[0].new_zeros(padded(total, n))
    flat_grad = torch.zeros_like(flat_param)
    views = zip(
        params, flat_param[:total].split(sizes), flat_grad[:total].split(sizes), strict=True
    )
    for p, pv, gv in views:
        pv.copy_(p.detach().flatten())
        p.data, p.grad = pv.view_as(p), gv.view_as(p)
    return flat_param, flat_grad


class Zero1:
    """ZeRO stage 1, P_os: full parameters and gradients everywhere, optimizer state sharded.

    One step: backward fills the flat gradient; reduce-scatter (AVG) gives rank r the mean
    gradient of the slice it owns; the optimizer steps that slice only (its Adam moments are
    1/N_d of DP's); an all-gather writes every rank's updated slice back into the parameters.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, mesh: Mesh):
        self.group = mesh.group("dp")
        n, r = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.module = model.to(mesh.device)
        self.flat_param, self.flat_grad = flatten_params(list(self.module.parameters()), n)
        shard = self.flat_param.numel() // n
        # A Parameter made from a view shares its storage: stepping it updates the model.
        self.owned = nn.Parameter(self.flat_param[r * shard : (r + 1) * shard])
        self.owned.grad = torch.zeros_like(self.owned)
        self.optimizer = build_optimizer([self.owned], config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        self.flat_grad.zero_()
        loss = loss_fn(self.module(x), y)
        loss.backward()
        dist.reduce_scatter_single(
            self.owned.grad, self.flat_grad, op=dist.ReduceOp.AVG, group=self.group
        )
        self.optimizer.step()
        # In place: the input is this rank's own slice of the output (as FSDP2 does too).
        dist.all_gather_single(self.flat_param, self.owned.detach(), group=self.group)
        return StepOutput(loss.item(), len(x))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


class Zero1Torch:
    """P_os with PyTorch: DDP all-reduces the gradients, ``ZeroRedundancyOptimizer`` shards Adam.

    Unlike the scratch version it partitions whole tensors (greedily, largest first, to the
    least-loaded rank) rather than a flat buffer, and after the step each rank *broadcasts*
    its partition (one flat bucket per rank with ``parameters_as_bucket_view``).
    """

    def __init__(self, model: nn.Module, config: TrainConfig, mesh: Mesh):
        group = mesh.group("dp")
        self.module = model.to(mesh.device)
        self.ddp = nn.parallel.DistributedDataParallel(self.module, process_group=group)
        self.optimizer = ZeroRedundancyOptimizer(
            self.module.parameters(),
            # It builds the local optimizer over this rank's partition from the constructor.
            optimizer_class=lambda params: build_optimizer(params, config),
            process_group=group,
            parameters_as_bucket_view=True,
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return _step(self.ddp, self.optimizer, x, y)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}


# --- ZeRO-3 (P_os+g+p) from scratch -------------------------------------------------------


class _GatherParams(torch.autograd.Function):
    """Shard -> full flat parameters by all-gather; its backward reduce-scatters the gradient.

    The pair is ZeRO-3's data-parallel gradient sync: the mean gradient of the full unit
    arrives at each rank already cut to the shard it owns.
    """

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        full = shard.new_empty(shard.numel() * dist.get_world_size(group))
        dist.all_gather_single(full, shard, group=group)
        return full

    @staticmethod
    def backward(ctx, grad_full: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad_full.new_empty(grad_full.numel() // dist.get_world_size(ctx.group))
        dist.reduce_scatter_single(
            grad, grad_full.contiguous(), op=dist.ReduceOp.AVG, group=ctx.group
        )
        return grad, None


class ShardedUnit(nn.Module):
    """One unit whose parameters live only as this rank's 1/N_d shard of their flat buffer.

    Forward gathers the full parameters, runs the unit with them and drops them. The gather
    and the unit run under activation checkpointing, so nothing of the full parameters is kept
    for backward: backward re-runs gather + unit (the second all-gather) before computing
    gradients. The price is one extra forward of the unit; FSDP avoids it by hooking the
    gather into backward directly.
    """

    def __init__(self, unit: nn.Module, group: dist.ProcessGroup):
        super().__init__()
        n, r = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        named = dict(unit.named_parameters())
        self.shapes = {name: p.shape for name, p in named.items()}
        flat = torch.cat([p.detach().flatten() for p in named.values()])
        self.numel = flat.numel()
        flat = nn.functional.pad(flat, (0, padded(self.numel, n) - self.numel))
        self.shard = nn.Parameter(flat.chunk(n)[r].clone())
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


class Zero3:
    """ZeRO stage 3, P_os+g+p: each unit of the model becomes a ``ShardedUnit``.

    Parameters, gradients and optimizer states are all 1/N_d per rank (plus padding); a unit
    is whole only while it computes.
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        group = mesh.group("dp")
        self.module = nn.Sequential(*(ShardedUnit(u, group) for u in model.to(mesh.device)))
        self.optimizer = build_optimizer(self.module.parameters(), config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return _step(self.module, self.optimizer, x, y)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        with torch.no_grad():
            for i, unit in enumerate(self.module):
                params = unit.unflatten(_GatherParams.apply(unit.shard, unit.group))
                state |= {f"{i}.{name}": t.clone() for name, t in params.items()}
        return state


class Zero3Torch:
    """P_os+g+p with PyTorch: FSDP2 ``fully_shard`` on each unit, then on the root.

    FSDP2 shards every parameter on dim 0 as a DTensor (padding each to a multiple of N_d
    rows), all-gathers a unit's parameters as one flat buffer before its forward and again
    before its backward, and reduce-scatters the unit's gradients the same way.
    """

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        dp_mesh = mesh.device_mesh["dp"]
        self.module = model.to(mesh.device)
        for unit in self.module:
            fully_shard(unit, mesh=dp_mesh)
        fully_shard(self.module, mesh=dp_mesh)
        self.optimizer = build_optimizer(self.module.parameters(), config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return _step(self.module, self.optimizer, x, y)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.full_tensor() for k, v in self.module.state_dict().items()}


# --- communication per step ---------------------------------------------------------------


def zero_partition(numels: list[int], n: int) -> list[int]:
    """Elements per rank as ``ZeroRedundancyOptimizer`` partitions tensors of ``numels``.

    Largest tensor first, each to the least-loaded rank (ties: the lowest rank).
    """
    loads = [0] * n
    for numel in sorted(numels, reverse=True):
        loads[loads.index(min(loads))] += numel
    return loads


def fsdp_numel(shape: torch.Size, n: int) -> int:
    """Elements FSDP2 all-gathers for one parameter: dim 0 padded to a multiple of ``n``."""
    return padded(shape[0], n) * shape[1:].numel() if shape else n


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """One step's collectives on every rank of the ``dp`` group (float32: 4 bytes/element).

    With S the model's flat size padded to a multiple of N_d, and S_u one unit's:

    - ``zero1`` scratch: reduce-scatter S, all-gather S (DP's all-reduce, in its two halves);
    - ``zero1`` torch: DDP's all-reduce of the unpadded size, then each rank broadcasts its
      partition (``zero_partition``);
    - ``zero3``: per unit, all-gather S_u (forward), all-gather S_u (backward),
      reduce-scatter S_u; torch pads each parameter's rows (``fsdp_numel``), not the unit.
    """
    n, model = layout.dp, meta_model(config)
    numels = [p.numel() for p in model.parameters()]
    if config.strategy == "zero1" and config.impl == "scratch":
        ops = [("reduce_scatter", padded(sum(numels), n)), ("all_gather", padded(sum(numels), n))]
    elif config.strategy == "zero1":
        ops = [("all_reduce", sum(numels))] + [("broadcast", s) for s in zero_partition(numels, n)]
    else:
        ops = []
        for unit in model:
            if config.impl == "scratch":
                size = padded(sum(p.numel() for p in unit.parameters()), n)
            else:
                size = sum(fsdp_numel(p.shape, n) for p in unit.parameters())
            ops += [("all_gather", size), ("all_gather", size), ("reduce_scatter", size)]
    return [event(op, 4 * numel, "dp", n) for op, numel in ops] * n
