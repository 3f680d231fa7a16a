"""What code running on a rank can ask: its rank, the world size, and ``log`` for metrics.

Inside a pdlab rank process, ``log`` streams a record to the kernel. Anywhere else (a plain
``torchrun`` script, a single process) records go to ``local_records`` instead, so the same
training code runs with or without the notebook.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# Set by ``bind`` in a pdlab rank; None elsewhere (a plain torchrun script, one process).
_sink: Callable[[dict[str, Any]], None] | None = None
_device: torch.device | None = None
_control_fd: int | None = None
local_records: list[dict[str, Any]] = []

_UNSET: Any = object()


def bind(
    *,
    device: torch.device | None = _UNSET,
    sink: Callable[[dict[str, Any]], None] | None = _UNSET,
    control_fd: int | None = _UNSET,
) -> None:
    """Tell the runtime what this process is (``pdlab.control.worker`` calls it on every rank).

    ``device``: what ``device()`` returns; ``sink``: where ``log`` sends records (the
    kernel's control channel); ``control_fd``: that channel's socket, whose bytes are not
    training traffic. Arguments left out keep their current value.
    """
    global _device, _sink, _control_fd
    if device is not _UNSET:
        _device = device
    if sink is not _UNSET:
        _sink = sink
    if control_fd is not _UNSET:
        _control_fd = control_fd


def control_fds() -> list[int]:
    """This rank's connection to the kernel, if it has one: ``pdlab.measure.wire`` leaves it out."""
    return [] if _control_fd is None else [_control_fd]


def rank() -> int:
    """This process's global rank (0 when no process group is up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    """Number of ranks in the default process group (1 when none is up)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def device() -> torch.device:
    """The device this rank computes on: its GPU when the cluster gave it one, else the CPU."""
    if _device is not None:
        return _device
    if torch.cuda.is_available():
        return torch.device(
            "cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        )
    return torch.device("cpu")


def collective_counts() -> dict[str, int]:
    """How many operations (collectives and point-to-point) each of this rank's process groups
    has issued, by group name.

    After a failed call the kernel compares them across ranks: members of one group that
    stopped at different counts would pair their next collective with a stale one and hang.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return {}
    from pdlab import compat

    return compat.sequence_numbers()


def log(**metrics: Any) -> None:
    """Stream a metrics record (stamped with ``rank`` and ``time``) to the kernel."""
    record = {"rank": rank(), "time": time.time(), **metrics}
    if _sink is None:
        local_records.append(record)
    else:
        _sink(record)
