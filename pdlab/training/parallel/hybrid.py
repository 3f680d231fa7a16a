"""Hybrid parallelism: data parallelism across replicas of a model-parallel group (§6.3 of
the article; Narayanan et al. 2021, arXiv 2104.04473, §2.3 "PTD-P").

The ranks are the grid ``Layout`` (``arange(world).view(dp, ep, pp, cp, tp)``). Each row of
the grid is one model replica, split by tensor parallelism (``dp-tp``: ``tensor.py`` on the
``tp`` group) or by pipeline stages (``dp-pp``: ``pipeline.py`` on the ``pp`` group). The
ranks of a column hold the *same* part of the model and compute on different data shards,
so after backward they average that part's gradient over the ``dp`` group (``data.py``) and
take identical optimizer steps, as one process would on the whole batch.

Each rank all-reduces only its part: ``1/tp`` (or one stage) of the model's gradient, so
data parallelism's traffic per rank shrinks by the model-parallel degree, while the
model-parallel traffic (TP's activations, PP's boundaries) stays inside each replica.

Both impls are built by composition, as picotron wraps TP, then PP, then DP: the
model-parallel strategy is built first, whole, and a data-parallel wrapper holds it.

- scratch, ``AveragedReplicas``: runs the inner strategy's ``forward_backward``, averages
  its gradients over ``dp`` with ``data.allreduce_gradients``, then runs its ``update``.
- torch, ``ReplicatedModule``: applies FSDP2's ``replicate`` (DDP rebuilt on FSDP2) to the
  inner torch strategy's module on the ``dp`` sub-mesh and lets it train as it is. Classic
  ``DistributedDataParallel`` does not take the DTensor parameters TP makes; ``replicate``
  does, and all-reduces the gradients (the local shards) at the end of backward: all of a
  rank's in one op instead of ``data.py``'s buckets, the same bytes per op and group (what
  ``comm.totals`` compares).

Each replica's pipeline runs GPipe (``pp-gpipe``); ``micro_batches`` applies as in ``pp-*``.

``dp-cp`` (scratch only, as ``cp``): each replica a context-parallel ring (``context.py``)
whose ranks average the gradient over ``cp`` first, then ``AveragedReplicas`` over ``dp``:
two all-reduces of the whole gradient S, ``2(cp-1)/cp·S + 2(dp-1)/dp·S`` a rank (2S at
world 4), where one all-reduce over a merged dp×cp group (picotron's ``cp_dp_group``,
Megatron's) would send ``2(n-1)/n·S`` (1.5S): the price of composing the two unchanged.

``dp-ep`` (scratch only) wraps expert parallelism (``expert.py``) the same way: each row of
``ep`` ranks splits the experts, the rows are replicas. Its replicated parameters are thus
averaged in two all-reduces, over ``ep`` (in ``ExpertParallel.update``) and over ``dp``: the
mean over all dp×ep ranks, in more bytes than one all-reduce over them (at 2×2: 2S a rank
instead of 1.5S), which would need a group over both dims.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn

from pdlab.compat import replicate
from pdlab.measure.comm import CommEvent
from pdlab.training.layout import Layout
from pdlab.training.models import stage
from pdlab.training.parallel import context, expert, pipeline, tensor
from pdlab.training.parallel.base import (
    Implementation,
    Mesh,
    StepOutput,
    TrainConfig,
    build_optimizer,
    by_kind,
    meta_model,
)
from pdlab.training.parallel.context import ContextParallel
from pdlab.training.parallel.data import allreduce_comm, allreduce_gradients, whole_model
from pdlab.training.parallel.expert import ExpertParallel
from pdlab.training.parallel.pipeline import PipelineScratch, PipelineTorch
from pdlab.training.parallel.single import Single
from pdlab.training.parallel.tensor import DTensorParallel, TensorParallel

# A Dense model's last layer is row-parallel, and DTensor hands back its output as a view of
# the local tensor; nothing modifies it in place, so FSDP2's warning about views is moot.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


# --- the two data-parallel wrappers ------------------------------------------------------


class _Replicas:
    """``dp`` replicas of a model-parallel strategy, ``inner``: this rank's replica is it."""

    counts_own_comm = False

    def __init__(self, inner: Implementation):
        self.inner = inner

    @property
    def module(self) -> nn.Module:
        return self.inner.module

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.inner.optimizer

    @property
    def chunks(self) -> list[nn.Module]:
        return self.inner.chunks

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.full_state_dict()  # every replica holds the same parameters


class AveragedReplicas(_Replicas):
    """From scratch: after the inner strategy's backward, average the gradients of this
    rank's part of the model over its ``dp`` group, then let the inner strategy step."""

    def __init__(self, inner: Single, mesh: Mesh):
        super().__init__(inner)
        self.group = mesh.group("dp")

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = self.inner.forward_backward(x, y)
        allreduce_gradients(list(self.module.parameters()), self.group)
        self.inner.update()
        return out


