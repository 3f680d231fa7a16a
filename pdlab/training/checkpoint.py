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

On disk: ``<directory>/step_<n>/`` after ``n`` completed steps, holding each rank's data files
(``__<rank>_0.distcp``), ``manifest.json`` and DCP's ``.metadata``, in that order:

1. every rank writes (and fsyncs) its own data files;
2. DCP gathers every rank's list of written files to rank 0 for ``.metadata``; just before
   writing it, rank 0 hashes those files and writes ``manifest.json`` (fsynced, then renamed
   into place)::

       {"format": 1, "files": {"__0_0.distcp": {"size": 81234, "sha256": "9f2c..."}, ...}}

3. rank 0 writes ``.metadata`` (DCP: to a temp file, renamed into place).

A checkpoint is *complete* when ``manifest.json`` and ``.metadata`` are both there; one
without ``.metadata`` (a rank died while saving) is ignored, as is one without a manifest:
written by pdlab before manifests existed (or not by pdlab), its files cannot be verified,
and loading unverified files is how a flipped bit becomes a NaN loss a step later. A save
into a folder that already holds a checkpoint (a rerun) that dies midway leaves the old
manifest over new files: that is found as damage on resume.

One manifest, written by rank 0, rather than one per rank: DCP already hands rank 0 every
rank's file names at that moment, before ``.metadata`` exists; rank 0 already reads and
writes this directory (DCP on a file system needs one directory every rank can reach: a
resume under another sharding reads other ranks' files); and one file written by one process
cannot be half there for some ranks. The price is that rank 0 reads every file once more,
right after it was written (the page cache holds it; pdlab's models are megabytes).

Resuming, rank 0 alone picks the checkpoint and hashes its files against the manifest, then
broadcasts its verdict, so every rank loads the same step or raises the same error (no rank
waits in a collective for one that raised). A mismatch names the file and says the checkpoint
is damaged; ``resume=True`` raises, ``resume="latest-valid"`` skips to the newest complete,
undamaged checkpoint and prints on rank 0 which ones it skipped and why (none: step 0).
``.metadata`` itself is not in the manifest (it is written after it): what it names must
still fit the model for DCP to load, but a changed byte in it is not detected as such.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import re
import shutil
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from pdlab import checks

MANIFEST = "manifest.json"
METADATA = ".metadata"  # DCP's name for the file it writes last
LATEST_VALID = "latest-valid"  # resume from the newest undamaged checkpoint
FULL_BYTES = 1 << 20  # less free than this after a failed save: the disk is what failed
MISMATCH = re.compile(r"Missing key in checkpoint state_dict|[Ss]ize mismatch")  # DCP's words


class DamagedCheckpoint(ValueError):
    """A checkpoint's files are not the bytes its manifest recorded when they were saved."""


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


def _in_group(alone: bool) -> bool:
    """Whether this checkpoint is a collective: ``alone`` for a run of one process, which may
    be rank 0 of a bigger group (``single`` on a cluster) whose other ranks don't take part."""
    return not alone and dist.is_available() and dist.is_initialized()


def _check_replicated(state: dict[str, Any], alone: bool, saving: bool = True) -> None:
    """Refuse plain tensors that differ between ranks under one name (a collective): shards
    DCP can neither save (it would keep one rank's) nor load (it would read the whole
    tensor into each, and fail on the shape: "saved by another model", which it isn't)."""
    if not _in_group(alone):
        return  # one process: nothing to differ from
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
        wrong = "save one rank's copy" if saving else "read the whole tensor into each rank's"
        raise ValueError(
            f"ranks hold different tensors under the same names ({', '.join(differ[:3])}, ...): "
            f"these are shards, and DCP would {wrong}. Shard with DTensors (the torch impls) "
            f"to {'checkpoint' if saving else 'resume'}"
        )


def _fingerprint(file: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"size": file.stat().st_size, "sha256": digest.hexdigest()}


class _ManifestWriter(dcp.FileSystemWriter):
    """DCP's file writer, which also writes ``manifest.json`` just before ``.metadata``."""

    def finish(self, metadata: Any, results: list[list[Any]]) -> None:
        # Runs on rank 0 alone, once every rank has written and fsynced its files; ``results``
        # holds each rank's list of what it wrote (FileSystemWriter's ``_StorageInfo``, whose
        # ``relative_path`` names the file: unchanged from torch 2.0 to 2.13).
        path = Path(self.path)
        names = sorted({r.storage_data.relative_path for rank in results for r in rank})
        manifest = {"format": 1, "files": {name: _fingerprint(path / name) for name in names}}
        temp = path / f"{MANIFEST}.tmp"
        with open(temp, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it count
        os.replace(temp, path / MANIFEST)
        super().finish(metadata, results)


def save(strategy: Any, directory: str | Path, step: int, alone: bool = False) -> Path:
    """Save model and optimizer after ``step`` completed steps (every rank of the run calls
    it; ``alone``: the run is one process)."""
    state = _state(strategy)
    _check_replicated(state, alone)
    path = Path(directory) / f"step_{step:06d}"
    try:
        dcp.save(
            state,
            checkpoint_id=path,
            storage_writer=_ManifestWriter(path),
            no_dist=not _in_group(alone),
        )
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
        free = _free_bytes(directory)
        # A full disk reads as ENOSPC on some ranks and as a short write on others
        # ("unexpected pos 704 vs 598"): the free space tells them apart from other faults.
        if "No space left on device" not in str(exc) and (free is None or free > FULL_BYTES):
            raise
        raise OSError(
            errno.ENOSPC,
            f"checkpoint {path} could not be written: the disk holding {directory} is full "
            f"({free or 0:,} bytes free). Free some space or pass another checkpoint_dir",
        ) from None
    return path


def _free_bytes(directory: str | Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def _checkpoints(directory: str | Path) -> dict[int, Path]:
    """Every ``step_<n>`` folder in ``directory``, complete or not, by step."""
    found = {}
    for path in Path(directory).glob("step_*"):
        if path.name.removeprefix("step_").isdigit():
            found[int(path.name.removeprefix("step_"))] = path
    return found


def _incomplete(path: Path) -> str | None:
    """Why the checkpoint in ``path`` is not complete (None: it is)."""
    if not (path / METADATA).exists():
        return f"no {METADATA}: its save did not finish"
    if not (path / MANIFEST).exists():
        return f"no {MANIFEST} (saved by an older pdlab, or not by pdlab): its files cannot be verified"
    return None


def latest(directory: str | Path) -> int | None:
    """The step of the newest complete checkpoint in ``directory``, None if there is none."""
    done = [step for step, path in _checkpoints(directory).items() if _incomplete(path) is None]
    return max(done, default=None)


def damage(path: str | Path) -> str | None:
    """What differs in complete checkpoint ``path`` from its manifest (None: nothing)."""
    path = Path(path)
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
        if not isinstance(files, dict) or not all(
            isinstance(saved, dict) and {"size", "sha256"} <= saved.keys()
            for saved in files.values()
        ):
            raise ValueError("'files' must map each file's name to its size and sha256")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its {MANIFEST} is unreadable ({type(exc).__name__}: {exc})"
    for name, saved in files.items():
        if not (path / name).is_file():
            return f"{name} is missing"
        now = _fingerprint(path / name)
        if now["size"] != saved["size"]:
            return f"{name} has {now['size']:,} bytes; it had {saved['size']:,} when saved"
        if now["sha256"] != saved["sha256"]:
            return (
                f"{name} is not the file that was saved (sha256 {now['sha256'][:16]}..., "
                f"saved {saved['sha256'][:16]}...)"
            )
    return None


def _choose(directory: Path, fallback: bool) -> int | None:
    """The step to resume from: the newest complete checkpoint, which must be undamaged
    (``fallback``: the newest complete, undamaged one). Says on stderr what it skipped."""
    step, skipped = None, []
    for candidate, path in sorted(_checkpoints(directory).items(), reverse=True):
        if why := _incomplete(path):
            skipped.append(f"{path.name} ({why})")
            continue
        if (why := damage(path)) is None:
            step = candidate
            break
        if not fallback:
            raise DamagedCheckpoint(
                f"checkpoint {path} is damaged: {why}. Resume from the newest undamaged "
                f"checkpoint with resume={LATEST_VALID!r}, or delete {path.name}"
            )
        skipped.append(f"{path.name} (damaged: {why})")
    if skipped:
        start = f"resuming from step {step}" if step is not None else "starting from step 0"
        print(f"pdlab.training.checkpoint: {start}; skipped {'; '.join(skipped)}", file=sys.stderr)
    return step


def _decided_by_rank0(alone: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` run on rank 0 alone; every rank returns its result or raises its error,
    so all ranks act on one reading of the files and none waits for a rank that raised."""
    if not _in_group(alone):
        return fn(*args)
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = (fn(*args), None)
        except Exception as exc:
            outcome[0] = (None, exc)
    dist.broadcast_object_list(outcome, src=0)
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def _nothing_to_train(directory: str | Path, step: int, steps: int) -> str:
    return (
        f"the checkpoint in {directory} is at step {step}; steps={steps} would train nothing: "
        f"use steps > {step} (steps is the total, counted from step 0)"
    )


def check(config: Any) -> None:
    """Validate ``config.checkpoint_dir`` (a folder; one this process can write to when the
    run saves), ``config.resume`` (and, resuming, that steps go past the newest checkpoint).
    Here, before any rank trains: a run must not learn at its first save that it can't."""
    directory = config.checkpoint_dir
    if directory is not None:
        if not isinstance(directory, str | os.PathLike):
            raise ValueError(f"checkpoint_dir must be a folder's path, got {directory!r}")
        if config.checkpoint_every:
            checks.writable_folder(directory, "checkpoint_dir")
        elif Path(directory).exists() and not Path(directory).is_dir():
            raise ValueError(f"checkpoint_dir {directory} is a file: pass a folder")
    if not (isinstance(config.resume, bool) or config.resume == LATEST_VALID):
        raise ValueError(
            f"resume must be True, False or {LATEST_VALID!r} (the newest undamaged "
            f"checkpoint), got {config.resume!r}"
        )
    step = latest(config.checkpoint_dir) if config.resume is True else None
    if step is not None and step >= config.steps:
        raise ValueError(_nothing_to_train(config.checkpoint_dir, step, config.steps))


def load(
    strategy: Any,
    directory: str | Path,
    *,
    fallback: bool = False,
    steps: int | None = None,
    alone: bool = False,
) -> int:
    """Load the newest complete checkpoint into ``strategy``; the steps it had completed.

    Every rank calls it. Raises ``DamagedCheckpoint`` (on every rank) when a file differs
    from the manifest; with ``fallback`` loads the newest undamaged one instead. ``steps``:
    the run's total, which the checkpoint must be below; ``alone``: the run is one process.
    Returns 0 (and loads nothing) when ``directory`` holds no usable checkpoint.
    """
    step = _decided_by_rank0(alone, _choose, Path(directory), fallback)
    if step is None:
        return 0
    if steps is not None and step >= steps:
        raise ValueError(_nothing_to_train(directory, step, steps))
    state = _state(strategy)  # this strategy's tensors, in its sharding: DCP fills them in place
    _check_replicated(state, alone, saving=False)
    path = Path(directory) / f"step_{step:06d}"
    try:
        # The groups are this strategy's: another puts its parameters in other groups (tp
        # torch: DTensors apart from plain tensors; tp-sp's are all DTensors), and loading
        # the saved ones left a group without Adam's "betas" (KeyError at the first step).
        # Their settings are this run's config's, as when it starts afresh.
        groups = copy.deepcopy(state["optimizer"]["param_groups"])
        dcp.load(state, checkpoint_id=path, no_dist=not _in_group(alone))
        state["optimizer"]["param_groups"] = groups
        set_state_dict(
            strategy.module,
            strategy.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )
    except (Exception, CheckpointException) as exc:
        # DCP's message holds each rank's traceback: the last such line is the reason.
        found = [line for line in str(exc).splitlines() if MISMATCH.search(line)]
        if not found:
            raise
        why = found[-1].strip().removeprefix("RuntimeError: ").rstrip(".")
        raise ValueError(
            f"checkpoint {path} does not fit this model ({why}): it was saved "
            "by another model or model size. Resume with the settings it was saved with, or "
            "train into another checkpoint_dir"
        ) from None
    return step


def resume(strategy: Any, config: Any) -> int:
    """``load`` as ``config.resume`` asks (True, or ``"latest-valid"``); 0 when not resuming."""
    if not config.resume:
        return 0
    fallback = config.resume == LATEST_VALID
    return load(
        strategy,
        config.checkpoint_dir,
        fallback=fallback,
        steps=config.steps,
        alone=config.world_size == 1,
    )
