"""Tensor parallelism: Megatron-LM's column/row split (Shoeybi et al. 2019, arXiv 1909.08053).

A Megatron *region* is two matmuls with an elementwise function between them,
``Z = σ(X A) B``. Split ``A`` by columns and ``B`` by rows over the ``tp`` ranks of the
tensor-parallel group; rank ``i`` computes ``Y_i = σ(X A_i)`` and ``Z_i = Y_i B_i`` with no
communication, and ``Z = Σ_i Z_i``. Two conjugate operators bracket the region:

- ``f`` at its entry: identity forward; all-reduce of ``∂L/∂X`` backward (each rank only
  holds the part of the input's gradient that flows through its ``A_i``);
- ``g`` at its exit: all-reduce of ``Z_i`` forward; identity backward.

So a region costs one all-reduce forward and one backward (none backward when ``X`` is the
data, which needs no gradient). The regions in pdlab's models:

- ``article``/``mlp``: consecutive Dense layers in pairs, ``A`` = layer ``2k``, ``B`` = ``2k+1``;
- ``gpt``: attention (``A`` = q, k, v, i.e. the heads split across ranks; ``B`` = proj) and
  the MLP (``A`` = fc; ``B`` = proj).

Everything else (embeddings, layer norms, the head, the biases of ``B``) is replicated.
Their gradients are equal on every TP rank without any communication: every rank holds the
same input, ``g`` hands every rank the same ``Z`` (so the same activations after each
region), and ``f`` hands every rank the same full ``∂L/∂X`` (so the same gradients before).

``impl="scratch"`` builds this from autograd Functions and sliced ``nn.Linear`` weights;
``impl="torch"`` gives the same plan to DTensor's ``parallelize_module`` (each rank shards
its own copy of the model: ``compat.parallelize_in_place``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
)

from pdlab import compat
from pdlab.measure.comm import CommEvent, event, on_ranks
from pdlab.training.layout import Layout
from pdlab.training.models import Attention, Block, Dense
from pdlab.training.parallel.base import Mesh, TrainConfig, build_optimizer, by_kind, meta_model
from pdlab.training.parallel.single import Single

# ---------------------------------------------------------------- f and g (scratch)


class _CopyToRegion(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()  # reduce a private copy, not autograd's buffer
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward (``Z = Σ_i Z_i``), identity backward."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        z = z.clone()  # an autograd Function must not overwrite its input
        dist.all_reduce(z, group=group)
        return z

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class ColumnParallelLinear(nn.Module):
    """``Y_i = X A_i``: this rank's block of ``A``'s columns (rows of ``nn.Linear.weight``,
    which stores ``Aᵀ``) and of the bias."""

    # The dimension each parameter is split along: how full_state_dict puts it back together.
    shard_dims: ClassVar[dict[str, int]] = {"weight": 0, "bias": 0}

    def __init__(self, linear: nn.Linear, tp_rank: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(tp, 0)[tp_rank].clone())
        self.bias = nn.Parameter(linear.bias.detach().chunk(tp, 0)[tp_rank].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``Z = g(Y_i B_i) + b``: this rank's block of ``B``'s rows; the bias is added once,
    after ``g``, so it is not summed ``tp`` times."""

    shard_dims: ClassVar[dict[str, int]] = {"weight": 1}  # the bias is whole on every rank

    def __init__(self, linear: nn.Linear, tp_rank: int, tp: int, group: dist.ProcessGroup):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().chunk(tp, 1)[tp_rank].clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.group = group

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return _ReduceFromRegion.apply(F.linear(y, self.weight), self.group) + self.bias


# ---------------------------------------------------------------- the plan (both impls)


@dataclass(frozen=True)
class Region:
    """One Megatron region, by module names: ``f`` at ``entry``, ``columns`` (A), ``row`` (B)."""

    entry: str
    columns: tuple[str, ...]
    row: str


def regions(model: nn.Sequential) -> list[Region]:
    """The Megatron regions of a pdlab model (see the module docstring)."""
    if all(isinstance(unit, Dense) for unit in model):
        return [
            Region(f"{i}", (f"{i}.linear",), f"{i + 1}.linear") for i in range(0, len(model) - 1, 2)
        ]
    found = []
    for i, unit in enumerate(model):
        if isinstance(unit, Block):
            found.append(
                Region(f"{i}.attn", tuple(f"{i}.attn.{n}" for n in "qkv"), f"{i}.attn.proj")
            )
            found.append(Region(f"{i}.mlp", (f"{i}.mlp.fc",), f"{i}.mlp.proj"))
    return found


def _check(model: nn.Sequential, name: str, tp: int) -> None:
    """Raise ValueError, naming the fix, when ``tp`` does not split ``model``'s regions."""
    for region in regions(model):
        entry, column = model.get_submodule(region.entry), model.get_submodule(region.columns[0])
        if isinstance(entry, Attention):
            what, n = "attention heads", column.out_features // entry.head_dim
        else:
            what, n = f"width of {region.columns[0]}", column.out_features
        if n % tp:
            fits = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"tensor parallelism over tp={tp} ranks cannot split the {what} ({n}) of model "
                f"{name!r}: use a tp that divides {n} ({', '.join(map(str, fits))})"
            )


