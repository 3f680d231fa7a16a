"""A process that imports torch once and forks fresh ranks from it (Linux).

A rank started as a new process pays for ``import torch`` (1.3-2.5 s here) before it can join
a group, and its first training run for the training stack (``pdlab.control.warmup``, ~2.5 s more).
The fork server pays both once a kernel: ``python -m pdlab.control.forkserver`` imports torch, tells
the kernel it can fork, then imports the training stack between requests. A rank forked from
it is born with all of that loaded, as with ``multiprocessing``'s forkserver and its preload.
``launcher.LocalRanks`` asks it for ranks; ``Cluster(..., prestart=False)`` doesn't.

What makes a forked rank the same clean process a spawned ``python -m pdlab.control.worker`` is:

- Fork safety: the server starts no thread and computes nothing (no OpenMP pool, no CUDA).
  Before each fork it checks that it still runs only the threads ``import torch`` left
  (numpy's OpenBLAS pool, which stops itself around a fork with ``pthread_atfork``) and that
  CUDA's driver is not loaded; otherwise it refuses, and the rank is spawned instead.
- The child becomes the rank a spawn would make (``_become_rank``): a session and process
  group of its own, stdin from /dev/null, output into the rank's log, the rank's environment
  and working directory (the server only serves ranks whose environment, apart from what
  differs per rank, is the one it imported torch with), torch's and numpy's global
  generators seeded afresh from the OS as a new process's are (Python's ``random`` reseeds
  itself after a fork), and ``pdlab.control.worker --rank=R`` on its command line, for ``ps`` and
  the tests. What can't be redone is Python's string hash seed: forked ranks share the
  server's, so sets of strings iterate in the same order on every rank.
- Death travels kernel -> server -> ranks: the server arms the parent-death signal against
  the kernel before importing anything heavy, and exits when the kernel's end of its socket
  closes or its parent changes; each rank arms its own against the server, as spawned ranks
  do against the kernel.
- Reaping stays safe: the server leaves an exited rank unreaped (a zombie keeps its PID and
  process group ID from being reused), reports its exit status, and on the kernel's word
  kills what is left of the rank's process group and reaps it: ``launcher.stop``'s job for a
  spawned rank, done by the only process that may wait for this one.

Kernel and server talk over a socketpair the kernel made: nothing listens anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import queue
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import warnings
import weakref
from multiprocessing.connection import Connection
from pathlib import Path

from pdlab.control import processes, warmup, worker
from pdlab.control.keeper import show_as
from pdlab.control.processes import Spawned


def supported() -> bool:
    """Whether this system can run a fork server: Linux with pidfds (5.3 and later)."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


# Variables that change while a process runs, read by no import: pytest names the test it
# is running in PYTEST_CURRENT_TEST.
CHANGING = {"PYTEST_CURRENT_TEST"}


class ForkRefused(RuntimeError):
    """The fork server can't fork now (it exited, or forking would be unsafe): spawn instead."""


