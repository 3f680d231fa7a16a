"""What a process imports, and pays for once, before its first training run needs it, so
that run costs what later ones do.

A rank starts with torch alone (a cluster is up in about a second). The first ``pdlab.train``
on it then imports the trainer, pandas and each strategy's torch machinery: DDP, FSDP,
DTensor, pipelining, DCP. That is about 2.5 s a rank on these CPUs, and it is the same 1.1 s
a first DDP constructor is known to cost: with the modules loaded, one takes ~5 ms. After
the imports, a first model build, autograd pass and optimizer step still cost more than
later ones (``first_use``).

The kernel pays too: its first ``pdlab.train`` imports the trainer, pandas and every
strategy's module (``expected_comm`` asks a strategy's class), its dashboard plotly and
ipywidgets: 2-4 s here. A kernel's first ``Cluster`` imports them in the background
(``in_kernel``) while its ranks start, and the kernel's first use of ``pdlab.train``,
``pdlab.Dashboard``... waits for the module being imported (``beside_the_kernels``) instead
of importing beside it.

The control plane runs any code and knows no trainer: the layers above name what a first
run imports (``preload``: the root package names the trainer, the strategy registry each
strategy's module; ``kernel=True``: what only the kernel needs) and what it first uses
(``first_use``). ``modules()`` lists them, in steps of a second at most: the fork server
(``pdlab.control.forkserver``) imports them between requests, so it waits for one step at
most before it forks; a rank started with ``--warm-up`` imports whatever is still missing in
a background thread (``in_background``), then runs the first uses, so a cluster answers its
first call at once and is warm a few seconds later. (The fork server never computes: a
forked child can't inherit a thread pool. Its ranks run the first uses themselves.) What
torch caches per thread (DTensor's sharding propagation) is warmed on the rank's main
thread, once it has had no call for ``IDLE_S``, and makes way for the next (``next_call``).

Warming up draws no random numbers: tests/test_prestart.py checks that torch's generator is
as seeded at a rank's first call, during the warm-up and after it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

# What every run imports (the trainer needs pandas, DTensor and DCP), each package a step of
# its own so that no step is long; then what the layers above name (``preload``). Each name
# with whether ranks need it too (False: the kernel only).
PACKAGES = ("pandas", "torch.distributed.tensor", "torch.distributed.checkpoint")
_preloaded: list[tuple[str, bool]] = [(name, True) for name in PACKAGES]
_first_uses: dict[str, Callable[[], None]] = {}
_main_thread_uses: dict[str, Callable[[], None]] = {}  # first_use(main_thread=True), not yet done
# Held by a warm-up while it imports one module or runs one first use, and by a rank's call
# while it runs: two threads importing one module graph can deadlock on Python's per-module
# locks, and Python then hands one of them a partly imported module, or removes it from
# sys.modules under the other (CI saw a call fail with ``KeyError: 'pdlab.training.loop'`` in
# pickle). A call waits for one step at most. Reentrant: a call, or a warm-up's import, may
# reach ``beside_the_kernels`` again.
IMPORTING = threading.RLock()
_waiting: list[object] = []  # callers of ``holding`` not in yet: the warm-up lets them first
_kernel: threading.Thread | None = None  # the kernel's warm-up, once started
timings: dict[str, float] = {}  # seconds each step of this process's warm-up took
_stopped = threading.Event()  # set by ``stop``: no step starts after it
_imported = threading.Event()  # set once a rank's warm-up has taken its background steps
_WAKE = object()  # put in a rank's calls by its warm-up then: the main thread's turn
IDLE_S = 0.5  # a rank's main thread with no call for this long is idle (``next_call``)


class Yield(Exception):
    """Raised by ``yielding`` into a first use on a rank's main thread once a call waits."""


def preload(*names: str, kernel: bool = False) -> None:
    """Name modules a first run will import, for idle ranks (and the kernel) to import ahead
    of it; ``kernel=True``: only the kernel needs them. A module imported by the warm-up may
    name more: they are imported after it, in order."""
    known = {name for name, _ in _preloaded}
    _preloaded.extend((name, not kernel) for name in names if name not in known)


def first_use(name: str, fn: Callable[[], None], main_thread: bool = False) -> None:
    """Have idle ranks call ``fn`` (named ``name`` in ``timings``) once their imports are
    done: what a first run pays once a process (a model's first build, autograd pass,
    optimizer step), paid ahead. ``fn`` must leave no trace a call could see and use no
    process group (a call may use it meanwhile); torch's generators are put back after it.

    ``main_thread``: what torch caches per thread (DTensor's sharding propagation) is only
    of use on the thread that runs calls. Such an ``fn`` runs there once the rank is idle
    (``next_call``), and makes way for a call: the modules it runs inside ``yielding()``
    raise ``Yield`` once one has arrived, and it is run again at the next idle wait, until
    it returns."""
    (_main_thread_uses if main_thread else _first_uses)[name] = fn


def modules(kernel: bool = False) -> Iterator[str]:
    """The modules a first training run would import on a rank: what every run needs, then
    what ``preload`` named (the trainer, then each strategy's torch machinery: DDP, FSDP...).
    With ``kernel``, then what only the kernel needs (its dashboard)."""
    for kernel_only in (False, True) if kernel else (False,):
        i = 0
        while i < len(_preloaded):  # grows as the modules imported name more
            name, on_ranks = _preloaded[i]
            if on_ranks != kernel_only:
                yield name
            i += 1


def load(name: str) -> None:
    """Import ``name``, if it isn't yet. A module that fails here fails again, with its
    traceback, in the call that needs it: a warm-up has no one to report to."""
    if name not in sys.modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


