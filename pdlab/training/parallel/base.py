"""What every strategy shares: the rank grid, a step's output, what a strategy class provides.

The registry imports this module, so it stays light: DTensor (over a second to import) is
imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pdlab.training.config import OPTIMIZERS, TrainConfig
from pdlab.training.layout import DIMS, Layout
from pdlab.training.models import build_model, set_recompute

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
        names, sizes = cls.grid(layout)
        mesh = init_device_mesh(device.type, sizes, mesh_dim_names=names)
        return cls(layout, device, mesh, dist.get_rank())

    @staticmethod
    def grid(layout: Layout) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """The DeviceMesh's dim names and sizes for ``layout``: dp, pp and tp always
        (strategies ask for them even when 1); cp and ep where used, so that runs without them
        build no extra groups."""
        names = tuple(d for d in DIMS if d in ("dp", "pp", "tp") or getattr(layout, d) > 1)
        return names, tuple(getattr(layout, d) for d in names)

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)["dp"]

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)["pp"]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)["tp"]

    @property
    def cp_rank(self) -> int:
        return self.layout.coords(self.rank)["cp"]

    @property
    def ep_rank(self) -> int:
        return self.layout.coords(self.rank)["ep"]

    @property
    def data_shard(self) -> int:
        """Which slice of the global batch this rank reads (its (dp, ep) coordinate)."""
        return self.layout.data_shard(self.rank)

    def group(self, dim: str) -> dist.ProcessGroup | None:
        """The process group along ``dim`` (one of ``DIMS``); None in a one-process run."""
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
    chunks: list[nn.Module]  # what runs forward, a call each (timed spans): [module], or v chunks
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # TrainConfig.precision's


def model_for(config: TrainConfig) -> nn.Sequential:
    """``config``'s model as every rank builds it: weights from ``config.seed``, recompute
    set, in the precision's dtype (rounded from the same float32 weights on every rank)."""
    model = build_model(config.model, config.seed, seq_len=config.seq_len)
    set_recompute(model, config.recompute)
    return model.to(DTYPES[config.precision])


class MasterWeights(torch.optim.Optimizer):
    """Mixed precision as ZeRO and Megatron keep it: the model computes, and its gradients
    are communicated, in bf16; the optimizer (``inner``) steps an fp32 master copy of every
    parameter, whose rounding then becomes the parameter. Its state, masters and Adam's
    moments, is ZeRO's K = 12 bytes a weight (4 + 4 + 4): 2 + 2 + 12 with the bf16
    parameter and gradient."""

    def __init__(self, params, inner: Callable[[list[dict]], torch.optim.Optimizer]):
        super().__init__(params, {})
        for p in self._params():
            self.state[p]["master"] = p.detach().to(torch.float32)
        self.inner = inner(
            [{"params": [self.state[p]["master"] for p in g["params"]]} for g in self.param_groups]
        )

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for p in self._params():
            master = self.state[p]["master"]
            master.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.inner.step()
        for p in self._params():
            master = self.state[p]["master"]
            p.copy_(master)
            master.grad = None
            self.state[p].update(self.inner.state[master])  # the moments, for memory's count


def build_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer ``config`` names, over ``params`` (plain: no momentum, no weight decay);
    in bf16, over fp32 master copies of them (``MasterWeights``)."""
    if config.precision == "bf16":
        return MasterWeights(
            params, lambda masters: build_optimizer(masters, replace(config, precision="fp32"))
        )
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
        return model_for(config)