class ForkedRank:
    """A rank the fork server forked, with the part of ``subprocess.Popen`` pdlab uses.

    ``returncode`` is set when the server reports the exit (the rank is a zombie until
    ``end``), as ``processes.Spawned`` sees a spawned rank.
    """

    def __init__(self, pid: int, server: ForkServer):
        self.pid = pid
        self.returncode: int | None = None
        self._server = server
        self._exit = threading.Event()
        self._reaped = threading.Event()
        self._ending = threading.Lock()
        # The kernel's own sign of the exit: a server killed with its ranks reports nothing,
        # and a call sent before its connection's end is read would meet dead ranks.
        try:
            self._pidfd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:  # gone already
            self._pidfd = None
        else:
            weakref.finalize(self, os.close, self._pidfd)

    def poll(self) -> int | None:
        return self.returncode

    def exited(self) -> bool:
        """Whether the process has ended, reported by the server yet or not."""
        if self.returncode is not None or self._pidfd is None:
            return True
        if select.select([self._pidfd], [], [], 0)[0]:  # readable once all its threads exited
            return True
        return processes.main_thread_ended(self.pid)  # not readable: the PID is still its own

    def wait(self, timeout: float | None = None) -> int:
        if not self._exit.wait(timeout):
            raise subprocess.TimeoutExpired(f"rank pid {self.pid}", timeout or 0)
        return self.returncode

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """Its exit code (minus a signal), as the server reports it; None if it still runs
        after ``wait_s`` seconds."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(wait_s)
        return self.returncode

    def end(self) -> None:
        """Kill what is left of its process group and have it reaped; returns once it is."""
        with self._ending:  # asked once: the server reaps it once
            if not self._reaped.is_set():
                self._server.send(("end", self.pid))
                self._reaped.wait()

    def _exited(self, returncode: int) -> None:
        if self.returncode is None:
            self.returncode = returncode
        self._exit.set()

    def _ended(self, returncode: int) -> None:
        self._exited(returncode)
        self._reaped.set()


class ForkServer:
    """The kernel's side of one fork server process.

    Create it from a thread that lives as long as the kernel (``launcher``'s spawner): the
    server's parent-death signal fires when the thread that started it exits.
    """

    def __init__(self, env: dict[str, str]):
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = Spawned(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pdlab.control.forkserver",
                        f"--fd={theirs.fileno()}",
                        f"--parent-pid={os.getpid()}",
                    ],
                    env=env,
                    pass_fds=[theirs.fileno()],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,  # the terminal's and Jupyter's signals stay away
                )
            )
        self.pid = self.process.pid
        self.env = env  # the environment it started with
        self.imported_env = env  # its environment after its imports (some set variables)
        self.ready = threading.Event()  # it has imported torch: it can fork
        self.warm = threading.Event()  # it has imported the training stack too
        self._socket = ours
        self._conn = Connection(os.dup(ours.fileno()))
        self._send_lock = threading.Lock()
        self._fork_lock = threading.Lock()  # one fork in flight: its reply is the next one
        self._replies: queue.Queue = queue.Queue()
        self.ranks: dict[int, ForkedRank] = {}  # forked, not yet reaped
        self.gone = False
        threading.Thread(target=self._read, daemon=True, name="pdlab-fork-server").start()

    def serves(self, env: dict[str, str]) -> bool:
        """Whether ranks starting from ``env`` see what this server's imports saw: the
        same environment, except for variables those imports set themselves (torch sets
        ``TORCHINDUCTOR_CACHE_DIR``), which ``env`` may lack or agree with, and those in
        ``CHANGING``. A forked rank gets ``env`` whole either way."""
        for name in (env.keys() | self.env.keys()) - CHANGING:
            value, imported = env.get(name), self.imported_env.get(name)
            set_by_imports = self.env.get(name) != imported
            if value != self.env.get(name) and not (set_by_imports and value in (None, imported)):
                return False
        return True

    def fork(self, args: list[str], env: dict[str, str], cwd: str, log: str) -> ForkedRank:
        """A new rank running ``pdlab.control.worker.main(args)`` with ``env`` in ``cwd``, its output
        in the file ``log``. Raises ``ForkRefused`` when the server can't fork it."""
        with self._fork_lock:
            if self.gone or not self.ready.is_set():
                raise ForkRefused("the fork server is not ready")
            self.send(("fork", args, env, cwd, log))
            kind, value = self._replies.get()
        if kind == "refused":
            raise ForkRefused(value)
        return value

    def send(self, message: tuple) -> None:
        with self._send_lock, contextlib.suppress(OSError):  # gone: ``_read`` tidies up
            self._conn.send(message)

    def close(self) -> None:
        """Tell the server to exit (its ranks die with it); ``launcher`` reaps it."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)  # wakes ``_read`` too

    def _read(self) -> None:
        try:
            while True:
                kind, *values = self._conn.recv()
                if kind in ("ready", "warm"):
                    self.imported_env = values[0]
                    (self.ready if kind == "ready" else self.warm).set()
                elif kind == "forked":
                    self.ranks[values[0]] = rank = ForkedRank(values[0], self)
                    self._replies.put((kind, rank))
                elif kind == "refused":
                    self._replies.put((kind, values[0]))
                elif kind == "exited":
                    self.ranks[values[0]]._exited(values[1])
                elif kind == "ended":
                    self.ranks.pop(values[0])._ended(values[1])
        except (EOFError, OSError):
            pass
        self.gone = True
        self.ready.clear()
        self.warm.clear()
        self._replies.put(("refused", "the fork server exited"))
        for rank in self.ranks.values():  # killed by their parent-death signal
            rank._ended(-signal.SIGKILL)
        self.ranks.clear()
        self._conn.close()
        self._socket.close()


# ---- the server process --------------------------------------------------------------------


def native_threads() -> int:
    """How many threads this process runs, native ones included."""
    return len(os.listdir("/proc/self/task"))


def fork_hazard(threads_after_import: int) -> str:
    """Why forking now would be unsafe ('' if it is safe): a thread started since ``import
    torch`` (an OpenMP or gloo pool, a Python thread) could hold a lock the child inherits
    held; CUDA can't be used in a child once the parent initialised it."""
    import torch

    now = native_threads()
    if now > threads_after_import or threading.active_count() > 1:
        return (
            f"the fork server runs {now} threads, {threads_after_import} after import torch: "
            "a child could inherit a lock one of them holds"
        )
    if torch.cuda.is_initialized() or cuda_driver_loaded():
        return "the fork server loaded CUDA's driver, which a forked child can't use"
    return ""


def cuda_driver_loaded() -> bool:
    """Whether CUDA's driver library is mapped into this process: something called into it
    (``torch.cuda.is_available()`` does), and a forked child could not initialise CUDA."""
    return "/libcuda.so" in Path("/proc/self/maps").read_text()


class _Server:
    """The server's loop: forks on request, preloads while idle, reports and reaps exits."""

    def __init__(self, conn: Connection, kernel_pid: int, threads_after_import: int):
        self.conn, self.kernel_pid = conn, kernel_pid
        self.threads_after_import = threads_after_import
        self.selector = selectors.DefaultSelector()
        self.selector.register(conn.fileno(), selectors.EVENT_READ)
        self.children: set[int] = set()  # forked, not yet reaped
        self.pidfds: dict[int, int] = {}  # rank pid -> pidfd, until its exit is reported

    def serve(self) -> tuple:
        """Answer the kernel until it goes (then exit); returns only in a forked child, with
        the request that made it."""
        preload = warmup.modules()
        preloading = True
        try:
            while os.getppid() == self.kernel_pid:
                events = self.selector.select(0 if preloading else worker.HEARTBEAT_S)
                if not events and preloading:
                    name = next(preload, None)
                    preloading = name is not None
                    if preloading:
                        warmup.load(name)
                    else:
                        self.conn.send(("warm", dict(os.environ)))
                for key, _ in events:
                    if key.data is None:
                        request = self._answer()
                        if request is not None:
                            return request
                    else:
                        self._report_exit(key.data)
            sys.exit(0)  # the kernel died: the parent-death signal may still be on its way
        finally:  # in the server as it exits, and in each child: its copies are not its own
            for fd in self.pidfds.values():
                os.close(fd)
            self.selector.close()
            self.conn.close()

    def _answer(self) -> tuple | None:
        try:
            kind, *values = self.conn.recv()
        except EOFError:
            sys.exit(0)  # the kernel is done with us, or gone
        if kind == "fork":
            return self._fork(values)
        if kind == "end":
            self._end(values[0])
        return None

    def _fork(self, request: list) -> tuple | None:
        problem = fork_hazard(self.threads_after_import)
        if problem:
            self.conn.send(("refused", problem))
            return None
        # What the child inherits, its collector never walks: pages stay shared, and its
        # collections (and its exit) skip the ~million objects of torch and the stack.
        gc.freeze()
        with warnings.catch_warnings():
            # Python 3.12+ warns on fork() with threads running: ours are OpenBLAS's, which
            # stops them around a fork (``fork_hazard`` refused any other).
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:
            return tuple(request)
        self.children.add(pid)
        self.pidfds[pid] = os.pidfd_open(pid)  # readable once the child exits
        self.selector.register(self.pidfds[pid], selectors.EVENT_READ, pid)
        self.conn.send(("forked", pid))
        return None

    def _report_exit(self, pid: int) -> None:
        if pid not in self.pidfds:
            return  # ended by a request answered in the same round
        self.selector.unregister(self.pidfds[pid])
        os.close(self.pidfds.pop(pid))
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)  # not reaped
        self.conn.send(("exited", pid, processes.waitid_code(info)))

    def _end(self, pid: int) -> None:
        if pid not in self.children:
            return  # reaped already: its PID may be someone else's now
        self.children.discard(pid)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)  # the group's ID is ours while the zombie is
        _, status = os.waitpid(pid, 0)
        if pid in self.pidfds:
            self.selector.unregister(self.pidfds[pid])
            os.close(self.pidfds.pop(pid))
        self.conn.send(("ended", pid, os.waitstatus_to_exitcode(status)))


