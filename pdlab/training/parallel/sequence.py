"""Sequence parallelism on top of tensor parallelism (Korthikanti et al. 2022, arXiv 2205.05198,
§4.2.2): Megatron's ``tp-sp``.

TP (``tensor.py``) leaves the LayerNorms, the residual adds and the biases of ``B`` outside
its regions: every rank of the tp group computes them on the whole ``[b, s, h]`` activation
and keeps the same copies for backward, the part of a layer's activations that doesn't
shrink with ``t`` (Table 2: ``sbh(10 + 24/t + 5as/(ht))``). Sequence parallelism splits
that part along the sequence: rank ``i`` holds tokens ``[i·s/t, (i+1)·s/t)`` between the
regions, and TP's conjugate operators become the paper's ``g`` and ``ḡ`` (the names are
Korthikanti et al.'s; ``tensor.py``'s ``f`` and ``g`` are Shoeybi et al.'s):

- ``g`` at a region's entry: all-gather the sequence forward, reduce-scatter the input's
  gradient backward (where ``tensor.py`` has ``f``: identity, all-reduce);
- ``ḡ`` at its exit: reduce-scatter ``Z = Σ_i Z_i`` forward, so each rank gets its tokens
  of the sum; all-gather the gradient backward (where it has ``g``: all-reduce, identity).

An all-reduce is a reduce-scatter then an all-gather, so on a ring the bytes are TP's (gloo
runs a reduce-scatter as a whole all-reduce: ``comm.traffic``). Two more things, as Megatron:

- a region's column linears keep only this rank's tokens of their input and all-gather them
  again in backward for their weights' gradient (``_ColumnOnSequence``): one all-gather more
  a region, which Megatron overlaps with the input's gradient; keeping the gathered inputs
  (of q, k, v and of fc) would cost ``4sbh(1 - 1/t)`` bytes a layer (16-bit) more than the
  paper's ``sbh(34/t + 5as/(ht))``: what DTensor keeps (``tests/test_sequence.py``).
- the parameters used on this rank's tokens only (LayerNorms, the biases of ``B``) get a
  part of their gradient on each rank: each is all-reduced after backward (Megatron's
  ``_allreduce_layernorm_grads``, coalesced there).

The sequence is split after the embedding (no communication; an all-gather backward:
Megatron's ``scatter_to_sequence_parallel_region``, after the vocabulary all-reduce, since
learned positions are added to the whole sequence) and gathered whole again before the head
(the vocabulary-parallel head is a region: it enters with ``g``). In the MLPs a sample is a
token: the first region's exit splits the batch, and the output is gathered for the loss.

pdlab's activations are ``[b, s, h]`` (Megatron's ``[s, b, h]``), the MLPs' ``[B, features]``:
the tokens are dimension -2 in both.

``impl="scratch"`` is ``tensor.py``'s scratch TP with these operators; ``impl="torch"``
gives DTensor's ``SequenceParallel`` the LayerNorms (torchtitan's plan). DTensor's colwise
linears keep the gathered input and all-gather nothing in backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
)

from pdlab import compat
from pdlab.measure.comm import CommEvent, event, on_ranks
from pdlab.training.layout import Layout
from pdlab.training.models import Embedding, Head
from pdlab.training.parallel import tensor
from pdlab.training.parallel.base import DTYPES, Mesh, StepOutput, TrainConfig, meta_model
from pdlab.training.parallel.tensor import (
    ColumnParallelLinear,
    Conjugates,
    DTensorParallel,
    TensorParallel,
    regions,
    rows,
)

# ---------------------------------------------------------------- the collectives (scratch)

Collective = Callable[[torch.Tensor, dist.ProcessGroup], torch.Tensor]


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's tokens (dimension -2), in rank order."""
    mine = x.movedim(-2, 0).contiguous()
    whole = mine.new_empty((group.size() * mine.shape[0], *mine.shape[1:]))
    compat.all_gather(whole, mine, group=group)
    return whole.movedim(0, -2)


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's tokens of the sum of every rank's ``x``."""
    whole = x.movedim(-2, 0).contiguous()
    mine = whole.new_empty((whole.shape[0] // group.size(), *whole.shape[1:]))
    compat.reduce_scatter(mine, whole, group=group)
    return mine.movedim(0, -2)


def _split(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's tokens of ``x``, a copy (a view would keep the whole sequence alive)."""
    return x.chunk(group.size(), -2)[group.rank()].clone(memory_format=torch.contiguous_format)


