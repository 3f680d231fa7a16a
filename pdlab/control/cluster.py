"""The kernel's side: a persistent torch.distributed process group you drive from a notebook.

``Cluster(4)`` starts four ``python -m pdlab.control.worker`` processes that join one process group
and stay up; ``run(fn)`` ships ``fn`` (cloudpickled, so notebook functions and closures work)
to every rank and returns the results ordered by rank, printing each rank's output live as
``[rank r] ...``. Warm calls cost a loopback round trip, not a process start.

Where the rest lives: ``launcher.py`` starts rank processes (and writes torchrun commands),
``channel.py`` accepts and reads their connections, ``protocol.py`` defines the messages,
``output.py`` prints their output. This file holds the public API and the failure policy.

Failure policy, in one place (``_Call`` below): when a rank raises, dies or times out, the
others get a short grace period to finish. If they all do, and every process group's members
issued the same number of operations, the group is healthy and the cluster stays as it is
(namespaces too). If some are still running (typically blocked in a collective, waiting for
the rank that failed) or the ranks stopped at different collectives, the group cannot be
trusted any more: every rank is stopped, the error names the rank that failed first (not a
peer's "connection closed"), and the next ``run`` starts fresh ranks by itself (``restart()``
does it explicitly). Rank namespaces are lost then.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from pdlab import checks
from pdlab.control import launcher, protocol, warmup
from pdlab.control.asking import WHERE_S, Asker
from pdlab.control.channel import ControlServer, RankLink
from pdlab.control.launcher import choose_backend
from pdlab.control.output import RankOutput
from pdlab.control.processes import Spawned
from pdlab.measure.where import Locations

__all__ = ["CallTimeout", "Cluster", "ClusterStatus", "RankError", "choose_backend", "current"]

START_TIMEOUT_S = 120.0
GRACE_S = 1.0  # how long peers of a failed rank may take to finish before the group is reset
STOPPED_S = 2.0  # a rank stopped this long during a call fails it: its peers can only wait
LOOK_S = 0.25  # how often a call looks for ranks that died or stopped

_started: list[weakref.ref[Cluster]] = []  # clusters by start, oldest first


class RankError(RuntimeError):
    """A rank failed a call.

    ``rank`` is the rank blamed; ``exc_type`` the name of the exception it raised (None if it
    died); ``remote_traceback`` its traceback as text. When peers were left blocked or a rank
    died, ``where`` holds where each rank was (``pdlab.measure.where.Location``s), else None. The
    message holds all of it, and what happened to the other ranks.
    """

    def __init__(
        self,
        rank: int,
        message: str,
        exc_type: str | None = None,
        remote_traceback: str = "",
        where: Locations | None = None,
    ):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback
        self.where = where


class CallTimeout(TimeoutError):
    """A call's ranks did not all finish in time; ``.ranks`` are the ones still running,
    ``.where`` where every rank of the call was when time ran out."""

    def __init__(self, ranks: list[int], message: str, where: Locations | None = None):
        super().__init__(message)
        self.ranks = ranks
        self.where = where


def current() -> Cluster:
    """The most recently started cluster not shut down (what ``%%ranks`` runs on)."""
    for ref in reversed(_started):
        cluster = ref()
        if cluster is not None and cluster.state != "stopped":
            return cluster
    raise RuntimeError("no pdlab cluster is running: start one with %pdlab start N")


@dataclass
class ClusterStatus:
    """What ``Cluster.status()`` reports; prints as a small table."""

    world_size: int
    backend: str
    device: str
    state: str
    threads_per_rank: int
    ranks: list[RankLink]

    def __str__(self) -> str:
        lines = [
            f"pdlab cluster: {self.world_size} rank(s), backend={self.backend}, "
            f"device={self.device}, {self.threads_per_rank} thread(s)/rank, {self.state}"
        ]
        for r in self.ranks:
            alive = "alive" if r.alive else "down"
            lines.append(f"  rank {r.rank}: pid {r.pid} on {r.host} — {alive}")
        return "\n".join(lines)

    __repr__ = __str__


class _Resources:
    """What one start of a cluster holds, kept apart so a finalizer can release it all."""

    def __init__(self) -> None:
        self.links: list[RankLink] = []
        self.server: ControlServer | None = None
        self.local: launcher.LocalRanks | None = None
        self.nodes: list[subprocess.Popen] = []  # torchrun "nodes" started on this machine
        self.tmpdirs: list[str] = []

    def private_dir(self) -> str:
        """A private temp dir, removed by ``close``."""
        self.tmpdirs.append(launcher.private_dir())
        return self.tmpdirs[-1]

    def close(self, polite: bool = True) -> None:
        """Stop the ranks (asking first when ``polite``) and whatever they started, then the
        channel and the temp dirs."""
        for link in self.links:
            if polite and link.alive:
                link.send(protocol.Shutdown())
        deadline = time.monotonic() + (5.0 if polite else 0.0)
        for link in self.links:
            if link.process is not None:
                launcher.stop(link.process, deadline)
        for node in self.nodes:  # torchrun exits once its ranks have
            launcher.stop(node, deadline + (10.0 if polite else 0.0))
        if self.server is not None:
            self.server.close()
            self.server = None
        for tmpdir in self.tmpdirs:
            shutil.rmtree(tmpdir, ignore_errors=True)
        self.tmpdirs, self.nodes, self.links, self.local = [], [], [], None


class Cluster:
    """A persistent process group of ``world_size`` rank processes, driven from this kernel.

    Args:
        world_size: number of ranks (processes).
        backend: "gloo", "nccl", or None to choose (NCCL when each rank has a GPU).
        device: "cpu", "cuda", or None to choose.
        timeout: seconds a rank may wait for its peers in a collective before failing.
        attach: don't start ranks here; wait for ``world_size`` ranks started elsewhere
            (torchrun on other hosts, see ``attach_command``) to connect.
        host, port: where the control channel listens (loopback and a free port by default;
            attaching from other hosts needs an address they can reach).
        threads: CPU threads per rank (default: the cores shared evenly between ranks).
        keep_metrics: ``metrics`` keeps at least this many of the latest ``pdlab.log``
            records; older ones are dropped in batches (a long run streams one a step and
            rank; ``pdlab.train`` builds its result from the ranks' return values instead).
        prestart: fork the ranks from a fork server that has imported torch and the training
            stack (started after the kernel's first cluster, kept for the next), and let idle
            ranks import the training stack; False starts each rank as a new process that
            imports only what its calls need (see ``launcher``).
    """

    def __init__(
        self,
        world_size: int,
        backend: str | None = None,
        device: str | None = None,
        timeout: float = 300.0,
        *,
        attach: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        threads: int | None = None,
        keep_metrics: int = 20_000,
        prestart: bool = True,
    ):
        checks.whole(world_size, "world_size")
        if not attach:
            launcher.check_memory(world_size)
        timeout = checks.timeout(timeout, optional=False)  # gloo's and NCCL's need one
        if threads is not None:
            checks.whole(threads, "threads")
        checks.whole(keep_metrics, "keep_metrics")
        checks.whole(port, "port", least=0, most=65535)
        if not isinstance(host, str):
            raise ValueError(f"host must be an address as a string, e.g. '127.0.0.1', got {host!r}")
        gpus = 0 if device == "cpu" else launcher.visible_gpus()
        self.backend, self.device, note = choose_backend(world_size, backend, device, gpus)
        if note:
            warnings.warn(note, stacklevel=2)
        self.world_size = world_size
        self.timeout = timeout
        self.attach = attach
        self.host, self.requested_port, self.port = host, port, port
        self.threads = threads or max(1, (os.cpu_count() or 1) // world_size)
        self.metrics: list[dict[str, Any]] = []
        self.keep_metrics = keep_metrics
        self.prestart = prestart
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._calls = itertools.count(1)
        self._busy = threading.Lock()  # one call at a time: replies share one event queue
        self._asker = Asker()  # where() and the places a failed call reports
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close, False)
        self.state = "stopped"
        self._broken_reason: str | None = None
        self._start()

    # ----- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        # What this kernel's first pdlab.train and dashboard import, while the ranks start.
        warmup.in_kernel()
        self._token = secrets.token_hex(32).encode()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._output = RankOutput()
        self._workdirs: dict[int, tuple[str, list[str]]] = {}  # what each rank was last sent
        # Each rank's operations per process group when the ranks were last known in step.
        self._in_step_counts: dict[int, protocol.Counts] = {}
        res = self._resources
        res.links = [RankLink(r) for r in range(self.world_size)]
        # The control threads hold no reference to this Cluster, so one that a notebook
        # drops (re-running `cluster = pdlab.Cluster(2)`) is collected and its ranks stopped.
        publish = weakref.WeakMethod(self._publish)
        res.server = ControlServer(
            self.host, self.requested_port, self._token, res.links, self._events, publish
        )
        self.port = res.server.port
        self.state = "starting"
        _started[:] = [r for r in _started if r() not in (None, self)] + [weakref.ref(self)]
        if not self.attach:
            settings = launcher.RankSettings(
                self.world_size,
                self.backend,
                self.device,
                self.timeout,
                self.threads,
                self._token,
                self.prestart,
            )
            launcher.remove_stale_dirs()  # left by kernels killed before they could clean up
            res.local = launcher.LocalRanks(settings, self.port, res.private_dir())
            for link in res.links:
                link.process = res.local.spawn(link.rank)
            self._wait_ready()
            res.local.prestart_next()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        links = self._resources.links
        while not all(link.ready for link in links):
            try:
                rank, message = self._events.get(timeout=0.1)
            except queue.Empty:
                rank, message = -1, None
            if isinstance(message, protocol.Ready):
                links[rank].ready = True
                self._in_step_counts[rank] = message.counts
            elif isinstance(message, protocol.Output):
                self._output.write(rank, message.stream, message.text, message.at)
            elif isinstance(message, protocol.StartFailed):
                self._fail_start(
                    f"rank {rank} died while starting: it could not join the process group:\n"
                    + message.traceback
                )
            dead = next((r for r in links if r.process and r.process.exited()), None)
            if dead is not None:
                self._fail_start(
                    f"rank {dead.rank} died while starting ({dead.exit_reason()}). Its output:\n"
                    + self._resources.local.startup_log(dead.rank)
                )
            if time.monotonic() > deadline:
                waiting = [r.rank for r in links if not r.ready]
                self._fail_start(f"ranks {waiting} did not start within {START_TIMEOUT_S:.0f} s")
        self._output.flush()
        self.state = "running"

    def _fail_start(self, message: str) -> None:
        self._resources.close(polite=False)
        self.state = "stopped"
        raise RuntimeError(message)

    def restart(self) -> None:
        """Stop every rank and start fresh ones with the same settings."""
        if self.attach:
            raise RuntimeError(
                "attached ranks can't be restarted from the kernel: start them again with "
                "torchrun and create a new Cluster(attach=True)"
            )
        self._resources.close(polite=self.state == "running")
        self._broken_reason = None
        self._start()

    def shutdown(self) -> None:
        """Stop every rank and release the port and temp files. Safe to call twice."""
        self._resources.close(polite=self.state == "running")
        self.state = "stopped"

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def status(self) -> ClusterStatus:
        """Backend, device, state and every rank's process, as a printable table."""
        state = self.state
        if self._broken_reason:
            state = f"{state} (will restart on next run: {self._broken_reason})"
        return ClusterStatus(
            self.world_size,
            self.backend,
            self.device,
            state,
            self.threads,
            list(self._resources.links),
        )

    # ----- ranks on other hosts --------------------------------------------------------------

    def attach_command(self, nnodes: int = 2, nproc_per_node: int | None = None) -> str:
        """The torchrun command that starts this cluster's ranks on other hosts."""
        host = launcher.reachable_address(self.host)
        args = launcher.torchrun_args(
            self.world_size,
            nnodes,
            nproc_per_node,
            "HOST0:29400",
            f"{host}:{self.port}",
            self.backend,
            self.device,
        )
        return f"PDLAB_TOKEN={self._token.decode()} torchrun " + " ".join(args)

    def launch_local_nodes(self, nnodes: int = 2) -> list[subprocess.Popen]:
        """Start ``nnodes`` torchrun "nodes" on this machine that attach to this cluster.

        A rehearsal of a multi-host run over loopback: ``attach_command``'s command, with
        torchrun's rendezvous in a private file instead of a TCP store.
        """
        if not self.attach:
            raise RuntimeError("launch_local_nodes needs a Cluster(..., attach=True)")
        nodes = launcher.launch_local_nodes(
            self.world_size,
            nnodes,
            f"127.0.0.1:{self.port}",
            self.backend,
            self.device,
            self._token,
            self._resources.private_dir(),
        )
        self._resources.nodes += [Spawned(node) for node in nodes]
        return nodes

    # ----- metrics ---------------------------------------------------------------------------

    def _publish(self, rank: int, message: protocol.Metrics) -> None:
        try:
            record = cloudpickle.loads(message.record)
        except Exception as exc:  # the current call reports it; the record is dropped
            error = f"{type(exc).__name__}: {exc}"
            self._events.put(
                (rank, protocol.Undecodable("a pdlab.log record", message.types, error))
            )
            return
        self.metrics.append(record)
        if len(self.metrics) > 2 * self.keep_metrics:
            # In place, and a list, not a deque: a notebook may iterate while records arrive.
            del self.metrics[: -self.keep_metrics]
        for callback in list(self._subscribers):
            try:
                callback(record)
            except BaseException as exc:  # a broken plot must not break training, nor the
                # channel this runs on (a KeyboardInterrupt included: it is no one's Ctrl-C)
                print(
                    f"pdlab: metrics subscriber {callback!r} failed: {type(exc).__name__}: "
                    f"{exc} (the record was kept; fix or unsubscribe the callback)",
                    file=sys.stderr,
                )

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(record)`` for every ``pdlab.log`` record; returns an unsubscribe.
        What the callback raises is printed, never raised: records keep arriving."""
        if not callable(callback):
            raise TypeError(f"subscribe takes a function of one record, got {callback!r}")
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    # ----- calls -----------------------------------------------------------------------------

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        ranks: Sequence[int] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on ``ranks`` (all by default); results ordered by rank.

        Raises ``RankError`` if a rank raises or dies, ``CallTimeout`` if ranks are still
        running after ``timeout`` seconds.
        """
        try:
            payload = cloudpickle.dumps((fn, args, kwargs))
        except Exception as exc:
            raise TypeError(
                f"can't send {getattr(fn, '__name__', fn)!r} to the ranks: {exc}. Pass only "
                "picklable arguments (not open files, locks, sockets or generators) and create "
                "such objects inside the function."
            ) from exc
        return self._call("call", payload, ranks, timeout)

    def spawn(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> list[Any]:
        """Call ``fn(rank, *args)`` on every rank, as ``torch.multiprocessing.spawn`` would
        in fresh processes; the results ordered by rank. ``fn`` may set up and tear down the
        process group as spawned functions do: ``init_process_group`` finds the cluster's,
        ``destroy_process_group`` leaves it. What ``fn`` changes in the process (environment,
        torch's defaults, groups it made: ``pdlab.control.scripts``) is put back after."""
        return self.run(_with_rank, fn, args, timeout=timeout)

    def run_script(self, path: str | os.PathLike, *args: str, timeout: float | None = None) -> None:
        """Run the torchrun-style script at ``path`` with command-line ``args`` on every rank,
        as ``torchrun --nproc-per-node N path args...`` would, on these warm ranks.

        The script sees ``__name__ == "__main__"``, ``sys.argv == [path, *args]`` (the path as
        given), torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...), this
        kernel's working directory, its own folder first on ``sys.path``; its
        ``init_process_group`` uses the cluster's group, its ``destroy_process_group`` leaves
        it, ``mp.spawn(fn, args, nprocs=world size)`` calls ``fn(rank, *args)`` in place.
        Every module from its folder is imported afresh, and what it changes in the rank
        processes is put back after (``pdlab.control.scripts``). ``sys.exit(0)`` is success; another
        exit code raises ``RankError`` naming the rank.
        """
        from pdlab.control.scripts import run_script

        if not os.path.isfile(path):
            raise FileNotFoundError(f"no script at {os.path.abspath(path)}")
        with open(path, "rb") as f:
            if b"\0" in f.read(4096):
                raise ValueError(
                    f"{os.path.abspath(path)} is not a Python script (it holds binary data): "
                    "run_script runs Python files; start a program with subprocess inside "
                    "cluster.run instead"
                )
        self.run(run_script, os.fspath(path), [str(a) for a in args], timeout=timeout)

    def exec(
        self, source: str, ranks: Sequence[int] | None = None, timeout: float | None = None
    ) -> list[Any]:
        """Run Python ``source`` in each rank's persistent namespace (what ``%%ranks`` does).

        Returns the value of a final expression on each rank, like a notebook cell. The
        namespace's ``__name__`` is ``"__main__"``: a whole script pasted in runs its main block.
        """
        if not isinstance(source, str):
            raise TypeError(
                f"exec runs Python source given as a string, e.g. cluster.exec('x = 1'), got "
                f"{type(source).__name__}: to run a function, use cluster.run(fn)"
            )
        return self._call("exec", source, ranks, timeout)

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the code every rank is running (as the ■ button does).

        Safe from any thread: a dashboard's Stop button calls it while ``run`` waits.
        """
        for link in self._resources.links:
            link.send(protocol.Interrupt())

    def where(self, timeout: float = WHERE_S) -> Locations:
        """Where every rank is now: the op it waits in, else the line its code runs (and its
        innermost frames), and its recent ops; prints as one sentence and a line a rank.

        Safe from any thread while a call runs (a dashboard asks when a step is slow): the
        ranks answer from their reader threads and nothing is stopped.
        """
        self._ensure_started()
        return self._asker.places(self._resources, range(self.world_size), timeout)

    def profile(self, path: str | os.PathLike | None = None) -> Any:
        """torch.profiler on every rank, merged into one Chrome/Perfetto trace (``path``):
        ``with cluster.profile("run.json"): cluster.run(fn)``, or ``.start()`` and
        ``.stop()`` around ``%%ranks`` cells. See ``pdlab.measure.profiling``."""
        from pdlab.measure.profiling import Profile

        return Profile(self, path)

    def clock_offsets(self) -> dict[int, float]:
        """Seconds each rank's ``time.time()`` is ahead of this kernel's (0 on this machine;
        see ``pdlab.control.asking``)."""
        return self._asker.clock_offsets(self._resources, self.world_size)

    def _locate(self, ranks: Sequence[int]) -> Locations:
        places = self._asker.places(self._resources, ranks)
        for place in places:  # the counts at the call's start: "after op #57 (53 in this call)"
            issued = self._in_step_counts.get(place.rank, {})
            place.before = {place.groups.get(name, name): n for name, n in issued.items()}
        return places

    def _call(
        self, kind: str, payload: bytes | str, ranks: Sequence[int] | None, timeout: float | None
    ) -> list[Any]:
        timeout = checks.timeout(timeout)
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this cluster is already running a call (a dashboard run?): wait for it or "
                "stop it, then try again"
            )
        try:
            self._ensure_running()
            targets = self._check_ranks(ranks)
            call = _Call(self, next(self._calls), targets, timeout)
            workdir = (os.getcwd(), list(sys.path))

            def send(rank: int) -> None:
                # The kernel's working directory and sys.path, when they changed since the
                # rank last heard them: a rank's relative paths and imports work as here.
                heard, self._workdirs[rank] = self._workdirs.get(rank), workdir
                update = workdir if heard != workdir else None
                self._resources.links[rank].send(protocol.Call(call.call_id, kind, payload, update))

            try:
                return call.wait(send)
            finally:
                self._output.flush()
        finally:
            self._busy.release()

    def _ensure_started(self) -> None:
        if self.state == "stopped":
            raise RuntimeError(
                "this cluster was shut down: call .restart() or create a new pdlab.Cluster"
            )
        if self.attach and self.state == "starting":
            self._wait_ready()

    def _ensure_running(self) -> None:
        self._ensure_started()
        dead = [r.rank for r in self._resources.links if not r.alive]
        if self._broken_reason is None and dead:
            self._broken_reason = f"rank(s) {dead} died"
        if self._broken_reason is not None:
            if self.attach:
                raise RuntimeError(
                    f"the attached ranks are unusable ({self._broken_reason}): restart them "
                    "with torchrun and create a new Cluster(attach=True)"
                )
            print(f"pdlab: restarting the cluster ({self._broken_reason})", file=sys.stderr)
            self.restart()

    def _check_ranks(self, ranks: Sequence[int] | None) -> list[int]:
        if ranks is None:
            return list(range(self.world_size))
        if (
            not isinstance(ranks, Sequence | set)
            or isinstance(ranks, str | bytes)
            or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)
        ):
            raise ValueError(f"ranks must be a list of rank numbers, e.g. [0, 2], got {ranks!r}")
        if not ranks:
            raise ValueError("ranks is empty: name at least one rank, or pass None for all")
        bad = [r for r in ranks if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"no rank(s) {bad}: this cluster has ranks 0..{self.world_size - 1}")
        return sorted(set(ranks))

    # ----- the failure policy: is the group still in step? -----------------------------------

    def _settle(self, stuck: bool, reason: str, counts: dict[int, protocol.Counts]) -> str:
        """After a failed call, keep the group only if it is still in step; else stop every rank.

        Out of step: ranks still running (typically blocked in a collective), or members of a
        process group that issued different numbers of operations since the last good call
        (an async all-reduce one rank launched and its peer never did): their next collective
        would pair with the stale one and hang. ``counts`` are the replies' operation counts.
        Returns a sentence for the error message when the ranks were at different collectives.
        """
        skew = "" if stuck else self._skew(counts)
        if stuck or skew:
            self._reset(f"{reason}; ranks at different collectives" if skew else reason)
            return skew and (
                f"\nThe ranks stopped at different collectives (since the last good call, "
                f"{skew}), so their next collective would hang: the cluster restarts on the "
                "next run (rank namespaces are lost)."
            )
        self._in_step_counts.update(counts)
        return ""

    def _skew(self, counts: dict[int, protocol.Counts]) -> str:
        """Which process groups' members issued different numbers of operations since they were
        last known in step ('' if none). Point-to-point ops count too, so an uneven pipeline
        interrupted mid-schedule is reset as well, which it needs."""
        issued: dict[str, dict[int, int]] = {}
        for rank, now in sorted(counts.items()):
            before = self._in_step_counts.get(rank, {})
            for group, count in now.items():
                issued.setdefault(group, {})[rank] = count - before.get(group, 0)
        return "; ".join(
            f"group {group!r}: "
            + ", ".join(f"rank {r} issued {n} op(s)" for r, n in per_rank.items())
            for group, per_rank in issued.items()
            if len(set(per_rank.values())) > 1
        )

    def _reset(self, reason: str) -> None:
        """Stop every rank; the next run starts fresh ones."""
        for link in self._resources.links:
            link.send(protocol.Abort())
        self._resources.close(polite=False)
        self._mark_broken(reason)

    def _mark_broken(self, reason: str) -> None:
        """The group can't be used: ``status()`` says why, and the next call restarts it."""
        if self._broken_reason is None:
            self._broken_reason = reason
        self.state = "broken"


def _where_the_kernel_imports(traceback: str) -> str:
    """For a rank that can't import a module: where the kernel has it from, and the fix."""
    name = traceback.strip().splitlines()[-1].partition("No module named ")[2].strip("'\"")
    module = sys.modules.get(name) or sys.modules.get(name.partition(".")[0])
    where = getattr(module, "__file__", None)
    if not name or where is None:
        return ""
    return (
        f"\nThe kernel imports {name!r} from {where}. Ranks import from the kernel's working "
        "directory and sys.path (sent with each call); make that file reachable there (the "
        "same path on every host), or define what you need inside the function you run."
    )


def _with_rank(fn: Callable[..., Any], args: tuple) -> Any:
    from pdlab.control import runtime, scripts

    with scripts.as_its_own_process():  # spawned functions end with destroy_process_group()
        return fn(runtime.rank(), *args)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold a Ctrl-C that lands in the block until it ends, then raise it. Sending a rank
    the call and noting it pending must not be split: under load, the ranks had started
    and interrupted the kernel between the two, and it stopped waiting for the last rank,
    whose records then landed in the next call (CI). Only the main thread gets Ctrl-C."""
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(handler):
        yield
        return
    landed: list[Any] = []
    signal.signal(signal.SIGINT, lambda signum, frame: landed.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if landed:
            handler(signal.SIGINT, landed[0])


class _Call:
    """One call in flight: collects its results, output and failures, and decides what a
    failure means for the group (see the module docstring)."""

    def __init__(self, cluster: Cluster, call_id: int, ranks: list[int], timeout: float | None):
        self.cluster, self.call_id, self.ranks = cluster, call_id, ranks
        self.pending: set[int] = set()  # the ranks it was sent to that have not replied
        self.results: dict[int, Any] = {}
        self.counts: dict[int, protocol.Counts] = {}  # each reply's operations per group
        self.failures: list[protocol.Failure] = []
        # Values the kernel could not unpickle: the rank is fine and so is the group, so the
        # call runs to its end, then raises.
        self.undecodable: list[RankError] = []
        self.group_problems: dict[int, str] = {}  # ranks that left the process group unusable
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._stopped_since: dict[int, float] = {}
        # The first look a while in: a call ends in well under a millisecond, and reading
        # each rank's /proc entry to see it stopped cost more (a dead rank is seen before
        # the call: ``_ensure_running``).
        self._next_look = time.monotonic() + LOOK_S

    def wait(self, send: Callable[[int], None]) -> list[Any]:
        """``send(rank)`` the call to each rank, then the results by rank; raises RankError,
        CallTimeout or KeyboardInterrupt."""
        try:
            return self._wait(send)
        finally:
            if self.group_problems:  # the next call starts fresh ranks
                problem = next(iter(self.group_problems.values()))
                self.cluster._mark_broken(f"{problem} on rank(s) {sorted(self.group_problems)}")

    def _wait(self, send: Callable[[int], None]) -> list[Any]:
        try:
            # Sent inside the try: an interrupt that lands between two sends (CI, under load:
            # the first ranks had started) must stop the ranks that have the call too.
            with _interrupts_held():
                for rank in self.ranks:
                    send(rank)
                    self.pending.add(rank)
            while self.pending and not self.failures:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._timed_out()
                self._take(0.05)
                self.cluster._output.release()
                self._look_at_pending_ranks()
        except KeyboardInterrupt as interrupted:
            interrupted.where = self.cluster._locate(self.ranks)  # before the interrupt moves them
            print(f"pdlab: interrupted: {interrupted.where.summary()}", file=sys.stderr)
            self.cluster.interrupt()
            self._finish_within(GRACE_S * 3)
            self.cluster._settle(
                bool(self.pending), "interrupted while ranks were running", self.counts
            )
            raise
        if self.failures:
            self._failed()
        self.cluster._in_step_counts.update(self.counts)
        if self.undecodable:
            raise self.undecodable[0]
        return [self.results[r] for r in sorted(self.results)]

    def _take(self, block_s: float) -> None:
        try:
            rank, message = self.cluster._events.get(timeout=block_s)
        except queue.Empty:
            return
        if isinstance(message, protocol.Output):
            self.cluster._output.write(rank, message.stream, message.text, message.at)
        elif isinstance(message, protocol.Display | protocol.WidgetState):
            self.cluster._output.show(rank, message)
        elif isinstance(message, protocol.Undecodable):
            self._undecodable(rank, message.what, message.types, message.error)
        elif isinstance(message, protocol.Lost) and rank in self.pending:
            self._died(rank)
        elif isinstance(message, protocol.Result | protocol.Error) and (
            message.call_id == self.call_id
        ):
            self.pending.discard(rank)
            self.counts[rank] = message.counts
            if message.group_problem:
                self.group_problems[rank] = message.group_problem
            if isinstance(message, protocol.Result):
                try:
                    self.results[rank] = cloudpickle.loads(message.value)
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    self._undecodable(rank, "a return value", message.value_type, error)
            else:
                self.failures.append(
                    protocol.Failure(
                        rank,
                        protocol.blame_error(message.traceback),
                        f"rank {rank} raised {message.exc_type}",
                        message.exc_type,
                        message.traceback,
                    )
                )

    def _died(self, rank: int) -> None:
        self.pending.discard(rank)
        reason = self.cluster._resources.links[rank].exit_reason()
        self.failures.append(
            protocol.Failure(rank, protocol.Blame.DIED, f"rank {rank} died: {reason}")
        )

    def _look_at_pending_ranks(self) -> None:
        """Fail the call on a rank whose process has exited, even while its connection stays
        open (a child it forked holds the socket), and on a rank stopped for ``STOPPED_S``
        (SIGSTOP, a debugger): peers waiting for it in a collective would otherwise wait for
        the group's timeout (300 s) and then blame each other."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + LOOK_S
        for rank in sorted(self.pending):
            link = self.cluster._resources.links[rank]
            if link.process is not None and link.process.exited():
                self._died(rank)
                continue
            pid = link.pid
            if pid is None or not launcher.is_stopped(pid):
                self._stopped_since.pop(rank, None)
            elif now - self._stopped_since.setdefault(rank, now) >= STOPPED_S:
                self.pending.discard(rank)
                self.failures.append(
                    protocol.Failure(
                        rank,
                        protocol.Blame.STOPPED,
                        f"rank {rank} (pid {pid}) is stopped (SIGSTOP, Ctrl-Z or a debugger), "
                        "so its peers can only wait for it; it was ended with the others",
                    )
                )

    def _undecodable(self, rank: int, what: str, types: str, error: str) -> None:
        self.undecodable.append(
            RankError(
                rank,
                f"rank {rank} sent {what} ({types}) that the kernel can't unpickle: {error}.\n"
                "Send plain values (numbers, strings, lists, dicts, tensors), or define the "
                "class in a module the kernel imports too. The cluster is unaffected.",
                error.partition(":")[0],
            )
        )

    def _finish_within(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.pending and time.monotonic() < end:
            self._take(0.05)

    def _failed(self) -> None:
        # Peers of a dead rank often report first ("connection reset"); wait for the whole
        # story, then blame a death over an exception over a lost connection.
        self._finish_within(GRACE_S)
        first = min(self.failures, key=lambda f: f.blame)
        message = first.summary + (f":\n{first.traceback}" if first.traceback else "")
        if first.exc_type == "ModuleNotFoundError":
            message += _where_the_kernel_imports(first.traceback)
        others = [
            f"rank {f.rank}: {(f.traceback or f.summary).strip().splitlines()[-1]}"
            for f in self.failures
            if f is not first
        ]
        if others:
            message += "\nThe other failures of this call:\n  " + "\n  ".join(others)
        where = None
        died = any(f.blame is protocol.Blame.DIED for f in self.failures)
        if self.pending or died:  # peers blocked, or a death to explain: where was everyone?
            where = self.cluster._locate(self.ranks)
            ends = {f.rank: f"raised {f.exc_type}" for f in self.failures if f.exc_type}
            if self.pending:
                message += (
                    f"\nrank(s) {sorted(self.pending)} were still running: "
                    f"{where.summary(ends)}. They were stopped; the cluster restarts on the "
                    "next run (or call .restart())."
                )
            else:
                message += f"\nWhere the ranks were: {where.summary(ends)}."
        broken = bool(self.pending) or any(f.blame.breaks_group for f in self.failures)
        message += self.cluster._settle(broken, f"rank {first.rank} failed", self.counts)
        raise RankError(first.rank, message, first.exc_type, first.traceback, where)

    def _timed_out(self) -> None:
        running = sorted(self.pending)
        where = self.cluster._locate(self.ranks)  # before the interrupt moves them
        for rank in running:
            self.cluster._resources.links[rank].send(protocol.Interrupt())
        self._finish_within(GRACE_S * 3)
        stuck = bool(self.pending)
        skew = self.cluster._settle(stuck, f"a call timed out on ranks {running}", self.counts)
        raise CallTimeout(
            running,
            f"ranks {running} did not finish in time: {where.summary()}. They were interrupted"
            + (" and, stuck, stopped: the cluster restarts on the next run." if stuck else ".")
            + skew,
            where,
        )
