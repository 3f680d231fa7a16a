"""The processes pdlab starts, seen one way: ranks it spawns, torchrun nodes and the fork
server (``Spawned``), and ranks the fork server forks (``pdlab.control.forkserver.ForkedRank``).
Each answers ``exited()`` and ``exit_code(wait_s)`` without reaping itself, and ``end()``
ends it with everything it started (``launcher.stop`` asks no more of either)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

from pdlab.control.keeper import stat_fields


def waitid_code(info: os.waitid_result) -> int:
    """``Popen.returncode`` for a ``waitid`` result: the exit code, or minus the signal."""
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def main_thread_ended(pid: int) -> bool:
    """Whether process ``pid``'s main thread has exited (it is a zombie, its other threads maybe
    not yet). The process counts as exited only once all its threads have, which can be
    milliseconds after a SIGKILL on a busy machine; but a rank's main thread is the one that
    runs its calls, so a rank whose main thread ended runs no more. Ask only while ``pid`` is
    not reaped (else the PID may be another process's); False where there is no /proc."""
    try:
        return stat_fields(pid)[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


class Spawned:
    """A process started here in a session of its own (``start_new_session``): its PID is its
    process group's ID, which stays ours while any member lives. It is reaped only by
    ``end``, after its group is killed, so the ID can't be reused meanwhile."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def exited(self) -> bool:
        """Whether it has exited, without reaping it (its zombie keeps the group ID)."""
        if self.popen.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:  # reaped elsewhere
            return True
        return info is not None or main_thread_ended(self.pid)

    def exit_code(self, wait_s: float = 0.0) -> int | None:
        """Its exit code (minus the signal that ended it), or None if it still runs after
        ``wait_s`` seconds; without reaping it."""
        deadline = time.monotonic() + wait_s
        while self.popen.returncode is None:
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # reaped elsewhere: its code is lost
                return self.popen.returncode
            if info is not None:
                return waitid_code(info)
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        return self.popen.returncode

    def end(self) -> None:
        """Kill it and everything left in its process group, then reap it."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait()
