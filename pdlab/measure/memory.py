"""Memory a rank holds: its parameters, gradients and optimizer state, and its peak.

Counted from the tensors themselves, so a sharded strategy shows its savings: a DTensor
counts its local shard only, and a rank without an optimizer (a parameter-server worker)
holds no optimizer state. ZeRO's arithmetic (Rajbhandari et al. 2020, arXiv 1910.02054):
with Adam in fp32, parameters, gradients and the two moments take 4 + 4 + 8 bytes a weight.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` occupies on this rank (a DTensor's local shard)."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()


def optimizer_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of the optimizer's state tensors (Adam's moments and step counters)."""
    if optimizer is None:
        return 0
    return sum(
        tensor_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def peak_bytes(device: torch.device) -> int:
    """Peak memory: CUDA memory allocated during this run on a GPU (``run_on_rank`` resets
    it); on a CPU the process's peak resident set size since it started, which the OS can't
    reset, so on a warm cluster it includes earlier runs and ``import torch`` (~220 MB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def trained(module: nn.Module, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """The module's parameters, then the tensors the optimizer steps that are none of them
    (the shards ZeRO-1 and ZeRO-2 from scratch step, whose gradients are the reduced ones)."""
    params = list(module.parameters())
    seen = {id(p) for p in params}
    stepped = [p for g in optimizer.param_groups for p in g["params"]] if optimizer else []
    return params + [p for p in stepped if id(p) not in seen]


def measure(
    module: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    device: torch.device,
    activation_bytes: int = 0,
) -> dict[str, int]:
    """``param_bytes``, ``grad_bytes`` (every gradient the rank holds: its parameters' and
    its optimizer's shards'), ``optimizer_bytes``, ``activation_bytes`` (as measured by an
    ``ActivationMeter``) and ``peak_bytes`` of this rank."""
    return {
        "param_bytes": sum(tensor_bytes(p) for p in module.parameters()),
        "grad_bytes": sum(
            tensor_bytes(p.grad) for p in trained(module, optimizer) if p.grad is not None
        ),
        "optimizer_bytes": optimizer_bytes(optimizer),
        "activation_bytes": activation_bytes,
        "peak_bytes": peak_bytes(device),
    }


class _Saved:
    """What autograd keeps for one saved tensor while ``SavedTensors`` is on: the tensor, and
    its storage counted as live until autograd drops this (after the op's backward)."""

    def __init__(self, meter: SavedTensors, tensor: torch.Tensor, key: int, nbytes: int):
        self.meter, self.tensor, self.key = meter, tensor, key
        meter.hold(key, nbytes)

    def __del__(self) -> None:
        self.meter.release(self.key)


class SavedTensors:
    """``with SavedTensors() as saved:`` … ``saved.peak``: the most bytes of tensors saved
    for backward (activations) alive at once inside the block, through
    ``torch.autograd.graph.saved_tensors_hooks``; ``saved.bytes``: alive now.

    A storage counts once however many ops save it (views included), at its full size.
    Parameters and views of them are left out (a matmul saves its weight: model state,
    counted as such). A checkpointed region saves its inputs (counted) and nothing inside.
    """

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, saved tensors on it]
        self.bytes = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        _active.remove(self)
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor) -> object:
        if _is_parameter(tensor):
            return tensor
        storage = _local(tensor).untyped_storage()
        return _Saved(self, tensor, storage.data_ptr(), storage.nbytes())

    @staticmethod
    def _unpack(saved: object) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def hold(self, key: int, nbytes: int) -> None:
        entry = self.live.setdefault(key, [nbytes, 0])
        if entry[1] == 0:
            self.bytes += nbytes
            self.peak = max(self.peak, self.bytes)
        entry[1] += 1

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[key]


_active: list[SavedTensors] = []


def saved_bytes() -> int:
    """Bytes saved for backward and alive now, in the innermost ``SavedTensors`` (0: none)."""
    return _active[-1].bytes if _active else 0


def _is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (``weight.t()``; FSDP2's gathered ones are Parameters)."""
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


def _local(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a DTensor's local shard (which holds its storage)."""
    return t._local_tensor if isinstance(t, DTensor) else t