class ReplicatedModule(_Replicas):
    """With PyTorch: ``replicate`` the inner strategy's module over the ``dp`` sub-mesh, so
    its backward averages the gradients, and train the inner strategy as it is."""

    def __init__(self, inner: Implementation, config: TrainConfig, mesh: Mesh):
        super().__init__(inner)
        replicate(inner.module, mesh=mesh.device_mesh["dp"])
        # replicate() swaps the parameters for DTensors (replicated over dp): optimize those.
        inner.optimizer = build_optimizer(by_kind(inner.module.parameters()), config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        return self.inner.train_step(x, y)


# --- dp-tp --------------------------------------------------------------------------------


def dp_tp_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """TP's f/g all-reduces on a ``B/dp`` shard, plus each rank's ``1/tp`` of the gradient."""
    shard = tensor.shard_scratch(meta_model(config), Mesh(layout, torch.device("meta")))
    params = list(shard.parameters())  # every tp rank's shards have the same sizes
    return tensor.expected_comm(config, layout) + allreduce_comm(layout, lambda _: params)


class DataTensorParallel(AveragedReplicas):
    """``dp-tp`` from scratch: Megatron TP inside each replica, gradient shards averaged over dp."""

    check = staticmethod(tensor.check)
    expected_comm = staticmethod(dp_tp_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(TensorParallel(model, config, mesh), mesh)


class DataDTensorParallel(ReplicatedModule):
    """``dp-tp`` with PyTorch: DTensor TP on the ``tp`` sub-mesh, ``replicate`` over ``dp``."""

    check = staticmethod(tensor.check)
    expected_comm = staticmethod(dp_tp_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(DTensorParallel(model, config, mesh), config, mesh)


# --- dp-pp --------------------------------------------------------------------------------


def _pipeline_config(config: TrainConfig) -> TrainConfig:
    """``config`` as the pipeline inside each replica sees it: GPipe, which runs with any
    number of micro-batches in both impls (torch's 1F1B needs at least ``pp``)."""
    return replace(config, strategy="pp-gpipe")


def check_dp_pp(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, naming the fix, if the pipeline inside each replica can't run."""
    pipeline.check(_pipeline_config(config), layout)


def dp_pp_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """The pipeline's sends on a ``B/dp`` shard, plus each rank's stage gradient."""
    model = meta_model(config)
    stages = [
        list(stage(model, start, stop).parameters())
        for start, stop in pipeline.partition(model, layout.pp)
    ]
    return pipeline.expected_comm(_pipeline_config(config), layout) + allreduce_comm(
        layout, lambda rank: stages[layout.coords(rank)["pp"]]
    )


class DataPipelineParallel(AveragedReplicas):
    """``dp-pp`` from scratch: a GPipe pipeline inside each replica, each stage averaged over dp."""

    check = staticmethod(check_dp_pp)
    expected_comm = staticmethod(dp_pp_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(PipelineScratch(model, _pipeline_config(config), mesh), mesh)


class DataPipelineTorch(ReplicatedModule):
    """``dp-pp`` with PyTorch: ``torch.distributed.pipelining`` inside each replica and
    ``replicate`` over ``dp`` on each stage. The schedule sees an FSDP module and lets it
    reduce only in the last micro-batch's backward: one all-reduce per stage per step."""

    check = staticmethod(check_dp_pp)
    expected_comm = staticmethod(dp_pp_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(PipelineTorch(model, _pipeline_config(config), mesh), config, mesh)


# --- dp-cp --------------------------------------------------------------------------------


def dp_cp_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """The ring and cp's gradient average on a ``B/dp`` shard, then dp's of the same gradient."""
    return context.expected_comm(config, layout) + allreduce_comm(layout, whole_model(config))


class DataContextParallel(AveragedReplicas):
    """``dp-cp`` from scratch: a ring-attention replica per dp rank, averaged over dp."""

    check = staticmethod(context.check)
    expected_comm = staticmethod(dp_cp_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(ContextParallel(model, config, mesh), mesh)


# --- dp-ep --------------------------------------------------------------------------------


def dp_ep_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """Expert parallelism's static part on every ``ep`` group, plus each rank's gradient
    (the replicated parameters and its own experts) averaged over dp. The replicated
    parameters are so averaged over all dp×ep ranks in two all-reduces, over ep then dp."""
    named = list(meta_model(config).named_parameters())
    per = expert.experts_per_rank(layout)

    def params_of(rank: int) -> list[torch.Tensor]:
        held = expert.held_experts(layout.coords(rank)["ep"], per)
        return [p for name, p in named if expert.expert_index(name) in held]

    return expert.ExpertParallel.expected_comm(config, layout) + allreduce_comm(layout, params_of)


class DataExpertParallel(AveragedReplicas):
    """``dp-ep`` from scratch: expert parallelism inside each replica (a row of ``ep``
    ranks), every rank's parameters then averaged over dp."""

    check = staticmethod(expert.check)
    expected_comm = staticmethod(dp_ep_comm)
    routed_comm = staticmethod(expert.routed_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(ExpertParallel(model, config, mesh), mesh)
