"""A rank's keeper: the process that outlives it just long enough to end what it started.

A rank's parent-death signal kills the rank when the kernel dies (SIGKILL included), but not
what the rank started: a ``subprocess.Popen``, an ``os.fork()`` child, DataLoader workers
would be re-parented to init and live on. So every local rank starts as two processes
(``pdlab.control.worker`` calls ``split`` before anything heavy): the process the kernel or the fork
server started becomes the *keeper* and forks the rank itself.

The keeper is a child subreaper (``PR_SET_CHILD_SUBREAPER``): whatever the rank started that
is orphaned comes to it, not to init, however it detached (a new session, a double fork).
It waits for either end: its parent dies (the kernel, or the fork server, which dies with the
kernel), or the rank exits (killed, crashed, or told to stop). Either way it kills its
descendants, a generation at a time, until it has none, and exits as the rank did, so the
kernel reads the rank's exit code or signal off the keeper it started.

Linux only (prctl, pidfds); elsewhere ``split`` does nothing and the rank is the process
started, as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.5  # how often the keeper reaps orphans and looks at its parent without pidfds


def supported() -> bool:
    """Whether ranks get a keeper here: Linux with pidfds (5.3 and later)."""
    return sys.platform == "linux" and hasattr(os, "pidfd_open")


def prctl(option: int, value: int) -> bool:
    """Linux's prctl(option, value); False where it is missing or refused."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value) == 0
    except (OSError, AttributeError):
        return False


def split(parent_pid: int, title: list[str]) -> int:
    """Fork the rank; returns in the rank only, with the PID of the parent it must die with
    (its keeper; ``parent_pid`` where there is no keeper). This process becomes the keeper,
    shown as ``title`` in ``ps``, and exits as the rank did once the rank or ``parent_pid``
    is gone."""
    if not supported() or not prctl(PR_SET_CHILD_SUBREAPER, 1):
        return parent_pid
    parent = _pidfd(parent_pid)
    if parent is None:  # our parent is gone already: the rank is not wanted
        os._exit(1)
    rank = os.fork()
    if rank == 0:
        os.close(parent)
        return os.getppid()
    show_as(title)
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # ended only by its parent or its rank
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    os._exit(_keep(rank, parent))


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` if it is still our parent (a PID alone could be reused)."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return None
    if os.getppid() != pid:
        os.close(fd)
        return None
    return fd


def _keep(rank: int, parent: int) -> int:
    """Wait until the rank or the parent ends, end every descendant; the rank's exit code."""
    rank_fd = os.pidfd_open(rank)
    status = None
    while status is None:
        ready, _, _ = select.select([parent, rank_fd], [], [], POLL_S)
        if parent in ready:
            break
        status = _reap_orphans(rank)
    end_descendants()
    if status is None:
        return 1
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # die of the rank's signal, so the kernel reads the same cause
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's can't change
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        return 128 - code  # a signal whose default is not to end a process: the shell's code
    return code


def _reap_orphans(rank: int) -> int | None:
    """Reap exited children (orphans that came to us, or the rank); the rank's wait status
    once it has been reaped, else None. Its process group stays ours meanwhile: we lead it."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        if pid == 0:
            return None
        if pid == rank:
            return status


def end_descendants() -> None:
    """SIGKILL every child, reap it, and repeat for the grandchildren that come to us as
    orphans, until none is left. Only our own unreaped children are signalled, so no PID can
    have been reused meanwhile."""
    while True:
        for pid in children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def children() -> list[int]:
    """This process's children, from /proc: every process whose parent we are."""
    me, found = str(os.getpid()), []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if stat.read_text().rsplit(")", 1)[1].split()[1] == me:
                found.append(int(stat.parent.name))
    return found


def stat_fields(pid: int | str = "self") -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces and
    parentheses): ``[0]`` is the state, ``[11]``/``[12]`` user/system CPU ticks, ``[19]`` the
    start time. Raises OSError when there is no such process."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def show_as(words: list[str]) -> None:
    """Put ``words`` on this process's command line (``/proc/PID/cmdline``, ``ps``) instead
    of the one it started with (the fork server's, a rank's for its keeper), by rewriting
    the memory the kernel reads it from (as setproctitle does), within the room the first
    command line left; cut to fit."""
    fields = stat_fields()
    start, end = int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48 and 49
    room = end - start
    if ctypes.string_at(start, room) != Path("/proc/self/cmdline").read_bytes():
        return  # not where we expect it: leave it alone
    title = "\0".join(words).encode()[: room - 1]
    ctypes.memmove(start, title.ljust(room, b"\0"), room)
