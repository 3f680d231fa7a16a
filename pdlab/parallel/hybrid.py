"""Hybrid parallelism: data parallelism across replicas of a model-parallel group (§6.3 of
the article; Narayanan et al. 2021, arXiv 2104.04473, §2.3 "PTD-P").

The ranks are the grid ``arange(world).view(dp, pp, tp)`` (``base.Layout``). Each row of
the grid is one model replica, split by tensor parallelism (``dp-tp``: ``tensor.py`` on the
``tp`` group) or by pipeline stages (``dp-pp``: ``pipeline.py`` on the ``pp`` group). The
ranks of a column hold the *same* part of the model and compute on different data shards,
so after backward they average that part's gradient over the ``dp`` group (``data.py``) and
take identical optimizer steps, as one process would on the whole batch.

Each rank all-reduces only its part: ``1/tp`` (or one stage) of the model's gradient, so
data parallelism's traffic per rank shrinks by the model-parallel degree, while the
model-parallel traffic (TP's activations, PP's boundaries) stays inside each replica.

- scratch: the model-parallel strategy, whose ``update`` runs ``data.allreduce_gradients``
  over ``dp`` before the optimizer step.
- torch: the model-parallel strategy's torch impl, with FSDP2's ``replicate`` (DDP rebuilt
  on FSDP2) on the ``dp`` sub-mesh. Classic ``DistributedDataParallel`` does not take the
  DTensor parameters TP makes; ``replicate`` does, and all-reduces the gradients (the local
  shards) at the end of backward: all of a rank's in one op instead of ``data.py``'s
  buckets, the same bytes per op and group (what ``comm.totals`` compares).

Each replica's pipeline runs GPipe (``pp-gpipe``); ``micro_batches`` applies as in ``pp-*``.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from pdlab.comm import CommEvent
from pdlab.models import stage
from pdlab.parallel import pipeline, tensor
from pdlab.parallel.base import Layout, Mesh, TrainConfig, build_optimizer, meta_model
from pdlab.parallel.data import allreduce_comm, allreduce_gradients
from pdlab.parallel.pipeline import Pipeline
from pdlab.parallel.tensor import DTensorParallel, TensorParallel

# A Dense model's last layer is row-parallel, and DTensor hands back its output as a view of
# the local tensor; nothing modifies it in place, so FSDP2's warning about views is moot.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def replicate(module: nn.Module, mesh) -> nn.Module:
    """FSDP2's ``replicate`` (DDP over DTensor parameters; classic DDP refuses DTensors).

    Imported here, not at the top: it is a private module that torch has only since 2.9, and
    the scratch hybrids must keep working without it.
    """
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate as fsdp_replicate
    except ImportError as exc:
        raise NotImplementedError(
            f"impl='torch' hybrids need torch >= 2.9 (FSDP2's replicate); this is torch "
            f"{torch.__version__}: use impl='scratch'"
        ) from exc
    return fsdp_replicate(module, mesh=mesh)


def _pipeline_config(config: TrainConfig) -> TrainConfig:
    """``config`` as the pipeline inside each replica sees it: GPipe, which runs with any
    number of micro-batches in both impls (torch's 1F1B needs at least ``pp``)."""
    return replace(config, strategy="pp-gpipe")


def check(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, naming the fix, if the model-parallel half cannot split ``config``."""
    if config.strategy == "dp-tp":
        tensor.check(config, layout)
    else:
        pipeline.check(_pipeline_config(config), layout)


class _AverageOverDP:
    """``update``: average this rank's gradients over its ``dp`` group, then step."""

    def update(self) -> None:
        allreduce_gradients(list(self.module.parameters()), self.mesh.group("dp"))
        self.optimizer.step()


class DataTensorParallel(_AverageOverDP, TensorParallel):
    """``dp-tp`` from scratch: Megatron TP inside each replica, gradient shards averaged over dp."""

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """TP's f/g all-reduces on a ``B/dp`` shard, plus each rank's ``1/tp`` of the gradient."""
        shard = tensor.shard_scratch(meta_model(config), Mesh(layout, torch.device("meta")))
        params = list(shard.parameters())  # every tp rank's shards have the same sizes
        return tensor.expected_comm(config, layout) + allreduce_comm(layout, lambda _: params)


class DataDTensorParallel(DTensorParallel):
    """``dp-tp`` with PyTorch: DTensor TP on the ``tp`` sub-mesh, ``replicate`` over ``dp``."""

    def shard(self, model: nn.Sequential, mesh: Mesh) -> nn.Sequential:
        return replicate(super().shard(model, mesh), mesh=mesh.device_mesh["dp"])

    expected_comm = DataTensorParallel.expected_comm


class DataPipelineParallel(_AverageOverDP, Pipeline):
    """``dp-pp`` from scratch: a GPipe pipeline inside each replica, each stage averaged over dp."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, _pipeline_config(config), mesh)

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """The pipeline's sends on a ``B/dp`` shard, plus each rank's stage gradient."""
        model = meta_model(config)
        stages = [
            list(stage(model, start, stop).parameters())
            for start, stop in pipeline.partition(model, layout.pp)
        ]
        return pipeline.expected_comm(_pipeline_config(config), layout) + allreduce_comm(
            layout, lambda rank: stages[layout.coords(rank)[1]]
        )


class DataPipelineTorch(DataPipelineParallel):
    """``dp-pp`` with PyTorch: ``torch.distributed.pipelining`` inside each replica and
    ``replicate`` over ``dp`` on each stage. The schedule sees an FSDP module and lets it
    reduce only in the last micro-batch's backward: one all-reduce per stage per step."""

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        super().__init__(model, config, mesh)
        replicate(self.module, mesh=mesh.device_mesh["dp"])
        # replicate() swaps the parameters for DTensors (replicated over dp): optimize those.
        self.optimizer = build_optimizer(self.module.parameters(), config)

    update = Pipeline.update  # replicate() averaged the gradients during backward

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The stages' parameters, gathered over ``pp`` (each DTensor's local tensor is whole)."""
        local = {k: v.to_local().cpu() for k, v in self.module.state_dict().items()}
        parts: list[dict | None] = [None] * self.p
        dist.all_gather_object(parts, local, group=self.group)
        return {k: v for part in parts for k, v in part.items()}
