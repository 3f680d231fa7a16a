"""Code written for torchrun, run unchanged on a rank of a warm cluster.

Scripts from tutorials and training repos start the same way — read ``RANK`` and
``WORLD_SIZE``, call ``init_process_group``, parse ``sys.argv`` — and end with
``destroy_process_group()``. On a pdlab rank the process group already exists and must
outlive the script, so this module (imported by every rank, ``install()`` once):

- makes ``init_process_group`` a no-op when asked for what the cluster already has (a
  compatible backend, the same world size), and an error naming the fix otherwise;
- makes ``destroy_process_group()`` leave the cluster's group alone while a script runs
  (``run_script``, ``Cluster.spawn``: ``keeping_the_group``); called from other code, it does what it says, and the kernel notices
  after the call that the group is gone (``group_problem``) and restarts the ranks;
- runs a script as torchrun would (``run_script``): ``__name__ == "__main__"``, ``sys.argv``,
  the script's folder as working directory and first on ``sys.path`` (both restored after),
  ``sys.exit(0)`` as success; modules imported from that folder are re-imported on the next
  run when their files changed, so editing ``model.py`` beside the script and re-running works.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch.distributed import distributed_c10d

_original_init = distributed_c10d.init_process_group
_original_destroy = distributed_c10d.destroy_process_group
_in_script = False
_world: Any = None  # the cluster's default group, as pdlab created it
_imported: dict[str, tuple[int, int]] = {}  # module file -> (mtime_ns, size) when imported


def install() -> None:
    """Put the torchrun-compatible ``init_process_group``/``destroy_process_group`` in place
    (on ``torch.distributed`` and ``distributed_c10d``, where scripts import them from)."""
    global _world
    _world = dist.group.WORLD
    for module in (dist, distributed_c10d):
        module.init_process_group = init_process_group
        module.destroy_process_group = destroy_process_group


def _backend_of(request: str | None) -> set[str]:
    """The backends a request names: "gloo", "cpu:gloo,cuda:nccl" -> {"gloo", "nccl"}."""
    if request is None:
        return set()
    return {part.rpartition(":")[2].strip().lower() for part in str(request).split(",")}


def init_process_group(backend: str | None = None, *args: Any, **kwargs: Any) -> None:
    """``torch.distributed.init_process_group``, where the cluster's group already exists:
    returns when the request matches it, raises ValueError naming the fix when it doesn't."""
    if not dist.is_initialized():
        return _original_init(backend, *args, **kwargs)
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
    """``torch.distributed.destroy_process_group``; inside ``run_script`` the cluster's own
    group is kept (the script's other groups are destroyed as asked)."""
    if _in_script and (group is None or group is dist.group.WORLD):
        return
    _original_destroy(group)


def group_problem() -> str:
    """Why the cluster's process group can't be used any more ('' if it can)."""
    if not dist.is_initialized():
        return "the default process group was destroyed (destroy_process_group())"
    if _world is not None and dist.group.WORLD is not _world:
        return "the default process group was replaced"
    return ""


def _forget_stale_modules(folder: Path) -> None:
    """Drop modules the script would import from ``folder`` that are stale: imported from
    there and changed since, or imported under the same name from somewhere else (another
    script's ``model.py``). The script's next import reads them again."""
    here = {p.stem for p in folder.glob("*.py")} | {
        p.parent.name for p in folder.glob("*/__init__.py")
    }
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        top = name.partition(".")[0]
        if Path(file).parent != folder:
            if top in here and not Path(file).is_relative_to(folder):
                del sys.modules[name]
            continue
        try:
            stat = os.stat(file)
        except OSError:
            del sys.modules[name]
            continue
        if _imported.get(file) != (stat.st_mtime_ns, stat.st_size):
            del sys.modules[name]


def _remember_modules(folder: Path) -> None:
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).parent == folder:
            with contextlib.suppress(OSError):
                stat = os.stat(file)
                _imported[file] = (stat.st_mtime_ns, stat.st_size)


@contextlib.contextmanager
def keeping_the_group() -> Iterator[None]:
    """Code run inside may call ``destroy_process_group()`` (torchrun scripts and
    ``mp.spawn``-style functions end with it): the cluster's group stays."""
    global _in_script
    _in_script = True
    try:
        yield
    finally:
        _in_script = False


@contextlib.contextmanager
def _as_torchrun_would(script: Path, args: list[str]) -> Iterator[None]:
    saved = os.getcwd(), list(sys.path), sys.argv
    os.chdir(script.parent)
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *args]
    try:
        with keeping_the_group():
            yield
    finally:
        os.chdir(saved[0])
        sys.path[:], sys.argv = saved[1], saved[2]


def run_script(path: str, args: list[str]) -> int:
    """Run the script at ``path`` on this rank as torchrun would; its exit code (0).

    A non-zero ``sys.exit`` raises ``SystemExit`` with that code (the kernel names the rank).
    """
    script = Path(path).resolve()
    if not script.is_file():
        raise FileNotFoundError(f"no script at {script} on this rank")
    _forget_stale_modules(script.parent)
    try:
        with _as_torchrun_would(script, list(args)):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise RuntimeError(f"{script.name} exited with code {exc.code!r}") from exc
    finally:
        _remember_modules(script.parent)
    return 0