def _conjugate(name: str, forward: Collective, backward: Collective) -> type:
    """An autograd Function running ``forward`` on a tensor and ``backward`` on its gradient
    (the pairs of Megatron's ``mappings.py``)."""

    def run(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return forward(x, group)

    def back(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return backward(grad, ctx.group), None

    methods = {"forward": staticmethod(run), "backward": staticmethod(back)}
    return type(name, (torch.autograd.Function,), methods)


# Into the sequence-parallel part (after the embedding), out of it to a replicated consumer
# (the head; every rank computes the same gradient of the whole sequence), a region's exit.
_Scatter = _conjugate("_Scatter", _split, _all_gather)
_Gather = _conjugate("_Gather", _all_gather, _split)
_ReduceScatter = _conjugate("_ReduceScatter", _reduce_scatter, _all_gather)


class _Tokens:
    """A region's input as its column linears share it: this rank's tokens, and in backward
    the whole sequence, gathered again once for all of them (q, k and v)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.whole: torch.Tensor | None = None

    def gathered(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.whole is None:
            self.whole = _all_gather(tokens, self.group)
        return self.whole


class _GatherIntoRegion(torch.autograd.Function):
    """``g``: all-gather forward, reduce-scatter of the input's gradient backward (by then
    every column has used the re-gathered input: let it go)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, shared: _Tokens) -> torch.Tensor:
        ctx.group, ctx.shared = group, shared
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.shared.whole = None
        return _reduce_scatter(grad, ctx.group), None, None