def _become_rank(
    start_env: dict[str, str], args: list[str], env: dict[str, str], cwd: str, log: str
) -> None:
    """In a forked child: turn into the rank ``python -m pdlab.control.worker ARGS`` would be.

    ``start_env`` is the server's environment before its imports: what they set stays,
    unless ``env`` (the rank's) sets it too, as if the rank had imported them itself.
    """
    os.setsid()  # a process group of its own, which ``launcher.stop`` ends as a whole
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    os.chdir(cwd)
    imported = {k: v for k, v in os.environ.items() if start_env.get(k) != v}
    os.environ.clear()
    os.environ.update({**imported, **env})
    sys.argv = [worker.__file__, *args]
    _reseed()
    show_as(
        ["pdlab.control.worker", *(a for a in args if a.startswith(("--rank=", "--parent-pid=")))]
    )
    worker.main(args)


def _reseed() -> None:
    """Seed torch's and numpy's global generators from the OS, as a new process does; every
    rank would otherwise draw the server's numbers (Python's ``random`` reseeds itself).
    CUDA's generators seed themselves when the rank first uses CUDA."""
    import torch

    torch.random.default_generator.seed()
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdlab.control.forkserver", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="the socket to the kernel")
    parser.add_argument("--parent-pid", type=int, required=True, help="the kernel's PID")
    args = parser.parse_args(argv)
    worker.set_parent_death_signal(args.parent_pid)
    start_env = dict(os.environ)
    conn = Connection(args.fd)
    import torch.distributed  # noqa: F401  (what every rank needs before it can start)

    server = _Server(conn, args.parent_pid, native_threads())
    conn.send(("ready", dict(os.environ)))
    _become_rank(start_env, *server.serve())


if __name__ == "__main__":
    main()
