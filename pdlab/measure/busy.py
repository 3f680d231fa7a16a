"""How long a thread computed: the seconds it ran or was ready to run, not the ones it slept.

A rank waiting for communication sleeps (gloo and pdlab's link emulation block on a
condition variable); a rank computing runs, or waits for a core while other processes hold
them. So "running or runnable" time is a rank's compute in wall-clock seconds, contention
included, and the rest of its step is time blocked on communication. ``pdlab.measure.comm`` stamps
every op with the issuing thread's busy seconds so far; ``pdlab.predict`` replays the
compute between ops with other communication costs.

On Linux: the thread's CPU clock (exact, ``pthread_getcpuclockid``) plus the time it spent
waiting on a run queue (``run_delay``, the second field of /proc/<pid>/task/<tid>/schedstat;
the kernel's Documentation/scheduler/sched-stats.rst). Elsewhere: CPU time alone, which
undercounts when the cores are shared. On CUDA a thread waiting for the GPU spins or yields,
so that counts as compute too.
"""

from __future__ import annotations

import os
import threading
import time


class BusyClock:
    """``clock()``: busy seconds of one thread (the caller's by default) since the clock was made.

    Any thread may read it; ``close()`` releases the file it reads.
    """

    def __init__(self, thread: threading.Thread | None = None) -> None:
        thread = thread or threading.current_thread()
        self._cpu = time.pthread_getcpuclockid(thread.ident)
        # A forked process's main thread keeps its parent's ``native_id`` (CPython 3.11 does
        # not update it after a fork; a fork server's ranks are such threads): ask the kernel.
        tid = threading.get_native_id() if thread is threading.current_thread() else thread.native_id  # fmt: skip
        self._schedstat: int | None = None
        if os.path.exists("/proc/thread-self/schedstat"):  # Linux with scheduler statistics
            # No fallback here: CPU time alone would silently drop the waits for a core.
            self._schedstat = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
        self._zero = 0.0
        self._zero = self()

    def __call__(self) -> float:
        busy = time.clock_gettime(self._cpu)
        if self._schedstat is not None:
            busy += int(os.pread(self._schedstat, 128, 0).split()[1]) * 1e-9
        return busy - self._zero

    def close(self) -> None:
        if self._schedstat is not None:
            os.close(self._schedstat)
            self._schedstat = None
