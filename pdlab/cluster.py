"""The kernel's side: a persistent torch.distributed process group you drive from a notebook.

``Cluster(4)`` starts four ``python -m pdlab.worker`` processes that join one process group
and stay up; ``run(fn)`` ships ``fn`` (cloudpickled, so notebook functions and closures work)
to every rank and returns the results ordered by rank, printing each rank's output live as
``[rank r] ...``. Warm calls cost a loopback round trip, not a process start.

Failure policy, in one place: when a rank raises, dies or times out, the others get a short
grace period to finish. If they all do, and every process group's members issued the same
number of operations, the group is healthy and the cluster stays as it is (namespaces too).
If some are still running (typically blocked in a collective, waiting for the rank that
failed) or the ranks stopped at different collectives, the group cannot be trusted any more:
every rank is stopped, the error names the rank that failed first (not a peer's "connection
closed"), and the next ``run`` starts fresh ranks by itself (``restart()`` does it
explicitly). Rank namespaces are lost then.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import cloudpickle

BACKENDS = ("gloo", "nccl")
DEVICES = ("cpu", "cuda")
START_TIMEOUT_S = 120.0
GRACE_S = 1.0  # how long peers of a failed rank may take to finish before the group is reset

# Ranks are started from this one long-lived thread: Linux's parent-death signal fires when
# the *thread* that started a child exits, so a cluster built from a short-lived thread (a
# dashboard callback) must not be the parent thread of its ranks.
_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdlab-spawner")
_current: Cluster | None = None


class RankError(RuntimeError):
    """A rank failed: ``.rank`` is which, the message holds its remote traceback."""

    def __init__(self, rank: int, message: str):
        super().__init__(message)
        self.rank = rank


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


def choose_backend(
    world_size: int, backend: str | None, device: str | None, gpus: int
) -> tuple[str, str, str | None]:
    """Pick ``(backend, device, warning)`` for ``world_size`` ranks on a host with ``gpus``.

    NCCL when every rank has its own GPU; gloo with CUDA tensors when ranks must share GPUs
    (NCCL refuses two ranks on one GPU); gloo on CPU without GPUs.
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(
            f"unknown backend {backend!r}: use 'gloo' (CPU, or ranks sharing GPUs), "
            "'nccl' (one GPU per rank), or None to choose automatically"
        )
    if device not in (None, *DEVICES):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', or None for automatic")
    if device is None:
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' but no GPU is visible: use device='cpu' (gloo)")
    if backend == "nccl" and device == "cpu":
        raise ValueError("NCCL runs on GPUs only: use backend='gloo' for device='cpu'")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(
            f"NCCL needs one GPU per rank: world_size={world_size} but {gpus} GPU(s) visible. "
            f"Use world_size<={gpus}, or backend='gloo' so ranks share the GPU(s)"
        )
    if backend is None:
        backend = "nccl" if device == "cuda" and gpus >= world_size else "gloo"
    note = None
    if device == "cuda" and backend == "gloo" and gpus < world_size:
        note = (
            f"pdlab: {world_size} ranks share {gpus} GPU(s) over gloo with CUDA tensors "
            "(NCCL refuses two ranks on one GPU)"
        )
    return backend, device, note


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux), for GLOO_SOCKET_IFNAME."""
    import socket

    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


@dataclass
class RankInfo:
    """One rank as the kernel sees it."""

    rank: int
    pid: int | None = None
    host: str | None = None
    ready: bool = False
    process: subprocess.Popen | None = field(default=None, repr=False)
    conn: Connection | None = field(default=None, repr=False)
    lost: bool = False  # its connection ended (the only sign of life of an attached rank)
    send_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return self.conn is not None and not self.lost

    def send(self, *message: Any) -> None:
        """Send ``message`` to the rank, whole, from any thread; a closed rank is skipped."""
        if self.conn is not None:
            data = cloudpickle.dumps(message)
            with self.send_lock, contextlib.suppress(OSError):
                self.conn.send_bytes(data)

    def exit_reason(self) -> str:
        if self.process is None:
            return "its connection closed"
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(1)
        code = self.process.returncode
        if code is None:
            return "its connection closed"
        if code < 0:
            return f"it was killed by {signal.Signals(-code).name}"
        return f"it exited with code {code}"


@dataclass
class ClusterStatus:
    """What ``Cluster.status()`` reports; prints as a small table."""

    world_size: int
    backend: str
    device: str
    state: str
    threads_per_rank: int
    ranks: list[RankInfo]

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


class _Processes:
    """The resources a cluster must release; kept apart so a finalizer can reach them."""

    def __init__(self) -> None:
        self.ranks: list[RankInfo] = []
        self.listener: socket.socket | None = None
        self.tmpdir: str | None = None

    def close(self, polite: bool = True) -> None:
        for r in self.ranks:
            if polite and r.alive:
                r.send("shutdown", 0, None)
        deadline = time.monotonic() + (5.0 if polite else 0.0)
        for r in self.ranks:
            if r.process is None:
                continue
            with contextlib.suppress(subprocess.TimeoutExpired):
                r.process.wait(max(0.0, deadline - time.monotonic()))
            if r.process.poll() is None:
                r.process.kill()  # only our own children, by PID
                r.process.wait()
        for r in self.ranks:
            if r.conn is not None:
                r.conn.close()
        if self.listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                self.listener.shutdown(socket.SHUT_RDWR)
            self.listener.close()
            self.listener = None
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self.ranks = []


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
    ):
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a whole number >= 1, got {world_size!r}")
        gpus = 0 if device == "cpu" else _visible_gpus()
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
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._calls = itertools.count(1)
        self._busy = threading.Lock()  # one call at a time: replies share one event queue
        self._procs = _Processes()
        self._finalizer = weakref.finalize(self, self._procs.close, False)
        self.state = "stopped"
        self._broken_reason: str | None = None
        self._start()

    # ----- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        global _current
        self._token = secrets.token_hex(32).encode()
        self._events: queue.Queue = queue.Queue()
        self._partial: dict[tuple[int, str], str] = {}
        # Each rank's operations per process group when the ranks were last known in step.
        self._in_step_counts: dict[int, dict[str, int]] = {}
        procs = self._procs
        procs.ranks = [RankInfo(r) for r in range(self.world_size)]
        try:
            procs.listener = socket.create_server((self.host, self.requested_port))
        except OSError as exc:
            raise ValueError(
                f"can't listen on {self.host}:{self.requested_port} ({exc.strerror}): the port is busy "
                "or the address is not this machine's. Pass port=0 to pick a free port."
            ) from exc
        self.port = procs.listener.getsockname()[1]
        # The connection threads hold no reference to this Cluster, so one that a notebook
        # drops (re-running `cluster = pdlab.Cluster(2)`) is collected and its ranks stopped.
        publish = weakref.WeakMethod(self._publish)
        threading.Thread(
            target=_accept, args=(procs, self._token, self._events, publish), daemon=True
        ).start()
        self.state = "starting"
        _current = self
        if not self.attach:
            procs.tmpdir = tempfile.mkdtemp(prefix="pdlab-")  # mode 0700: private to us
            for r in procs.ranks:
                r.process = _spawner.submit(self._spawn, r.rank).result()
            self._wait_ready()

    def _spawn(self, rank: int) -> subprocess.Popen:
        import pdlab

        assert self._procs.tmpdir is not None
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(pdlab.__file__)))
        paths = [package_root, os.getcwd(), env.get("PYTHONPATH", "")]
        env.update(
            PDLAB_TOKEN=self._token.decode(),
            PYTHONPATH=os.pathsep.join(p for p in paths if p),
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=str(self.threads),
            LOCAL_RANK=str(rank),
        )
        if lo := _loopback_interface():
            env["GLOO_SOCKET_IFNAME"] = lo  # gloo binds the hostname's address otherwise
        log = open(os.path.join(self._procs.tmpdir, f"rank{rank}.log"), "wb")  # noqa: SIM115
        with log:
            # A new session: the terminal's or Jupyter's process-group signals don't reach
            # ranks directly; the kernel forwards interrupts itself.
            return subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pdlab.worker",
                    f"--connect=127.0.0.1:{self.port}",
                    f"--rank={rank}",
                    f"--world-size={self.world_size}",
                    f"--backend={self.backend}",
                    f"--device={self.device}",
                    f"--store={os.path.join(self._procs.tmpdir, 'store')}",
                    f"--timeout={self.timeout}",
                    f"--threads={self.threads}",
                    f"--parent-pid={os.getpid()}",
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _publish(self, record: dict[str, Any]) -> None:
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

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        ranks = self._procs.ranks
        while not all(r.ready for r in ranks):
            try:
                rank, kind, *rest = self._events.get(timeout=0.1)
            except queue.Empty:
                rank, kind, rest = -1, "", []
            if kind == "ready":
                ranks[rank].ready = True
                self._in_step_counts[rank] = rest[-1]
            elif kind == "out":
                self._print(rank, *rest)
            elif kind == "failed":
                self._fail_start(f"rank {rank} could not join the process group:\n{rest[0]}")
            dead = next((r for r in ranks if r.process and r.process.poll() is not None), None)
            if dead is not None:
                self._fail_start(self._startup_failure(dead))
            if time.monotonic() > deadline:
                waiting = [r.rank for r in ranks if not r.ready]
                self._fail_start(f"ranks {waiting} did not start within {START_TIMEOUT_S:.0f} s")
        self._flush_output()
        self.state = "running"

    def _startup_failure(self, info: RankInfo) -> str:
        assert self._procs.tmpdir is not None
        path = os.path.join(self._procs.tmpdir, f"rank{info.rank}.log")
        with open(path, errors="replace") as f:
            log = f.read().strip()
        return f"rank {info.rank} died while starting ({info.exit_reason()}). Its output:\n{log}"

    def _fail_start(self, message: str) -> None:
        self._procs.close(polite=False)
        self.state = "stopped"
        raise RuntimeError(message)

    def restart(self) -> None:
        """Stop every rank and start fresh ones with the same settings."""
        if self.attach:
            raise RuntimeError(
                "attached ranks can't be restarted from the kernel: start them again with "
                "torchrun and create a new Cluster(attach=True)"
            )
        self._procs.close(polite=self.state == "running")
        self._broken_reason = None
        self._start()

    def shutdown(self) -> None:
        """Stop every rank and release the port and temp files. Safe to call twice."""
        global _current
        self._procs.close(polite=self.state == "running")
        self.state = "stopped"
        if _current is self:
            _current = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def attach_command(self, nnodes: int = 2, nproc_per_node: int | None = None) -> str:
        """The torchrun command that starts this cluster's ranks on other hosts."""
        host = socket.getfqdn() if self.host in ("0.0.0.0", "::", "") else self.host
        args = self._torchrun_args(nnodes, nproc_per_node, "HOST0:29400", host)
        return f"PDLAB_TOKEN={self._token.decode()} torchrun " + " ".join(args)

    def _torchrun_args(
        self, nnodes: int, nproc_per_node: int | None, rendezvous: str, host: str
    ) -> list[str]:
        per_node = nproc_per_node or self.world_size // nnodes
        if per_node * nnodes != self.world_size:
            raise ValueError(
                f"{nnodes} node(s) x {per_node} rank(s) is not world_size {self.world_size}: "
                "pass nnodes and nproc_per_node whose product is the world size"
            )
        return [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous}",
            "-m",
            "pdlab.worker",
            f"--connect={host}:{self.port}",
            f"--backend={self.backend}",
            f"--device={self.device}",
        ]

    def launch_local_nodes(self, nnodes: int = 2) -> list[subprocess.Popen]:
        """Start ``nnodes`` torchrun "nodes" on this machine that attach to this cluster.

        A rehearsal of a multi-host run over loopback: the same command as
        ``attach_command``, with torchrun's rendezvous on a free local port.
        """
        if not self.attach:
            raise RuntimeError("launch_local_nodes needs a Cluster(..., attach=True)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rendezvous = f"127.0.0.1:{s.getsockname()[1]}"
        args = self._torchrun_args(nnodes, None, rendezvous, "127.0.0.1")
        env = {**os.environ, "PDLAB_TOKEN": self._token.decode()}
        return [
            _spawner.submit(
                subprocess.Popen,
                [sys.executable, "-m", "torch.distributed.run", *args],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ).result()
            for _ in range(nnodes)
        ]

    def status(self) -> ClusterStatus:
        """Backend, device, state and every rank's process, as a printable table."""
        state = self.state
        if self._broken_reason:
            state = f"{state} (will restart on next run: {self._broken_reason})"
        return ClusterStatus(
            self.world_size, self.backend, self.device, state, self.threads, self._procs.ranks
        )

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
        for r in self._procs.ranks:
            self._send(r.rank, "interrupt")

    def _ensure_running(self) -> None:
        if self.state == "stopped":
            raise RuntimeError(
                "this cluster was shut down: call .restart() or create a new pdlab.Cluster"
            )
        if self.attach and self.state == "starting":
            self._wait_ready()
        dead = [r.rank for r in self._procs.ranks if not r.alive]
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

    def _send(self, rank: int, *message: Any) -> None:
        self._procs.ranks[rank].send(*message)

    def _call(self, kind: str, payload: Any, ranks: Sequence[int] | None, timeout: float | None):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "this cluster is already running a call (a dashboard run?): wait for it or "
                "stop it, then try again"
            )
        try:
            return self._call_alone(kind, payload, ranks, timeout)
        finally:
            self._busy.release()

    def _call_alone(self, kind, payload, ranks, timeout) -> list[Any]:
        self._ensure_running()
        targets = self._check_ranks(ranks)
        call_id = next(self._calls)
        for r in targets:
            self._send(r, kind, call_id, payload)
        waiter = _CallWaiter(self, call_id, targets, timeout)
        try:
            results = waiter.wait()
            self._in_step_counts.update(waiter.counts)
        except KeyboardInterrupt:
            self.interrupt()
            waiter.finish_within(GRACE_S * 3)
            self._settle(waiter.pending, "interrupted while ranks were running", waiter.counts)
            raise
        finally:
            self._flush_output()
        return [results[r] for r in targets]

    def _check_ranks(self, ranks: Sequence[int] | None) -> list[int]:
        if ranks is None:
            return list(range(self.world_size))
        bad = [r for r in ranks if not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"no rank(s) {bad}: this cluster has ranks 0..{self.world_size - 1}")
        return sorted(set(ranks))

    def _settle(self, stuck: bool | set[int], reason: str, counts: dict[int, dict]) -> str:
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

    def _skew(self, counts: dict[int, dict[str, int]]) -> str:
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
        for r in self._procs.ranks:
            self._send(r.rank, "abort")
        self._procs.close(polite=False)
        self._broken_reason = reason
        self.state = "broken"

    # ----- output ----------------------------------------------------------------------------

    def _print(self, rank: int, stream: str, text: str) -> None:
        key = (rank, stream)
        *lines, self._partial[key] = (self._partial.get(key, "") + text).split("\n")
        out = sys.stderr if stream == "stderr" else sys.stdout
        for line in lines:
            print(f"[rank {rank}] {line}", file=out, flush=True)

    def _flush_output(self) -> None:
        for (rank, stream), rest in list(self._partial.items()):
            if rest:
                self._print(rank, stream, rest + "\n")


