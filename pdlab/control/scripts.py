"""Code written for torchrun or ``torch.multiprocessing.spawn``, run unchanged on a rank of a
warm cluster, as if in a process of its own.

Scripts from tutorials and training repos start the same way — read ``RANK`` and
``WORLD_SIZE``, call ``init_process_group`` (or ``mp.spawn`` a function that does), parse
``sys.argv`` — and end with ``destroy_process_group()``. On a pdlab rank the process group
already exists and must outlive the script, and the process outlives it too, so this module
(imported by every rank, ``install()`` once):

- makes ``init_process_group`` a no-op when asked for what the cluster already has (a
  compatible backend, the same world size), and an error naming the fix otherwise;
- runs ``mp.spawn(fn, args, nprocs=world size)`` in place: each rank calls ``fn(rank, *args)``
  where torch would start that many processes;
- runs code ``as_its_own_process``: what it changes in the process (``_STATE``: environment,
  torch's global defaults, ``sys.argv``, warnings, signal handlers, ...) is put back after,
  the process groups it made are destroyed (by its ``destroy_process_group()``, else when it
  ends) while the cluster's group stays; ``Cluster.spawn`` and ``mp.spawn`` run so;
- runs a script as torchrun would (``run_script``): ``__name__ == "__main__"``, ``sys.argv``
  as typed, the caller's working directory, the script's folder first on ``sys.path``, every
  module from that folder imported afresh, ``sys.exit(0)`` as success.

Called outside those, ``destroy_process_group()`` does what it says, and the kernel notices
after the call that the group is gone (``group_problem``) and restarts the ranks.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.multiprocessing
import torch.multiprocessing.spawn
from torch.distributed import distributed_c10d

from pdlab import compat
from pdlab.measure import flight

_original_init = distributed_c10d.init_process_group
_original_destroy = distributed_c10d.destroy_process_group
_world: Any = None  # the cluster's default group, as pdlab created it
# The groups that existed when the innermost ``as_its_own_process`` began (None outside one):
# its destroy_process_group() destroys the others.
_groups_before: set[str] | None = None


def install() -> None:
    """Put the torchrun-compatible ``init_process_group``/``destroy_process_group`` in place
    (on ``torch.distributed`` and ``distributed_c10d``, where scripts import them from), and
    ``spawn``/``start_processes`` that run in place (``mp.spawn`` delegates to the latter)."""
    global _world
    _world = dist.group.WORLD
    for module in (dist, distributed_c10d):
        module.init_process_group = init_process_group
        module.destroy_process_group = destroy_process_group
    for module in (torch.multiprocessing, sys.modules["torch.multiprocessing.spawn"]):
        module.spawn = module.start_processes = spawn_in_place


def _backend_of(request: str | None) -> set[str]:
    """The backends a request names: "gloo", "cpu:gloo,cuda:nccl" -> {"gloo", "nccl"}."""
    if request is None:
        return set()
    return {part.rpartition(":")[2].strip().lower() for part in str(request).split(",")}


def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group``, where the cluster's group already exists:
    returns when the request matches it, raises ValueError naming the fix when it doesn't."""
    if not dist.is_initialized():  # the cluster's group was destroyed: a new one (env://)
        # torchrun's agent hosts the store every rank joins (TORCHELASTIC_USE_AGENT_STORE);
        # pdlab has none, so rank 0 hosts it, as without torchrun (else all would wait).
        agent_store = os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        try:
            return _original_init(backend, *args, **kwargs)
        finally:
            if agent_store is not None:
                os.environ["TORCHELASTIC_USE_AGENT_STORE"] = agent_store
    have = dist.get_backend()
    wanted = _backend_of(backend) - {"undefined"}
    if wanted and have not in wanted:
        raise ValueError(
            f"the script asks init_process_group for backend {backend!r}, but this pdlab "
            f"cluster's process group uses {have!r}, and it already exists (pdlab made it). "
            f"Ask for {have!r} (or leave backend out), or start a cluster with "
            f"pdlab.Cluster(n, backend={next(iter(wanted))!r}) where that backend can run"
        )
    for name, actual in (("world_size", dist.get_world_size()), ("rank", dist.get_rank())):
        asked = kwargs.get(name)
        if asked is not None and asked not in (-1, actual):
            raise ValueError(
                f"the script asks init_process_group for {name}={asked}, but on this pdlab "
                f"cluster this rank has {name}={actual}: read it from the environment "
                "(RANK, WORLD_SIZE) as torchrun scripts do, or start a cluster of that size"
            )


def destroy_process_group(group: Any = None) -> None:
    """``torch.distributed.destroy_process_group``; inside ``as_its_own_process`` the whole
    group (``None``, ``WORLD``) means every group that code made: the cluster's stay."""
    if _groups_before is not None and (group is None or group is dist.group.WORLD):
        _destroy_groups_except(_groups_before)
    else:
        _original_destroy(group)


