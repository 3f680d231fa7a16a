"""The kernel's side: a persistent torch.distributed process group you drive from a notebook.

``Cluster(4)`` starts four ``python -m pdlab.worker`` processes that join one process group
and stay up; ``run(fn)`` ships ``fn`` (cloudpickled, so notebook functions and closures work)
to every rank and returns the results ordered by rank, printing each rank's output live as
``[rank r] ...``. Warm calls cost a loopback round trip, not a process start.

Where the rest lives: ``launcher.py`` starts rank processes (and writes torchrun commands),
``control.py`` accepts and reads their connections, ``protocol.py`` defines the messages,
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

import itertools
import os
import queue
import secrets
import shutil
import subprocess
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from pdlab import launcher, protocol
from pdlab.control import ControlServer, RankLink
from pdlab.launcher import choose_backend
from pdlab.output import RankOutput

__all__ = ["CallTimeout", "Cluster", "ClusterStatus", "RankError", "choose_backend", "current"]

START_TIMEOUT_S = 120.0
GRACE_S = 1.0  # how long peers of a failed rank may take to finish before the group is reset
STOPPED_S = 2.0  # a rank stopped this long during a call fails it: its peers can only wait

_current: Cluster | None = None


class RankError(RuntimeError):
    """A rank failed a call.

    ``rank`` is the rank blamed; ``exc_type`` the name of the exception it raised (None if it
    died); ``remote_traceback`` its traceback as text. The message holds all of it, and what
    happened to the other ranks.
    """

    def __init__(
        self, rank: int, message: str, exc_type: str | None = None, remote_traceback: str = ""
    ):
        super().__init__(message)
        self.rank = rank
        self.exc_type = exc_type
        self.remote_traceback = remote_traceback


class CallTimeout(TimeoutError):
    """A call's ranks did not all finish in time; ``.ranks`` are the ones still running."""

    def __init__(self, ranks: list[int], message: str):
        super().__init__(message)
        self.ranks = ranks