def _accept(procs: _Processes, token: bytes, events: queue.Queue, publish: Callable) -> None:
    listener = procs.listener
    while listener is not None:
        try:
            sock, _ = listener.accept()
        except OSError:  # listener closed: the cluster is shutting down
            return
        args = (sock, procs, token, events, publish)
        threading.Thread(target=_handshake, args=args, daemon=True).start()


def _handshake(sock: socket.socket, procs: _Processes, token: bytes, events, publish) -> None:
    """Mutual HMAC challenge first; a peer that fails it is dropped with nothing unpickled.

    Each handshake has its own thread, so a peer that never answers blocks only itself.
    """
    conn = Connection(sock.detach())
    try:
        deliver_challenge(conn, token)
        answer_challenge(conn, token)
        kind, rank, pid, host = cloudpickle.loads(conn.recv_bytes())
        info = procs.ranks[rank]
        if kind != "hello" or info.conn is not None:
            raise ValueError(f"unexpected {kind!r} from rank {rank}")
    except Exception:
        conn.close()
        return
    info.conn, info.pid, info.host = conn, pid, host
    try:
        while True:
            message = cloudpickle.loads(conn.recv_bytes())
            if message[0] != "metrics":
                events.put((rank, *message))
            elif (deliver := publish()) is not None:
                deliver(message[1])
    except BaseException:  # closed, or a stream we can no longer read: the rank is gone
        info.lost = True
        events.put((rank, "exit"))