def _destroy_groups_except(kept: set[str]) -> None:
    for name, pg in compat.process_groups().items():
        if name not in kept:
            _original_destroy(pg)


def spawn_in_place(
    fn: Callable[..., Any],
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> None:
    """``torch.multiprocessing.spawn`` (and ``start_processes``) on a pdlab rank: this rank
    is the process torch would start for it, so it calls ``fn(rank, *args)`` in place."""
    world = dist.get_world_size()
    if nprocs != world:
        raise ValueError(
            f"mp.spawn(..., nprocs={nprocs}) on a pdlab rank runs fn(rank, *args) in place of "
            f"the process it would start, one a rank, and this cluster has {world} ranks: "
            f"start pdlab.Cluster({nprocs}) to run it with {nprocs} processes, or pass "
            f"nprocs={world}"
        )
    if not join:
        raise ValueError(
            "mp.spawn(..., join=False) on a pdlab rank: fn runs in place, so there is no "
            "process to join later; pass join=True"
        )
    with as_its_own_process():
        fn(dist.get_rank(), *args)


def group_problem() -> str:
    """Why the cluster's process group can't be used any more ('' if it can)."""
    if not dist.is_initialized():
        return "the default process group was destroyed (destroy_process_group())"
    if _world is not None and dist.group.WORLD is not _world:
        return "the default process group was replaced"
    return ""


# ---- a process of its own: what code may change, taken before and put back after ----------


def _put_environment(saved: dict[str, str]) -> None:
    for name in set(os.environ) - set(saved):
        del os.environ[name]
    for name, value in saved.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _put_warnings(saved: tuple[list, dict]) -> None:
    warnings.filters[:], once = saved
    _reset_warnings()
    warnings.onceregistry.update(once)


_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


def _put_signal_handlers(saved: dict[int, Any]) -> None:
    for number, handler in saved.items():
        # None: installed outside Python (it can't be put back, nor could the code change it)
        if handler is not None and signal.getsignal(number) is not handler:
            signal.signal(number, handler)


def _put_logging(saved: tuple[int, list]) -> None:
    root = logging.getLogger()
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]


def _deterministic() -> tuple[bool, bool]:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )


def _put_deterministic(saved: tuple[bool, bool]) -> None:
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def _put_default_device(saved: torch.device) -> None:
    # None for the CPU: a default device set at all puts a mode in front of every op.
    torch.set_default_device(None if saved == torch.device("cpu") else saved)


_FLAGS = [
    (torch.backends.cudnn, "enabled"),
    (torch.backends.cudnn, "benchmark"),
    (torch.backends.cudnn, "deterministic"),
]  # Not the TF32 flags: torch 2.13 can't read them back once legacy and new APIs were mixed


def _backend_flags() -> list[bool]:
    return [getattr(owner, name) for owner, name in _FLAGS]


def _put_backend_flags(saved: list[bool]) -> None:
    for (owner, name), value in zip(_FLAGS, saved, strict=True):
        setattr(owner, name, value)


def _put_streams(saved: tuple[Any, Any]) -> None:
    sys.stdout, sys.stderr = saved  # the rank's, which reach the kernel


def _same(now: Any, saved: Any) -> bool:
    return torch.equal(now, saved) if isinstance(now, torch.Tensor) else bool(now == saved)


_PRINT_OPTIONS = compat.print_options()


def _reset_warnings() -> None:
    warnings.onceregistry.clear()
    # Every module's ``__warningregistry__`` (what "default" showed already) becomes stale.
    warnings._filters_mutated()


class _Part(NamedTuple):
    """Something code may change in this process: how to take it, how to put it back, and
    (``fresh``) how to make it what a new process starts with, where the current one isn't."""

    take: Callable[[], Any]
    put: Callable[[Any], None]
    fresh: Callable[[], None] | None = None


