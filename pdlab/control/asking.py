"""Asking the ranks where they are: ``Cluster.where()``, the places a failed or timed-out
call reports, and attached ranks' clock offsets.

A ``Where`` question goes over each live rank's control link; the rank's reader thread
answers from what it is doing (nothing it runs is stopped). A rank silent for the timeout is
"unknown"; a dead one says what its black box holds (``pdlab.measure.flight``).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from pdlab.control import protocol
from pdlab.measure import flight
from pdlab.measure.where import Location, Locations

WHERE_S = 2.0  # how long ranks may take to say where they are


class Asker:
    """One cluster's questions: one at a time, since the answers share one queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._questions = itertools.count(1)

    def ask(
        self, resources: Any, ranks: Sequence[int], timeout: float = WHERE_S
    ) -> list[tuple[Location, float]]:
        """Each rank's ``Location`` and clock offset (the rank's clock minus the midpoint of
        the round trip); dead ranks and ranks silent for ``timeout`` s say so."""
        links, server = resources.links, resources.server
        with self._lock:
            question, asked = next(self._questions), time.time()
            # (No links at all once a failed call has stopped every rank.)
            alive = [r for r in ranks if r < len(links) and links[r].alive and links[r].conn]
            for rank in alive:
                links[rank].send(protocol.Where(question))
            answers: dict[int, tuple[Location, float]] = {}
            deadline = time.monotonic() + timeout
            while server is not None and len(answers) < len(alive) and time.monotonic() < deadline:
                try:
                    rank, here, received = server.answers.get(timeout=0.05)
                except queue.Empty:
                    continue
                if here.request_id == question:  # else a late answer to an earlier question
                    answers[rank] = here.location, here.location.clock - (asked + received) / 2
        labels = next((place.groups for place, _ in answers.values()), {})
        return [answers.get(r, (_silent(resources, r, alive, labels), 0.0)) for r in ranks]

    def places(self, resources: Any, ranks: Sequence[int], timeout: float = WHERE_S) -> Locations:
        """Where ``ranks`` are, without their clocks."""
        return Locations(place for place, _ in self.ask(resources, ranks, timeout))

    def clock_offsets(self, resources: Any, world_size: int) -> dict[int, float]:
        """Seconds each rank's ``time.time()`` is ahead of this kernel's: 0 on this machine;
        ranks on other hosts are asked three times, and each offset is the median of the
        rank's clock minus the midpoint of the question's round trip (Cristian's algorithm:
        as accurate as half a round trip)."""
        here = os.uname().nodename
        away = [r.rank for r in resources.links if r.host not in (None, here)]
        offsets = dict.fromkeys(range(world_size), 0.0)
        if away:
            samples = [dict(self.ask(resources, away)) for _ in range(3)]
            for rank in away:
                found = sorted(s[rank] for s in samples if rank in s)
                offsets[rank] = found[len(found) // 2] if found else 0.0
        return offsets


def _silent(resources: Any, rank: int, alive: list[int], labels: dict[str, str]) -> Location:
    """A rank that did not answer: unknown if alive; if dead, what its black box says."""
    local = resources.local
    if rank in alive or local is None:
        return Location(rank, "unknown" if rank in alive else "dead")
    ops = flight.read_black_box(flight.black_box_path(local.tmpdir, rank))
    return flight.dead(rank, ops, labels)
