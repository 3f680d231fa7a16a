"""What every strategy shares: the run's config, the rank grid, and a step's output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pdlab.models import build_model

STRATEGIES = ("single", "dp", "ps", "tp", "pp-gpipe", "pp-1f1b", "zero1", "zero3", "dp-tp", "dp-pp")
IMPLS = ("scratch", "torch")
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """One training run, as plain values (the CLI flags and ``pdlab.train`` keywords)."""

    strategy: str = "single"
    impl: str = "scratch"
    model: str = "mlp"
    steps: int = 20
    batch_size: int = 32  # the global batch, over all data-parallel ranks
    micro_batches: int = 1  # pipeline strategies split each rank's batch into these
    lr: float = 0.01
    optimizer: str = "adam"
    seed: int = 0
    world_size: int = 1
    checkpoint_dir: str | None = None  # where pdlab.checkpoint saves and resumes (all ranks)
    checkpoint_every: int = 0  # save after every this many steps (0: never)
    # start from the newest complete checkpoint in checkpoint_dir (it must be undamaged);
    # "latest-valid": from the newest complete and undamaged one
    resume: bool | str = False


@dataclass(frozen=True)
class Layout:
    """The ranks as a grid ``arange(world).view(dp, pp, tp)``: tp fastest, dp slowest.

    TP partners are neighbours (on one host they share the fastest links); a rank's data
    shard is its dp coordinate.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, pp_rank, tp_rank)`` of global ``rank``."""
        return rank // (self.pp * self.tp), rank // self.tp % self.pp, rank % self.tp


@dataclass
class Mesh:
    """A rank's view of the layout: its coordinates and process groups (from one DeviceMesh)."""

    layout: Layout
    device: torch.device
    device_mesh: DeviceMesh | None = None
    rank: int = 0

    @classmethod
    def create(cls, layout: Layout, device: torch.device) -> Mesh:
        # One rank needs no groups, even inside a bigger world (``single`` on a cluster's rank 0).
        if layout.world_size == 1:
            return cls(layout, device)
        mesh = init_device_mesh(
            device.type, (layout.dp, layout.pp, layout.tp), mesh_dim_names=("dp", "pp", "tp")
        )
        return cls(layout, device, mesh, dist.get_rank())

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along ``dim`` ("dp", "pp" or "tp"); None in a one-process run."""
        return None if self.device_mesh is None else self.device_mesh[dim].get_group()


@dataclass
class StepOutput:
    """One optimizer step on one rank: its mean loss over ``samples`` (None if it computed none)."""

    loss: float | None
    samples: int
    timeline: list[dict] = field(default_factory=list)


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (plain: no momentum, no weight decay)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    raise ValueError(
        f"unknown optimizer {config.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}"
    )


def meta_model(config: TrainConfig) -> nn.Sequential:
    """``config``'s model as shapes only (meta device): for formulas; the global RNG is untouched."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return build_model(config.model, config.seed)