# What a rank reports when a peer it was talking to vanished: a consequence, never the cause.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


class _CallWaiter:
    """Collects one call's results, output and failures from the event queue."""

    def __init__(self, cluster: Cluster, call_id: int, ranks: list[int], timeout: float | None):
        self.cluster, self.call_id = cluster, call_id
        self.pending = set(ranks)
        self.results: dict[int, Any] = {}
        self.counts: dict[int, dict[str, int]] = {}  # each reply's operations per process group
        self.failures: list[tuple[int, int, str]] = []  # (rank, how telling, message)
        self.deadline = None if timeout is None else time.monotonic() + timeout

    def _take(self, block_s: float) -> None:
        try:
            rank, kind, *rest = self.cluster._events.get(timeout=block_s)
        except queue.Empty:
            return
        if kind == "out":
            self.cluster._print(rank, *rest)
        elif kind == "exit" and rank in self.pending:
            reason = self.cluster._procs.ranks[rank].exit_reason()
            self.pending.discard(rank)
            self.failures.append((rank, 0, f"rank {rank} died: {reason}"))
        elif kind in ("result", "error") and rest[0] == self.call_id:
            self.pending.discard(rank)
            self.counts[rank] = rest[-1]
            if kind == "result":
                self.results[rank] = cloudpickle.loads(rest[1])
            else:
                consequence = any(s in rest[2] for s in _PEER_LOST)
                self.failures.append(
                    (rank, 1 + consequence, f"rank {rank} raised {rest[1]}:\n{rest[2]}")
                )

    def finish_within(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while self.pending and time.monotonic() < end:
            self._take(0.05)

    def wait(self) -> dict[int, Any]:
        while self.pending and not self.failures:
            if self.deadline is not None and time.monotonic() > self.deadline:
                return self._timed_out()
            self._take(0.05)
        if not self.failures:
            return self.results
        # Peers of a dead rank often report first ("connection reset"); wait for the whole
        # story, then blame a death over an exception over a lost connection.
        self.finish_within(GRACE_S)
        rank, _, message = min(self.failures, key=lambda f: f[1])
        others = [f"rank {r}: {m.splitlines()[-1]}" for r, _, m in self.failures if r != rank]
        if others:
            message += "\nThe other failures of this call:\n  " + "\n  ".join(others)
        if self.pending:
            message += (
                f"\nrank(s) {sorted(self.pending)} were still running (likely waiting for "
                f"rank {rank} in a collective) and were stopped; the cluster restarts on "
                "the next run (or call .restart())."
            )
        # A death or a lost connection leaves the group unusable even when no rank is running.
        lost = any(how != 1 for _, how, _ in self.failures)
        message += self.cluster._settle(self.pending or lost, f"rank {rank} failed", self.counts)
        raise RankError(rank, message)

    def _timed_out(self) -> dict[int, Any]:
        running = sorted(self.pending)
        for r in running:
            self.cluster._send(r, "interrupt")
        self.finish_within(GRACE_S * 3)
        stuck = bool(self.pending)
        skew = self.cluster._settle(
            self.pending, f"a call timed out on ranks {running}", self.counts
        )
        raise CallTimeout(
            running,
            f"ranks {running} did not finish in time; they were interrupted"
            + (" and, stuck, stopped: the cluster restarts on the next run." if stuck else ".")
            + skew,
        )