@contextlib.contextmanager
def holding() -> Iterator[None]:
    """Hold ``IMPORTING`` (a call, a first use in the kernel), ahead of the warm-up's next
    step: the warm-up re-takes the lock at once after each step, and a waiting thread woken
    by its release would otherwise find it taken again (CI saw a call wait 12 s)."""
    ticket = object()
    _waiting.append(ticket)
    try:
        with IMPORTING:
            _waiting.remove(ticket)
            yield
    finally:
        if ticket in _waiting:  # interrupted while waiting
            _waiting.remove(ticket)


def _timed(name: str, fn: Callable[[], None]) -> None:
    while _waiting:  # a call or a first use waits for the lock: it goes first
        time.sleep(0.001)
    with IMPORTING:
        if _stopped.is_set():
            return
        start = time.perf_counter()  # not counting a wait for a call
        fn()
        timings[name] = time.perf_counter() - start


def stop(timeout: float = 10.0) -> None:
    """End this process's warm-up between two steps: wait for the step in flight (at most
    ``timeout`` s), and start no other. A rank that exits calls it, so that no warm-up step
    (torch running in a daemon thread) is cut off by the interpreter's exit."""
    _stopped.set()
    if IMPORTING.acquire(timeout=timeout):
        IMPORTING.release()  # a later step sees ``_stopped`` under the lock and returns


def _use_once(fn: Callable[[], None]) -> None:
    import torch

    with torch.random.fork_rng():
        try:
            fn()
        except Yield:
            raise  # to ``next_call``: run it again at the next wait
        except Exception:  # the call that needs it fails again, with its traceback
            pass


def _warm_up(kernel: bool, calls: queue.SimpleQueue | None = None) -> None:
    for name in modules(kernel):
        if name not in sys.modules:
            _timed(name, lambda name=name: load(name))
    if not kernel:  # the kernel trains nothing (a cluster does)
        for name, fn in list(_first_uses.items()):
            _timed(name, lambda fn=fn: _use_once(fn))
        _imported.set()
        if calls is not None:
            calls.put(_WAKE)


def in_background(calls: queue.SimpleQueue | None = None) -> threading.Thread:
    """Import ``modules()`` in a daemon thread, one at a time under ``IMPORTING``, then call
    each ``first_use`` function, one at a time under it too; then wake the rank's main
    thread, waiting in ``next_call(calls)``, for its own first uses.

    A call holds ``IMPORTING`` while it runs: one that arrives mid-step waits for that step,
    and the warm-up then waits (off the CPU and the GIL) until the call has ended.
    """
    thread = threading.Thread(
        target=_warm_up, args=(False, calls), daemon=True, name="pdlab-warm-up"
    )
    thread.start()
    return thread


def next_call(calls: queue.SimpleQueue) -> Any:
    """The next message a rank's main thread takes from ``calls``. Once the background
    warm-up is done and no call has come for ``IDLE_S``, it takes the first uses that run on
    this thread meanwhile: calls that come one after another (a benchmark's, a dashboard's
    runs) never meet one."""
    global _calls
    while True:
        if not (_main_thread_uses and _imported.is_set()):
            message = calls.get()
        else:
            try:
                message = calls.get(timeout=IDLE_S)
            except queue.Empty:
                name, fn = next(iter(_main_thread_uses.items()))
                _calls = calls
                try:
                    _timed(name, lambda fn=fn: _use_once(fn))
                    del _main_thread_uses[name]  # done, or failed: not tried again
                except Yield:
                    pass  # run again at the next idle wait; timings keep a finished one only
                finally:
                    _calls = None
                continue
        if message is not _WAKE:
            return message


_calls: queue.SimpleQueue | None = None  # while ``next_call`` runs a first use: its calls


@contextlib.contextmanager
def yielding() -> Iterator[None]:
    """Around a ``first_use(main_thread=True)`` function's model: its modules' forwards and
    backwards raise ``Yield`` once a call waits for the thread (a no-op elsewhere). Between
    modules, not in any torch op: an exception raised in some (a dispatch mode's, inside
    ``layer_norm``) reaches C++ that can't pass it on, and ``std::terminate`` ends the rank."""
    from torch.nn.modules.module import (
        register_module_forward_pre_hook,
        register_module_full_backward_pre_hook,
    )

    calls = _calls

    def make_way(module: Any, args: Any) -> None:
        if calls is not None and not calls.empty():
            raise Yield

    handles = [
        register_module_forward_pre_hook(make_way),
        register_module_full_backward_pre_hook(make_way),
    ]
    try:
        # Not shown in the notebook: the first module's backward hook warns that its input
        # (token ids) needs no gradient. Not thread-safe: the main thread's, while no call runs.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for handle in handles:
            handle.remove()


def in_kernel() -> threading.Thread:
    """The kernel's warm-up: ``modules(kernel=True)`` imported in a daemon thread, one at a
    time under ``IMPORTING``; started once a process (by its first ``Cluster``)."""
    global _kernel
    if _kernel is None:
        _kernel = threading.Thread(
            target=_warm_up, args=(True,), daemon=True, name="pdlab-kernel-warm-up"
        )
        _kernel.start()
        atexit.register(stop)  # as a rank does at its exit (see ``stop``)
    return _kernel


def beside_the_kernels() -> contextlib.AbstractContextManager:
    """Around a first import in the kernel (``pdlab.train``'s module...): while the kernel's
    warm-up runs, wait for the module it is importing, and keep it from starting another,
    rather than import beside it; a no-op once it is done, and on ranks."""
    if _kernel is not None and _kernel.is_alive():
        return holding()
    return contextlib.nullcontext()
