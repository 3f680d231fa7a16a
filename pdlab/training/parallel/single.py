"""``single``: plain one-process training, the baseline every strategy must match step for step.

The step is split where the strategies differ: ``forward_backward`` computes this rank's
gradients and ``update`` turns them into new parameters. Data parallelism (``data.py``)
only overrides ``update``; the pipelines (``pipeline.py``) only ``forward_backward``; the
hybrids (``hybrid.py``) call the two halves of a model-parallel strategy with a gradient
average over ``dp`` between them.
"""

from __future__ import annotations

import torch
from torch import nn

from pdlab.measure.comm import CommEvent
from pdlab.training.layout import Layout
from pdlab.training.models import loss_fn
from pdlab.training.parallel.base import Mesh, StepOutput, TrainConfig, build_optimizer


class Single:
    """The whole model and optimizer in one process; no communication."""

    # True when the strategy records every byte it sends itself (comm.record), so the
    # training loop can leave the per-op dispatch meter off.
    counts_own_comm = False
    loss_fn = staticmethod(loss_fn)  # (logits, targets) -> mean loss; a split head has its own

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        self.model = model.to(mesh.device)  # unwrapped, with the single-process names
        self.module: nn.Module = self.model  # what runs forward (wrappers replace it)
        self.optimizer: torch.optim.Optimizer | None = build_optimizer(
            self.model.parameters(), config
        )

    @property
    def chunks(self) -> list[nn.Module]:
        """The modules that run forward, each called on its own: here ``module``."""
        return [self.module]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        out = self.forward_backward(x, y)
        self.update()
        return out

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """This rank's gradients for its batch (the old ones dropped first), and its loss."""
        self.model.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.module(x), y)
        loss.backward()
        return StepOutput(loss.item(), len(x))

    def update(self) -> None:
        """Apply this rank's gradients: here, an optimizer step."""
        self.optimizer.step()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        return []
