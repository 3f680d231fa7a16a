"""How the kernel's Ctrl-C (an ``Interrupt`` message) becomes a KeyboardInterrupt in the code a
rank runs, and only there.

The reader thread owes the main thread one interrupt (``Interrupts.request``) and sends it a
SIGINT, which also wakes a blocking call (EINTR). The handler raises only while a call runs
and only what is owed: a late SIGINT must not tear a reply mid-send, kill the rank between
calls, or land a second time in the ``except KeyboardInterrupt`` of the code it stopped.

Python drops what a finalizer raises (a ``__del__``, a weakref callback: "Exception ignored
in"): lab 05's Stop once landed in pdlab.measure.memory's finalizer and the rank trained on.
Such a swallowed interrupt reaches ``sys.unraisablehook``, which raises it again in the frame
the finalizer interrupted, at that frame's next line (``raise_when_it_resumes``). That frame
may instead go on into a blocking C call (a finalizer run from C, then ``time.sleep``): so
until the interrupt is raised somewhere it is not swallowed, SIGINT is sent again every
``RESEND_S``, as Go's runtime re-signals a thread it must preempt.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

RESEND_S = 0.1


class Interrupts:
    """A rank's interrupts: ``install`` once, on the main thread; ``request`` from the reader;
    ``call_started`` and ``call_over`` around each call's user code."""

    def __init__(self) -> None:
        self.running = threading.Event()  # a call's user code runs: it may be interrupted
        self._owed = threading.Event()
        # Request, raise, resend and a call's end in turn: nothing owed outlives its call.
        self._lock = threading.RLock()
        self._main = threading.main_thread().ident

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        previous_hook = sys.unraisablehook

        def on_unraisable(unraisable: Any) -> None:
            if isinstance(unraisable.exc_value, KeyboardInterrupt) and self._is_ours():
                # sys._getframe(1): the frame the finalizer ran in (its own frame is gone).
                raise_when_it_resumes(sys._getframe(1), self._owed.clear)
                self._owed.set()  # and sent again, in case that frame blocks first
            else:
                previous_hook(unraisable)

        sys.unraisablehook = on_unraisable
        threading.Thread(target=self._resend, daemon=True, name="pdlab-interrupts").start()

    def request(self) -> None:
        """The kernel asked: interrupt the call running now, if any."""
        with self._lock:
            if self.running.is_set():
                self._owed.set()
                signal.pthread_kill(self._main, signal.SIGINT)

    def call_started(self) -> None:
        self.running.set()

    def call_over(self) -> None:
        """Nothing is owed after a call; a raise still waiting for a frame to resume is
        dropped, and the trace functions it replaced are put back."""
        with self._lock:
            self.running.clear()
            self._owed.clear()
            cancel_pending_interrupt()

    def _is_ours(self) -> bool:
        return threading.get_ident() == self._main and self.running.is_set()

    def _on_sigint(self, signum: int, frame: Any) -> None:
        with self._lock:
            if not (self._owed.is_set() and self.running.is_set()):
                return  # a resend that crossed the raise, or no call to interrupt
            self._owed.clear()
            cancel_pending_interrupt()  # raised here instead
        raise KeyboardInterrupt

    def _resend(self) -> None:
        while self._owed.wait():
            time.sleep(RESEND_S)
            with self._lock:
                if self._owed.is_set():
                    signal.pthread_kill(self._main, signal.SIGINT)


_pending: list[Callable[[], None]] = []  # puts back what a waiting raise_when_it_resumes replaced


def raise_when_it_resumes(frame: Any, on_raise: Callable[[], None]) -> None:
    """Raise KeyboardInterrupt in ``frame`` at its next line or return (calling ``on_raise``
    first): a trace function may raise into the frame it traces. Python then unsets the
    thread's trace function, so the user's own (a debugger's, coverage's) is put back when the
    call ends (``cancel_pending_interrupt``), and ``frame``'s at once."""
    cancel_pending_interrupt()  # a second one: put back the user's, not the first one's
    user_global, user_local = sys.gettrace(), (frame.f_trace, frame.f_trace_lines)

    def put_back() -> None:
        sys.settrace(user_global)
        frame.f_trace, frame.f_trace_lines = user_local
        _pending.clear()

    def trace(traced: Any, event: str, arg: Any) -> Any:
        if traced is not frame:
            return None
        if event in ("line", "return"):
            frame.f_trace, frame.f_trace_lines = user_local
            on_raise()
            raise KeyboardInterrupt
        return trace

    _pending.append(put_back)
    frame.f_trace = trace
    frame.f_trace_lines = True
    sys.settrace(lambda *_: None)  # local trace functions run only while a global one is set


def cancel_pending_interrupt() -> None:
    """Drop an interrupt still waiting for a frame to resume, and put back the user's trace
    functions that one replaced."""
    for put_back in list(_pending):
        put_back()
