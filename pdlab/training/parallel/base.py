"""What every strategy shares: the rank grid, a step's output, what a strategy class provides.

The registry imports this module, so it stays light: DTensor (over a second to import) is
imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pdlab.training.config import OPTIMIZERS, TrainConfig
from pdlab.training.layout import Layout
from pdlab.training.models import build_model

if TYPE_CHECKING:
    from pdlab.measure.comm import CommEvent


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


class Implementation(Protocol):
    """What a registered strategy class provides (see README.md beside this file).

    Built on every rank as ``cls(model, config, mesh)``. A class may also define a static
    ``check(config, layout)`` raising ValueError that names the fix; ``loop.validate``
    calls it before any rank starts work.
    """

    module: nn.Module  # this rank's part of the model (memory and checkpoints read it)
    optimizer: torch.optim.Optimizer | None  # over this rank's state
    counts_own_comm: ClassVar[bool]  # True: it records its bytes itself (comm.record)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput: ...

    def full_state_dict(self) -> dict[str, torch.Tensor]: ...

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]: ...


def wire_device(group: dist.ProcessGroup, device: torch.device) -> torch.device:
    """Where point-to-point tensors travel over ``group``: the CPU on gloo, else ``device``.

    gloo's send and recv move host memory only (a CUDA pointer fails in writev: "Bad
    address"), so ranks that share a GPU, and so use gloo, send through the CPU.
    """
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else device


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``'s whole value: a DTensor gathered (a collective when it is sharded), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def by_kind(params: Iterable[torch.Tensor]) -> list[dict]:
    """Parameter groups that never mix DTensors with plain tensors: on CUDA an optimizer
    updates a group with one foreach kernel, which can't take both."""
    from torch.distributed.tensor import DTensor

    params = list(params)
    groups = [[p for p in params if isinstance(p, DTensor) is kind] for kind in (True, False)]
    return [{"params": g} for g in groups if g]


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
