"""Checkpoints that outlive the parallelism: save under one strategy, resume under another.

``torch.distributed.checkpoint`` (DCP) saves a state dict whose keys are the single-process
names: each rank writes only the pieces it holds (a DTensor's shard, a pipeline stage's
layers; a tensor every rank holds is written once) and the metadata records which slice of
which tensor each file holds. Loading asks for the tensors *this* strategy holds, in *its*
sharding, and DCP reads just those slices, so a DP checkpoint resumes under TP or FSDP2.
``get_state_dict``/``set_state_dict`` bring model and optimizer to and from that form (no
DDP ``module.`` prefix, Adam's state keyed by parameter name instead of index).

DCP writes a plain (non-DTensor) tensor once, trusting that every rank holds the same one.
So a strategy can be checkpointed when its shards are DTensors or live under names no other
rank uses, and its optimizer steps the module's own parameters: single, dp, zero1 torch,
zero3 torch (FSDP2), tp torch. The scratch TP and ZeRO shards are plain tensors that differ
from rank to rank under one name; ``save`` refuses them rather than keep one rank's copy.

On disk: ``<directory>/step_<n>/`` after ``n`` completed steps. DCP writes ``.metadata`` last,
once every rank has written its data, so a checkpoint without it (a rank died while saving)
is ignored and training resumes from the one before.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor


def _state(strategy: Any) -> dict[str, Any]:
    own = {id(p) for p in strategy.module.parameters()}
    if any(id(p) not in own for g in strategy.optimizer.param_groups for p in g["params"]):
        raise ValueError(
            f"{type(strategy).__name__}'s optimizer steps tensors that are not its module's "
            "parameters (a flat shard), which a checkpoint cannot name: use a torch impl"
        )
    model, optimizer = get_state_dict(strategy.module, strategy.optimizer)
    return {"model": model, "optimizer": optimizer}


def _plain_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _plain_tensors(v, f"{path}/{k}")
    elif isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor):
        yield path, obj


def _check_replicated(state: dict[str, Any]) -> None:
    """Refuse plain tensors that differ between ranks under one name (a collective)."""
    mine = {
        path: hashlib.sha1(t.detach().reshape(-1).view(torch.uint8).cpu().numpy()).hexdigest()
        for path, t in _plain_tensors(state)
    }
    everyone: list[dict[str, str]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    versions = defaultdict(set)
    for rank in everyone:
        for path, digest in rank.items():
            versions[path].add(digest)
    if differ := sorted(path for path, digests in versions.items() if len(digests) > 1):
        raise ValueError(
            f"ranks hold different tensors under the same names ({', '.join(differ[:3])}, ...): "
            "these are shards, and DCP would save one rank's copy. Shard with DTensors "
            "(the torch impls) to checkpoint"
        )


def save(strategy: Any, directory: str | Path, step: int) -> Path:
    """Save model and optimizer after ``step`` completed steps (every rank calls it)."""
    state = _state(strategy)
    _check_replicated(state)
    path = Path(directory) / f"step_{step:06d}"
    dcp.save(state, checkpoint_id=path)
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