def check(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, naming the fix, when ``layout.tp`` does not split ``config.model``."""
    _check(meta_model(config), config.model, layout.tp)


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """One step's all-reduces on the tp groups, listed for every rank of the world.

    Per region: ``g`` all-reduces its output ``[B, (T,) out]`` forward, and ``f`` all-reduces
    its input's gradient ``[B, (T,) in]`` backward, unless that input is the data (the
    first Dense layer: no gradient, so no backward). Full recompute runs a block's forward
    again in backward, up to the last tensor backward needs (torch's non-reentrant
    checkpoint stops early): attention's ``g`` again, not the MLP's, whose output nothing
    saves. One more all-reduce a layer, where Megatron, recomputing all of it, has two. ``B`` is the rank's data shard. Both
    impls issue exactly these (DTensor as functional all-reduces; see ``shard_torch``).
    """
    model = meta_model(config)
    tokens = model[0].wpe.num_embeddings if config.model == "gpt" else 1  # one window's length
    rows = config.batch_size // layout.dp * tokens
    per_rank = []
    for region in regions(model):
        column, row = model.get_submodule(region.columns[0]), model.get_submodule(region.row)
        feature = rows * row.weight.element_size()  # bytes of one feature over the batch
        forward = event("all_reduce", feature * row.out_features, "tp", layout.tp)
        again = config.recompute == "full" and region.entry.endswith(".attn")
        per_rank += [forward] * (2 if again else 1)
        if region.entry != "0":  # unit 0's input is the data
            per_rank.append(event("all_reduce", feature * column.in_features, "tp", layout.tp))
    return on_ranks(per_rank, range(layout.world_size))


def shard_scratch(model: nn.Sequential, mesh: Mesh) -> nn.Sequential:
    """Swap each region's linears for their shards on this rank and put ``f`` at its entry."""
    group, tp = mesh.group("tp"), mesh.layout.tp
    for region in regions(model):
        for name in region.columns:
            _replace(model, name, ColumnParallelLinear(model.get_submodule(name), mesh.tp_rank, tp))
        _replace(
            model,
            region.row,
            RowParallelLinear(model.get_submodule(region.row), mesh.tp_rank, tp, group),
        )
        model.get_submodule(region.entry).register_forward_pre_hook(
            lambda _module, args: (_CopyToRegion.apply(args[0], group), *args[1:])
        )
    return model


def shard_torch(model: nn.Sequential, mesh: Mesh) -> nn.Sequential:
    """The same plan in DTensor: Colwise for A, Rowwise for B (its output all-reduce is g).

    ``f`` is ``PrepareModuleInput`` at the region's entry: it makes the input a replicated
    DTensor, so the partial gradients from q, k and v add up locally and are all-reduced once.
    Without it each ``ColwiseParallel`` wraps its input itself and DTensor all-reduces the
    input's gradient once per column linear (3 times per attention instead of once).
    """
    plan = {}
    for region in regions(model):
        plan[region.entry] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)
        )
        plan |= {name: ColwiseParallel() for name in region.columns}
        plan[region.row] = RowwiseParallel()
    return compat.parallelize_in_place(model, mesh.device_mesh["tp"], plan)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


# ---------------------------------------------------------------- the strategies


class TensorParallel(Single):
    """``tp`` from scratch: each rank of a tp group holds ``1/tp`` of every region's weights
    and computes on the same data; the only communication is ``f`` and ``g``."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        _check(model, config.model, mesh.layout.tp)
        self.mesh = mesh
        super().__init__(self.shard(model.to(mesh.device), mesh), config, mesh)

    def shard(self, model: nn.Sequential, mesh: Mesh) -> nn.Sequential:
        return shard_scratch(model, mesh)

    check = staticmethod(check)
    expected_comm = staticmethod(expected_comm)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, under the single-process names (gathers the shards)."""
        return {name: self._full(name, p).cpu() for name, p in self.module.named_parameters()}

    def _full(self, name: str, p: torch.Tensor) -> torch.Tensor:
        if isinstance(p, DTensor):
            return p.full_tensor()
        owner, _, attr = name.rpartition(".")
        dim = getattr(self.module.get_submodule(owner), "shard_dims", {}).get(attr)
        if dim is None:
            return p.detach().clone()
        parts = [torch.empty_like(p) for _ in range(self.mesh.layout.tp)]
        dist.all_gather(parts, p.detach().contiguous(), group=self.mesh.group("tp"))
        return torch.cat(parts, dim)


class DTensorParallel(TensorParallel):
    """``tp`` with PyTorch: the same regions given to DTensor's ``parallelize_module``."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        # The shards are DTensors, the replicated parameters plain tensors: keep them apart.
        self.optimizer = build_optimizer(by_kind(self.module.parameters()), config)

    def shard(self, model: nn.Sequential, mesh: Mesh) -> nn.Sequential:
        return shard_torch(model, mesh)
