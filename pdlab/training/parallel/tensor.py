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

``vocab_parallel=True`` also splits the GPT's vocabulary, as Megatron always does (its
``VocabParallelEmbedding`` and ``cross_entropy.py``): rank ``i`` holds rows
``[i·v/t, (i+1)·v/t)`` of the token embedding and of the head. The embedding looks up the tokens it holds, zeros for the others,
and one all-reduce of ``s·b·h`` sums them. The head is a region whose exit is the loss: each
rank has the logits of its tokens only, and the cross-entropy never gathers the ``s·b·v``
logits: three all-reduces of ``s·b`` float32 (the max, the target's logit, the sum of
exponentials); its backward, ``softmax - onehot`` on this rank's columns, communicates
nothing. Off by default, so that ``tp`` alone is Megatron's regions and nothing else, and a
learner sees what the vocabulary split adds (bytes) and saves (the head's ``v·h`` weights and
``s·b·v`` logits, over ``t``).

``impl="scratch"`` builds this from autograd Functions and sliced ``nn.Linear`` weights;
``impl="torch"`` gives the same plan to DTensor's ``parallelize_module`` (each rank shards
its own copy of the model: ``compat.parallelize_in_place``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
)

from pdlab import compat
from pdlab.measure.comm import CommEvent, event, on_ranks
from pdlab.training.layout import Layout
from pdlab.training.models import Attention, Block, Dense
from pdlab.training.parallel.base import (
    DTYPES,
    Mesh,
    TrainConfig,
    build_optimizer,
    by_kind,
    meta_model,
)
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


def shard(t: torch.Tensor, dim: int, tp_rank: int, tp: int) -> torch.Tensor:
    """This rank's ``1/tp`` of ``t`` along ``dim``, a copy."""
    return t.detach().chunk(tp, dim)[tp_rank].clone()