def current() -> Cluster:
    """The most recently started cluster (what ``%%ranks`` runs on)."""
    if _current is None or _current.state == "stopped":
        raise RuntimeError("no pdlab cluster is running: start one with %pdlab start N")
    return _current


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
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a whole number >= 1, got {world_size!r}")
        if not attach:
            launcher.check_memory(world_size)
        if not (isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0):
            raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
        if threads is not None and (
            isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
        ):
            raise ValueError(f"threads must be a whole number >= 1 (or None), got {threads!r}")
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
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.close, False)
        self.state = "stopped"
        self._broken_reason: str | None = None
        self._start()

    # ----- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        global _current
        self._token = secrets.token_hex(32).encode()
        self._events: queue.Queue = queue.Queue()
        self._output = RankOutput()
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
        _current = self
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
                self._output.write(rank, message.stream, message.text)
            elif isinstance(message, protocol.StartFailed):
                self._fail_start(
                    f"rank {rank} died while starting: it could not join the process group:\n"
                    + message.traceback
                )
            dead = next((r for r in links if r.process and r.process.poll() is not None), None)
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
        global _current
        self._resources.close(polite=self.state == "running")
        self.state = "stopped"
        if _current is self:
            _current = None

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
        self._resources.nodes += nodes
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
            except Exception as exc:  # a broken plot must not break training
                print(f"pdlab: metrics subscriber {callback!r} failed: {exc}", file=sys.stderr)

    def subscribe(self, callback: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``callback(record)`` for every ``pdlab.log`` record; returns an unsubscribe."""
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

    def exec(self, source: str, ranks: Sequence[int] | None = None) -> list[Any]:
        """Run Python ``source`` in each rank's persistent namespace (what ``%%ranks`` does).

        Returns the value of a final expression on each rank, like a notebook cell.
        """
        return self._call("exec", source, ranks, None)

    def interrupt(self) -> None:
        """Raise KeyboardInterrupt in the code every rank is running (as the ■ button does).

        Safe from any thread: a dashboard's Stop button calls it while ``run`` waits.
        """
        for link in self._resources.links:
            link.send(protocol.Interrupt())

    def _call(
        self, kind: str, payload: bytes | str, ranks: Sequence[int] | None, timeout: float | None
    ) -> list[Any]:
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this cluster is already running a call (a dashboard run?): wait for it or "
                "stop it, then try again"
            )
        try:
            self._ensure_running()
            targets = self._check_ranks(ranks)
            call = _Call(self, next(self._calls), targets, timeout)
            for rank in targets:
                self._resources.links[rank].send(protocol.Call(call.call_id, kind, payload))
            try:
                return call.wait()
            finally:
                self._output.flush()
        finally:
            self._busy.release()

    def _ensure_running(self) -> None:
        if self.state == "stopped":
            raise RuntimeError(
                "this cluster was shut down: call .restart() or create a new pdlab.Cluster"
            )
        if self.attach and self.state == "starting":
            self._wait_ready()
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
        if isinstance(ranks, str | bytes) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks
        ):
            raise ValueError(f"ranks must be a list of rank numbers, e.g. [0, 2], got {ranks!r}")
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
        self._broken_reason = reason
        self.state = "broken"


class _Call:
    """One call in flight: collects its results, output and failures, and decides what a
    failure means for the group (see the module docstring)."""

    def __init__(self, cluster: Cluster, call_id: int, ranks: list[int], timeout: float | None):
        self.cluster, self.call_id = cluster, call_id
        self.pending = set(ranks)
        self.results: dict[int, Any] = {}
        self.counts: dict[int, protocol.Counts] = {}  # each reply's operations per group
        self.failures: list[protocol.Failure] = []
        # Values the kernel could not unpickle: the rank is fine and so is the group, so the
        # call runs to its end, then raises.
        self.undecodable: list[RankError] = []
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self._stopped_since: dict[int, float] = {}
        self._next_look = 0.0

    def wait(self) -> list[Any]:
        """The results by rank; raises RankError, CallTimeout or KeyboardInterrupt."""
        try:
            while self.pending and not self.failures:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    self._timed_out()
                self._take(0.05)
                self._look_for_stopped_ranks()
        except KeyboardInterrupt:
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
            self.cluster._output.write(rank, message.stream, message.text)
        elif isinstance(message, protocol.Undecodable):
            self._undecodable(rank, message.what, message.types, message.error)
        elif isinstance(message, protocol.Lost) and rank in self.pending:
            self.pending.discard(rank)
            reason = self.cluster._resources.links[rank].exit_reason()
            self.failures.append(
                protocol.Failure(rank, protocol.Blame.DIED, f"rank {rank} died: {reason}")
            )
        elif isinstance(message, protocol.Result | protocol.Error) and (
            message.call_id == self.call_id
        ):
            self.pending.discard(rank)
            self.counts[rank] = message.counts
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

    def _look_for_stopped_ranks(self) -> None:
        """Fail the call on a rank stopped for ``STOPPED_S`` (SIGSTOP, a debugger): peers
        waiting for it in a collective would otherwise wait for the group's timeout (300 s)
        and then blame each other."""
        now = time.monotonic()
        if now < self._next_look:
            return
        self._next_look = now + 0.25
        for rank in sorted(self.pending):
            pid = self.cluster._resources.links[rank].pid
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
        others = [
            f"rank {f.rank}: {(f.traceback or f.summary).splitlines()[-1]}"
            for f in self.failures
            if f is not first
        ]
        if others:
            message += "\nThe other failures of this call:\n  " + "\n  ".join(others)
        if self.pending:
            message += (
                f"\nrank(s) {sorted(self.pending)} were still running (likely waiting for "
                f"rank {first.rank} in a collective) and were stopped; the cluster restarts on "
                "the next run (or call .restart())."
            )
        broken = bool(self.pending) or any(f.blame.breaks_group for f in self.failures)
        message += self.cluster._settle(broken, f"rank {first.rank} failed", self.counts)
        raise RankError(first.rank, message, first.exc_type, first.traceback)

    def _timed_out(self) -> None:
        running = sorted(self.pending)
        for rank in running:
            self.cluster._resources.links[rank].send(protocol.Interrupt())
        self._finish_within(GRACE_S * 3)
        stuck = bool(self.pending)
        skew = self.cluster._settle(stuck, f"a call timed out on ranks {running}", self.counts)
        raise CallTimeout(
            running,
            f"ranks {running} did not finish in time; they were interrupted"
            + (" and, stuck, stopped: the cluster restarts on the next run." if stuck else ".")
            + skew,
        )