def enter(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """A region's entry: the whole sequence, carrying this rank's tokens for its columns."""
    shared = _Tokens(group)
    whole = _GatherIntoRegion.apply(x, group, shared)
    whole.tokens, whole.shared = x, shared
    return whole


class _ColumnOnSequence(torch.autograd.Function):
    """``Y_i = X A_i`` on the gathered ``X``, keeping only this rank's tokens of ``X`` for
    backward (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication``)."""

    @staticmethod
    def forward(ctx, whole, tokens, weight, bias, shared: _Tokens):
        ctx.save_for_backward(tokens, weight)
        ctx.shared, ctx.has_bias = shared, bias is not None
        return torch.nn.functional.linear(whole, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        tokens, weight = ctx.saved_tensors
        whole = ctx.shared.gathered(tokens).flatten(0, -2)
        flat = grad.flatten(0, -2)
        bias = flat.sum(0) if ctx.has_bias else None
        return grad @ weight, None, flat.T @ whole, bias, None


class SequenceColumn(ColumnParallelLinear):
    """A column shard fed by ``enter``: it keeps the tokens, not the gathered sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ColumnOnSequence.apply(x, x.tokens, self.weight, self.bias, x.shared)


SP = Conjugates(
    enter,
    _ReduceScatter.apply,
    lambda linear, mesh: SequenceColumn(linear, mesh.tp_rank, mesh.layout.tp),
)

# ---------------------------------------------------------------- the plan (both impls)


def partial_grads(model: nn.Sequential, biases: bool = True) -> list[nn.Parameter]:
    """The parameters used on this rank's tokens only (LayerNorms, each region's row bias
    unless DTensor adds it before the reduce-scatter), whose gradients are each rank's part
    of the sum."""
    norms = [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]
    rows = [model.get_submodule(r.row).bias for r in regions(model) if r.row and biases]
    return norms + rows


def check(config: TrainConfig, layout: Layout) -> None:
    """tp's checks, and the tokens split evenly: the MLPs' are the batch's samples."""
    tensor.check(config, layout)
    if config.model == "gpt" and config.seq_len % layout.tp:
        raise ValueError(
            f"tp-sp splits each sample's {config.seq_len} tokens over tp={layout.tp} ranks: "
            f"use a seq_len that is a multiple of {layout.tp}"
        )
    if config.model != "gpt" and (config.batch_size // layout.dp) % layout.tp:
        raise ValueError(
            f"tp-sp splits the {config.model}'s samples, its tokens, over tp={layout.tp} ranks: "
            f"batch_size {config.batch_size} doesn't split; use a multiple of {layout.tp}"
        )


def expected_comm(config: TrainConfig, layout: Layout, dtensor: bool = False) -> list[CommEvent]:
    """One step on the tp groups, every rank alike (``B`` samples of ``T`` tokens a rank):

    - embedding (gpt): the vocabulary's all-reduce forward (``vocab_parallel``), the split's
      all-gather backward;
    - each region: ``g``'s all-gather forward and reduce-scatter backward, plus the columns'
      all-gather again backward (not DTensor's), unless its input is the data; ``ḡ``'s
      reduce-scatter forward and all-gather backward, or the loss's three all-reduces (the
      vocabulary-parallel head);
    - the replicated head's gather (forward only), and one all-reduce of each gradient in
      ``partial_grads`` (DTensor adds a row's bias to its part of the sum before the
      reduce-scatter, so the bias gets the whole gradient through the all-gather backward).

    Full recompute runs a block's forward again up to the last tensor backward needs:
    attention's ``g`` and ``ḡ``, and the MLP's ``g`` (fc keeps its input), not its ``ḡ``.
    """
    model, t = meta_model(config), layout.tp
    itemsize = DTYPES[config.precision].itemsize
    feature = rows(config, layout) * itemsize  # one feature of every token, in bytes

    def ev(op: str, width: int) -> CommEvent:
        return event(op, feature * width, "tp", t)

    per_rank = []
    if config.model == "gpt":
        h = model[0].wte.embedding_dim
        per_rank += [ev("all_reduce", h)] if config.vocab_parallel else []
        per_rank.append(ev("all_gather", h))
    for region in regions(model, config.vocab_parallel):
        width = model.get_submodule(region.columns[0]).in_features
        forward = []
        if region.entry != "0":  # unit 0's input is the data
            forward.append(ev("all_gather", width))
            per_rank += [ev("reduce_scatter", width)] + [ev("all_gather", width)] * (not dtensor)
        if region.row is None:
            per_rank += tensor.loss_comm(config, layout)
        else:
            out = model.get_submodule(region.row).out_features
            forward.append(ev("reduce_scatter", out))
            per_rank.append(ev("all_gather", out))
        per_rank += forward
        if config.recompute == "full":
            part = region.entry.rpartition(".")[2]
            per_rank += {"attn": forward, "mlp": forward[:1]}.get(part, [])
    if not config.vocab_parallel:  # the output gathered whole for the replicated head / loss
        last = model.get_submodule(regions(model)[-1].row)
        per_rank.append(ev("all_gather", h if config.model == "gpt" else last.out_features))
    partial = partial_grads(model, biases=not dtensor)
    per_rank += [event("all_reduce", p.numel() * itemsize, "tp", t) for p in partial]
    return on_ranks(per_rank, range(layout.world_size))


def shard_scratch(model: nn.Sequential, mesh: Mesh, vocab_parallel: bool) -> nn.Sequential:
    """tp's scratch plan with ``SP``'s operators; the sequence split after the embedding and
    gathered whole before a replicated head (in the MLPs, after the last unit)."""
    group = mesh.group("tp")
    tensor.shard_scratch(model, mesh, vocab_parallel, SP)
    if isinstance(model[0], Embedding):
        model[0].register_forward_hook(lambda _m, _args, out: _Scatter.apply(out, group))
    if vocab_parallel:
        return model
    if isinstance(model[-1], Head):
        model[-1].lm_head.register_forward_pre_hook(lambda _m, args: _Gather.apply(args[0], group))
    else:
        model[-1].register_forward_hook(lambda _m, _args, out: _Gather.apply(out, group))
    return model


def shard_torch(model: nn.Sequential, mesh: Mesh, vocab_parallel: bool) -> nn.Sequential:
    """The same plan in DTensor (torchtitan's): ``SequenceParallel`` on the LayerNorms, the
    rows' outputs ``Shard``-ed along the tokens (a reduce-scatter), each region's entry
    ``PrepareModuleInput`` from ``Shard`` to ``Replicate`` (an all-gather). The rows wait
    for their reduce-scatter where they issue it (``compat.rowwise_parallel_waiting``)."""
    tokens = Shard(1) if isinstance(model[0], Embedding) else Shard(0)
    whole = (Replicate(),)
    plan = {}
    for region in regions(model, vocab_parallel):
        entry = whole if region.entry == "0" else (tokens,)  # unit 0's input is the data
        if region.row is None:  # the head: Colwise gathers its input (tensor.shard_torch)
            plan[region.entry] = ColwiseParallel(input_layouts=tokens, output_layouts=Shard(-1))
            continue
        plan[region.entry] = PrepareModuleInput(input_layouts=entry, desired_input_layouts=whole)
        plan |= {name: ColwiseParallel() for name in region.columns}
        plan[region.row] = compat.rowwise_parallel_waiting(output_layouts=tokens)
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            plan[name] = SequenceParallel(sequence_dim=tokens.dim)
    if isinstance(model[0], Embedding):
        if vocab_parallel:
            plan["0.wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["0"] = PrepareModuleOutput(
            output_layouts=whole, desired_output_layouts=(tokens,), use_local_output=True
        )
    last = len(model) - 1  # gathered whole for a replicated head, or the MLPs' loss
    if isinstance(model[-1], Head) and not vocab_parallel:
        plan[f"{last}.lm_head"] = PrepareModuleInput(
            input_layouts=(tokens,), desired_input_layouts=whole, use_local_output=True
        )
    elif not isinstance(model[-1], Head):
        plan[f"{last}"] = PrepareModuleOutput(
            output_layouts=(tokens,), desired_output_layouts=whole, use_local_output=True
        )
    return compat.parallelize_in_place(model, mesh.device_mesh["tp"], plan)


# ---------------------------------------------------------------- the strategies


class SequenceParallelScratch(TensorParallel):
    """``tp-sp`` from scratch: tp's regions, the sequence split between them."""

    check = staticmethod(check)
    expected_comm = staticmethod(expected_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        self.partial = partial_grads(self.module)

    def shard(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh) -> nn.Sequential:
        return shard_scratch(model, mesh, config.vocab_parallel)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = super().forward_backward(x, y)
        for p in self.partial:  # each rank's tokens' part of the gradient: sum them
            dist.all_reduce(p.grad, group=self.mesh.group("tp"))
        return out


def torch_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """``expected_comm`` as DTensor runs it: no all-gather again in backward, the rows'
    biases whole."""
    return expected_comm(config, layout, dtensor=True)


class SequenceParallelTorch(DTensorParallel):
    """``tp-sp`` with PyTorch: DTensor's ``SequenceParallel`` in ``parallelize_module``."""

    check = staticmethod(check)
    expected_comm = staticmethod(torch_comm)

    def shard(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh) -> nn.Sequential:
        return shard_torch(model, mesh, config.vocab_parallel)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = super().forward_backward(x, y)
        # DTensor leaves the LayerNorms' gradients Partial (each rank's tokens' part) and
        # reduces them wherever the optimizer reads them: Adam reads each 3 times. Once here.
        for p in self.module.parameters():
            if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
                p.grad = p.grad.redistribute(placements=p.placements)
        return out
