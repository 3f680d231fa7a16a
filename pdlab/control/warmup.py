"""What a rank imports before its first training run needs it, so that run costs what later
ones do.

A rank starts with torch alone (a cluster is up in about a second). The first ``pdlab.train``
on it then imports the trainer, pandas and each strategy's torch machinery: DDP, FSDP,
DTensor, pipelining, DCP. That is about 2.5 s a rank on these CPUs, and it is the same 1.1 s
a first DDP constructor is known to cost: with the modules loaded, one takes ~5 ms.

The control plane runs any code and knows no trainer: the layers above name what a first
run imports (``preload``: the root package names the trainer, the strategy registry each
strategy's module). ``modules()`` lists them, in steps of a second at most: the fork server
(``pdlab.control.forkserver``) imports them between requests, so it waits for one step at most before
it forks; a rank started with ``--warm-up`` imports whatever is still missing in a
background thread (``in_background``), so a cluster answers its first call at once and is
warm a few seconds later.

Importing draws no random numbers: tests/test_prestart.py checks that torch's generator is
as seeded at a rank's first call, during the warm-up and after it.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
import threading
from collections.abc import Iterator

# What every run imports (the trainer needs pandas, DTensor and DCP), each package a step of
# its own so that no step is long; then what the layers above name (``preload``).
PACKAGES = ("pandas", "torch.distributed.tensor", "torch.distributed.checkpoint")
_preloaded = list(PACKAGES)
# Held by the warm-up while it imports one module, and by a call while it runs: two threads
# importing one module graph can deadlock on Python's per-module locks, and Python then hands
# one of them a partly imported module, or removes it from sys.modules under the other (CI
# saw a call fail with ``KeyError: 'pdlab.training.loop'`` in pickle). A call waits for one
# module's import at most.
IMPORTING = threading.Lock()


def preload(*names: str) -> None:
    """Name modules a first run will import, for idle ranks to import ahead of it. A module
    imported by the warm-up may name more: they are imported after it, in order."""
    _preloaded.extend(name for name in names if name not in _preloaded)


def modules() -> Iterator[str]:
    """The modules a first training run would import: what every run needs, then what
    ``preload`` named (the trainer, then each strategy's torch machinery: DDP, FSDP...)."""
    i = 0
    while i < len(_preloaded):  # grows as the modules imported name more
        yield _preloaded[i]
        i += 1


def load(name: str) -> None:
    """Import ``name``, if it isn't yet. A module that fails here fails again, with its
    traceback, in the call that needs it: a warm-up has no one to report to."""
    if name not in sys.modules:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def in_background() -> threading.Thread:
    """Import ``modules()`` in a daemon thread, one at a time under ``IMPORTING``.

    A call holds ``IMPORTING`` while it runs: one that arrives mid-import waits for that
    module, and the warm-up then waits (off the CPU and the GIL) until the call has ended.
    """

    def warm_up() -> None:
        for name in modules():
            with IMPORTING:
                load(name)

    thread = threading.Thread(target=warm_up, daemon=True, name="pdlab-warm-up")
    thread.start()
    return thread