# Everything in this process that code may change and that a new process would start without.
# One table, so nothing is restored ad hoc (the script's folder's modules: ``_parts``).
_STATE: dict[str, _Part] = {
    "environment variables": _Part(lambda: dict(os.environ), _put_environment),
    "working directory": _Part(os.getcwd, os.chdir),
    "sys.argv": _Part(lambda: list(sys.argv), lambda saved: setattr(sys, "argv", saved)),
    "sys.path": _Part(lambda: list(sys.path), lambda saved: sys.path.__setitem__(slice(None), saved)),
    "sys.stdout, sys.stderr": _Part(lambda: (sys.stdout, sys.stderr), _put_streams),
    "__main__": _Part(lambda: sys.modules["__main__"], lambda m: sys.modules.__setitem__("__main__", m)),
    "default dtype": _Part(torch.get_default_dtype, torch.set_default_dtype),
    "default device": _Part(torch.get_default_device, _put_default_device),
    "grad mode": _Part(torch.is_grad_enabled, torch.set_grad_enabled),
    "deterministic algorithms": _Part(_deterministic, _put_deterministic),
    "intra-op threads": _Part(torch.get_num_threads, torch.set_num_threads),
    "anomaly mode": _Part(
        lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        lambda saved: torch.set_anomaly_enabled(*saved),
    ),
    "float32 matmul precision": _Part(
        torch.get_float32_matmul_precision, torch.set_float32_matmul_precision
    ),
    "cuDNN flags": _Part(_backend_flags, _put_backend_flags),
    "print options": _Part(lambda: dict(_PRINT_OPTIONS), _PRINT_OPTIONS.update),
    "random number generator": _Part(torch.get_rng_state, torch.set_rng_state),
    # A new process shows each warning once more, even one earlier code here showed already.
    "warnings": _Part(lambda: (list(warnings.filters), dict(warnings.onceregistry)), _put_warnings, _reset_warnings),
    "signal handlers": _Part(lambda: {s: signal.getsignal(s) for s in _SIGNALS}, _put_signal_handlers),
    "root logger": _Part(lambda: (logging.getLogger().level, list(logging.getLogger().handlers)), _put_logging),
    "process groups": _Part(lambda: set(compat.process_groups()), _destroy_groups_except),
}  # fmt: skip


def _parts(folder: Path | None) -> dict[str, _Part]:
    """``_STATE``, and for a script in ``folder`` the modules it imports from there: none
    at its start (a new process has none, so edited helpers are read as they are now)."""
    if folder is None:
        return _STATE
    modules = _Part(
        lambda: _modules_of(folder),
        lambda saved: _put_modules(folder, saved),
        lambda: _put_modules(folder, {}),
    )
    return {**_STATE, "modules from the script's folder": modules}


@contextlib.contextmanager
def as_its_own_process(folder: Path | None = None) -> Iterator[None]:
    """Run code as in a new process that joined the cluster's group: each part of ``_STATE``
    starts fresh where a new process would differ and is put back after; the groups the code
    makes are destroyed by its ``destroy_process_group()`` (or when it ends), the cluster's
    stays. With ``folder``, the modules from there too (``_parts``)."""
    global _groups_before
    parts = _parts(folder)
    saved = {name: part.take() for name, part in parts.items()}
    outer, _groups_before = _groups_before, saved["process groups"]
    for part in parts.values():
        if part.fresh is not None:
            part.fresh()
    try:
        yield
    finally:
        _groups_before = outer
        for name, part in reversed(parts.items()):
            if not _same(part.take(), saved[name]):  # some puts cost (threads) or add (device)
                part.put(saved[name])


# ---- scripts ----------------------------------------------------------------------------------


def _location(module: types.ModuleType) -> str | None:
    """The file a module was loaded from, or a namespace package's first folder."""
    file = getattr(module, "__file__", None)
    if file is None:
        file = next(iter(getattr(module, "__path__", None) or []), None)
    return file if isinstance(file, str) else None


def _modules_of(folder: Path) -> dict[str, types.ModuleType]:
    """The modules a script in ``folder`` imports from there, and the user's modules that it
    would import from there instead (another folder's ``model.py``). Never the standard
    library, installed packages (a virtual environment inside the folder) or pdlab."""
    names = {p.stem for p in folder.glob("*.py")} | {
        p.parent.name for p in folder.glob("*/__init__.py")
    }
    inside = str(folder) + os.sep
    mine = {}
    for name, module in list(sys.modules.items()):  # ~1,500 once torch is in: strings only
        where = _location(module)
        if (
            where
            and (where.startswith(inside) or name.partition(".")[0] in names)
            and name != "__main__"  # the script itself, while it runs
            and flight.is_user_code(where)
        ):
            mine[name] = module
    return mine


def _put_modules(folder: Path, saved: dict[str, types.ModuleType]) -> None:
    for name in _modules_of(folder):
        del sys.modules[name]
    sys.modules.update(saved)
    importlib.invalidate_caches()  # a file added since the folder was last listed


def run_script(path: str, args: list[str]) -> int:
    """Run the script at ``path`` (as typed, relative to the working directory) on this rank
    as torchrun would; its exit code (0).

    A non-zero ``sys.exit`` raises ``RuntimeError`` with that code (the kernel names the rank).
    """
    script = Path(path).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"no script at {script} on this rank")
    code = compile(script.read_bytes(), str(script), "exec")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)  # absolute, as Python gives a script since 3.9
    try:
        with as_its_own_process(script.parent):
            sys.argv = [path, *args]
            sys.path.insert(0, str(script.parent))
            sys.modules["__main__"] = main  # pickle finds the script's classes there
            exec(code, vars(main))
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise RuntimeError(f"{script.name} exited with code {exc.code!r}") from exc
    return 0