class ColumnParallelLinear(nn.Module):
    """``Y_i = X A_i``: this rank's block of ``A``'s columns (rows of ``nn.Linear.weight``,
    which stores ``Aᵀ``) and of the bias (the GPT's head has none)."""

    # The dimension each parameter is split along: how full_state_dict puts it back together.
    shard_dims: ClassVar[dict[str, int]] = {"weight": 0, "bias": 0}

    def __init__(self, linear: nn.Linear, tp_rank: int, tp: int):
        super().__init__()
        self.weight = nn.Parameter(shard(linear.weight, 0, tp_rank, tp))
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(shard(bias, 0, tp_rank, tp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """``Z = g(Y_i B_i) + b``: this rank's block of ``B``'s rows; the bias is added once,
    after ``g``, so it is not summed ``tp`` times. ``leave`` is ``g`` (sequence.py passes
    its reduce-scatter)."""

    shard_dims: ClassVar[dict[str, int]] = {"weight": 1}  # the bias is whole on every rank

    def __init__(
        self,
        linear: nn.Linear,
        tp_rank: int,
        tp: int,
        group: dist.ProcessGroup,
        leave: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor] = _ReduceFromRegion.apply,
    ):
        super().__init__()
        self.weight = nn.Parameter(shard(linear.weight, 1, tp_rank, tp))
        self.bias = nn.Parameter(linear.bias.detach().clone())
        self.group, self.leave = group, leave

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.leave(F.linear(y, self.weight), self.group) + self.bias


# ---------------------------------------------------------------- the vocabulary (scratch)


def vocab_range(vocab_size: int, tp_rank: int, tp: int) -> tuple[int, int]:
    """``[start, stop)``: the tokens rank ``tp_rank`` holds (``shard``'s split; the gpt's 52
    tokens split over every tp its 4 heads allow)."""
    part = vocab_size // tp
    return tp_rank * part, (tp_rank + 1) * part


class VocabParallelEmbedding(nn.Module):
    """The token embedding's rows ``[start, stop)``: a token this rank doesn't hold looks up
    zeros, and ``g``'s all-reduce sums every rank's rows into the embedding of each token."""

    shard_dims: ClassVar[dict[str, int]] = {"weight": 0}

    def __init__(self, embedding: nn.Embedding, tp_rank: int, tp: int, group: dist.ProcessGroup):
        super().__init__()
        self.start, self.stop = vocab_range(embedding.num_embeddings, tp_rank, tp)
        self.weight = nn.Parameter(shard(embedding.weight, 0, tp_rank, tp))
        self.group = group

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        mine = (idx >= self.start) & (idx < self.stop)
        rows = F.embedding((idx - self.start) * mine, self.weight) * mine.unsqueeze(-1)
        return _ReduceFromRegion.apply(rows, self.group)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Cross-entropy of logits split by vocabulary (Megatron's ``cross_entropy.py``): each
    rank holds ``[N, v_i]``; three all-reduces of ``N`` floats make every rank's loss whole."""

    @staticmethod
    def forward(ctx, logits, target, start: int, group: dist.ProcessGroup):
        top = logits.max(-1).values
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)  # 1: for exp's range only
        logits = logits - top.unsqueeze(-1)
        mine = (target >= start) & (target < start + logits.shape[-1])
        local = ((target - start) * mine).unsqueeze(-1)  # any column where not mine
        picked = logits.gather(-1, local).squeeze(-1) * mine
        dist.all_reduce(picked, group=group)  # 2: the target's logit, from the rank holding it
        exp = logits.exp()
        total = exp.sum(-1)
        dist.all_reduce(total, group=group)  # 3: Σ exp over the whole vocabulary
        ctx.save_for_backward(exp.div_(total.unsqueeze(-1)), mine, local)
        return total.log() - picked

    @staticmethod
    def backward(ctx, grad):
        softmax, mine, local = ctx.saved_tensors  # ∂loss/∂logits = softmax - onehot(target)
        grad_logits = softmax.scatter_add(-1, local, -mine.unsqueeze(-1).to(softmax.dtype))
        return grad_logits * grad.unsqueeze(-1), None, None, None


@dataclass(frozen=True)
class VocabParallelLoss:
    """The mean cross-entropy of logits whose last dimension is this rank's vocabulary
    ``[start, ...)`` (``models.loss_fn`` for a split head): float32, as ``loss_fn``."""

    start: int
    group: dist.ProcessGroup

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        flat = logits.flatten(0, -2).float()
        return _VocabParallelCrossEntropy.apply(
            flat, targets.flatten(), self.start, self.group
        ).mean()


# ---------------------------------------------------------------- the plan (both impls)


@dataclass(frozen=True)
class Region:
    """One Megatron region, by module names: ``f`` at ``entry``, ``columns`` (A), ``row`` (B);
    no ``row`` in the vocabulary-parallel head, whose exit is the loss."""

    entry: str
    columns: tuple[str, ...]
    row: str | None


def regions(model: nn.Sequential, vocab_parallel: bool = False) -> list[Region]:
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
    if vocab_parallel:
        head = f"{len(model) - 1}.lm_head"
        found.append(Region(head, (head,), None))
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
    """Raise ValueError, naming the fix, when ``layout.tp`` does not split ``config.model``
    or the vocabulary can't be split here."""
    if config.vocab_parallel and config.model != "gpt":
        raise ValueError(
            f"vocab_parallel splits the gpt's vocabulary; model {config.model!r} has none: use "
            "model='gpt', or vocab_parallel=False"
        )
    if config.vocab_parallel and layout.dp > 1:
        raise ValueError(
            f"strategy {config.strategy!r} doesn't split the vocabulary (its data-parallel "
            "average assumes equal shards on every tp rank): use strategy 'tp' or 'tp-sp' "
            "for vocab_parallel=True"
        )
    _check(meta_model(config), config.model, layout.tp)


def rows(config: TrainConfig, layout: Layout) -> int:
    """The vectors a rank computes each layer on: its samples, times a window's tokens."""
    tokens = config.seq_len if config.model == "gpt" else 1
    return config.batch_size // layout.dp * tokens


def loss_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """The vocabulary-parallel loss: three all-reduces of one float32 a token (max, target's
    logit, Σ exp), forward only."""
    return [event("all_reduce", rows(config, layout) * 4, "tp", layout.tp)] * 3


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """One step's all-reduces on the tp groups, listed for every rank of the world.

    Per region: ``g`` all-reduces its output ``[B, (T,) out]`` forward, and ``f`` all-reduces
    its input's gradient ``[B, (T,) in]`` backward, unless that input is the data (the
    first Dense layer: no gradient, so no backward). Full recompute runs a block's forward
    again in backward, up to the last tensor backward needs (torch's non-reentrant
    checkpoint stops early): attention's ``g`` again, not the MLP's, whose output nothing
    saves. One more all-reduce a layer, where Megatron, recomputing all of it, has two.
    ``B`` is the rank's data shard. With ``vocab_parallel``: the embedding's all-reduce
    forward, and the head's region, whose ``g`` is the loss (``loss_comm``). Both impls
    issue exactly these (DTensor as functional all-reduces; see ``shard_torch``).
    """
    model = meta_model(config)
    feature = rows(config, layout) * DTYPES[config.precision].itemsize  # one feature's bytes
    per_rank = []
    if config.vocab_parallel:
        per_rank.append(event("all_reduce", feature * model[0].wte.embedding_dim, "tp", layout.tp))
    for region in regions(model, config.vocab_parallel):
        if region.row is None:
            per_rank += loss_comm(config, layout)
        else:
            row = model.get_submodule(region.row)
            forward = event("all_reduce", feature * row.out_features, "tp", layout.tp)
            again = config.recompute == "full" and region.entry.endswith(".attn")
            per_rank += [forward] * (2 if again else 1)
        if region.entry != "0":  # unit 0's input is the data
            width = model.get_submodule(region.columns[0]).in_features
            per_rank.append(event("all_reduce", feature * width, "tp", layout.tp))
    return on_ranks(per_rank, range(layout.world_size))


@dataclass(frozen=True)
class Conjugates:
    """What brackets a region: ``enter`` and ``leave`` (``(tensor, group) -> tensor``, an
    autograd Function's ``apply``), and the ``column`` module built from a linear on this rank."""

    enter: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor]
    leave: Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor]
    column: Callable[[nn.Linear, Mesh], nn.Module]


