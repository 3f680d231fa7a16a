"""Checkpoints that outlive the parallelism: save under one strategy, resume under another.

``torch.distributed.checkpoint`` (DCP) saves a state dict whose keys are the single-process
names: each rank writes only the pieces it holds (a DTensor's shard, a pipeline stage's
layers; a tensor every rank holds is written once) and the metadata records which slice of
which tensor each file holds. Loading asks for the tensors *this* strategy holds, in *its*
sharding, and DCP reads just those slices, so a DP checkpoint resumes under TP or FSDP2.
``get_state_dict``/``set_state_dict`` bring model and optimizer to and from that form (no
DDP ``module.`` prefix, Adam's state keyed by parameter name instead of index).

This works for strategies whose ``module`` and ``optimizer`` are plain torch over the model's
own parameters, sharded or not: single, dp, tp, zero1 torch, zero3 torch. The scratch ZeRO
strategies keep flat shards under other names, which DCP cannot map back.

On disk: ``<directory>/step_<n>/`` after ``n`` completed steps. DCP writes ``.metadata`` last,
once every rank has written its data, so a checkpoint without it (a rank died while saving)
is ignored and training resumes from the one before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


def _state(strategy: Any) -> dict[str, Any]:
    model, optimizer = get_state_dict(strategy.module, strategy.optimizer)
    return {"model": model, "optimizer": optimizer}


def save(strategy: Any, directory: str | Path, step: int) -> Path:
    """Save model and optimizer after ``step`` completed steps (every rank calls it)."""
    path = Path(directory) / f"step_{step:06d}"
    dcp.save(_state(strategy), checkpoint_id=path)
    return path


def latest(directory: str | Path) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, None if there is none."""
    done = [
        int(p.parent.name.removeprefix("step_")) for p in Path(directory).glob("step_*/.metadata")
    ]
    return max(done, default=None)


def load(strategy: Any, directory: str | Path) -> int:
    """Load the newest complete checkpoint into ``strategy``; the steps it had completed.

    Returns 0 (and loads nothing) when ``directory`` holds no complete checkpoint.
    """
    step = latest(directory)
    if step is None:
        return 0
    state = _state(strategy)  # this strategy's tensors, in its sharding: DCP fills them in place
    dcp.load(state, checkpoint_id=Path(directory) / f"step_{step:06d}")
    set_state_dict(
        strategy.module,
        strategy.optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
    )
    return step