# Megatron's f and g around plain column shards.
TP = Conjugates(
    _CopyToRegion.apply,
    _ReduceFromRegion.apply,
    lambda linear, mesh: ColumnParallelLinear(linear, mesh.tp_rank, mesh.layout.tp),
)


def shard_scratch(
    model: nn.Sequential, mesh: Mesh, vocab_parallel: bool = False, ops: Conjugates = TP
) -> nn.Sequential:
    """Swap each region's linears for their shards on this rank and put ``ops.enter`` (``f``)
    at its entry; with ``vocab_parallel``, the embedding and the head split by vocabulary.
    A region whose input is the data (unit 0) enters with ``f`` whatever ``ops``: every rank
    holds all of it already."""
    group, tp = mesh.group("tp"), mesh.layout.tp
    for region in regions(model, vocab_parallel):
        entering = TP if region.entry == "0" else ops
        for name in region.columns:
            _replace(model, name, entering.column(model.get_submodule(name), mesh))
        if region.row is not None:
            row = model.get_submodule(region.row)
            _replace(model, region.row, RowParallelLinear(row, mesh.tp_rank, tp, group, ops.leave))
        model.get_submodule(region.entry).register_forward_pre_hook(
            lambda _module, args, enter=entering.enter: (enter(args[0], group), *args[1:])
        )
    if vocab_parallel:
        model[0].wte = VocabParallelEmbedding(model[0].wte, mesh.tp_rank, tp, group)
    return model


def shard_torch(model: nn.Sequential, mesh: Mesh, vocab_parallel: bool = False) -> nn.Sequential:
    """The same plan in DTensor: Colwise for A, Rowwise for B (its output all-reduce is g).

    ``f`` is ``PrepareModuleInput`` at the region's entry: it makes the input a replicated
    DTensor, so the partial gradients from q, k and v add up locally and are all-reduced once.
    Without it each ``ColwiseParallel`` wraps its input itself and DTensor all-reduces the
    input's gradient once per column linear (3 times per attention instead of once).
    ``vocab_parallel``: the embedding Rowwise (DTensor's masked lookup, then g), the head
    Colwise with its logits left split, for ``VocabParallelLoss``. Not torch's
    ``loss_parallel``: it computes the same three all-reduces, but issues them where
    ``CommMeter`` doesn't see them (torch 2.13: none of them in a probe of 3 steps, all 3 in
    a run's first step only), so its bytes could not be accounted.
    """
    plan = {}
    for region in regions(model, vocab_parallel):
        if region.row is None:  # one column: ColwiseParallel's own input wrap is f
            plan[region.entry] = ColwiseParallel(output_layouts=Shard(-1))
            continue
        plan[region.entry] = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),)
        )
        plan |= {name: ColwiseParallel() for name in region.columns}
        plan[region.row] = RowwiseParallel()
    if vocab_parallel:
        plan["0.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
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
        if config.vocab_parallel:
            vocab = model[-1].lm_head.out_features
            start = vocab_range(vocab, mesh.tp_rank, mesh.layout.tp)[0]
            self.loss_fn = VocabParallelLoss(start, mesh.group("tp"))
        super().__init__(self.shard(model.to(mesh.device), config, mesh), config, mesh)

    def shard(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh) -> nn.Sequential:
        return shard_scratch(model, mesh, config.vocab_parallel)

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

    def shard(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh) -> nn.Sequential:
        return shard_torch(model, mesh, config.vocab_parallel)
