"""The kernel's control channel: one authenticated connection per rank, read into one queue.

``ControlServer`` listens (loopback by default), authenticates each peer before anything it
sends is unpickled (``protocol.accept_rank``), and gives every rank a reader thread that puts
``(rank, message)`` on the cluster's event queue — except ``pdlab.log`` records, which go
straight to the metrics callback so a long run's records never queue behind a call, and
answers to ``Where``, which go to ``answers`` for whichever thread asked.

Strangers are cheap to turn away: a handshake must finish within ``HANDSHAKE_S`` (one
deadline for the whole exchange, not per read: a peer trickling a byte at a time is cut off
too), at most ``MAX_PENDING`` run at once (a new connection ends the oldest pending one, so
strangers can't crowd out the ranks), and ``close`` ends them all.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from pdlab.control import protocol
from pdlab.control.forkserver import ForkedRank
from pdlab.control.processes import Spawned

HANDSHAKE_S = 5.0  # one deadline for a whole handshake, however slowly the peer sends
MAX_PENDING = 32
ACCEPT_S = 0.5  # how often the accepting thread ends handshakes past their deadline


@dataclass
class RankLink:
    """One rank as the kernel sees it: its process (when started here) and its connection."""

    rank: int
    pid: int | None = None
    host: str | None = None
    ready: bool = False
    process: Spawned | ForkedRank | None = field(default=None, repr=False)
    conn: Connection | None = field(default=None, repr=False)
    lost: bool = False  # its connection ended (the only sign of life of an attached rank)
    send_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return not self.process.exited()
        return self.conn is not None and not self.lost

    def send(self, message: Any) -> None:
        """Send ``message`` to the rank, whole, from any thread; a closed rank is skipped."""
        if self.conn is not None:
            with self.send_lock, contextlib.suppress(OSError):
                protocol.send(self.conn, message)

    def exit_reason(self) -> str:
        """Why the rank is gone, in words: its exit code or signal, else the connection."""
        if self.process is None:
            return "its connection closed"
        code = self.process.exit_code(wait_s=1.0)
        if code is None:
            return "its connection closed"
        if code < 0:
            return f"it was killed by {signal.Signals(-code).name}"
        return f"it exited with code {code}"


class ControlServer:
    """Listens on ``(host, port)`` for the ranks of one cluster start."""

    def __init__(
        self,
        host: str,
        port: int,
        token: bytes,
        links: list[RankLink],
        events: queue.SimpleQueue,
        publish: Callable[[], Callable[[int, protocol.Metrics], None] | None],
    ):
        """``publish()`` returns the metrics callback, or None once its cluster is gone (a
        weak reference: these threads must not keep a dropped Cluster alive)."""
        try:
            self.listener: socket.socket | None = socket.create_server((host, port))
        except OSError as exc:
            raise ValueError(
                f"can't listen on {host}:{port} ({exc.strerror}): the port is busy or the "
                "address is not this machine's. Pass port=0 to pick a free port."
            ) from exc
        self.port: int = self.listener.getsockname()[1]
        self.links, self.token, self.events, self.publish = links, token, events, publish
        self.answers: queue.Queue = queue.Queue()  # (rank, Here, time received)
        self.listener.settimeout(ACCEPT_S)
        self._pending: dict[socket.socket, float] = {}  # each handshake's deadline
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True, name="pdlab-accept").start()

    def _accept(self) -> None:
        while (listener := self.listener) is not None:
            try:
                sock, _ = listener.accept()
            except TimeoutError:  # a moment to end handshakes past their deadline
                sock = None
            except OSError:  # closed: the cluster is shutting down
                return
            with self._lock:
                now = time.monotonic()
                for late in [s for s, deadline in self._pending.items() if deadline < now]:
                    self._drop(late)
                if sock is None:
                    continue
                if len(self._pending) >= MAX_PENDING:
                    # The oldest goes: a rank's handshake takes milliseconds, so strangers
                    # that hold theirs can't crowd out the ranks that are starting.
                    self._drop(min(self._pending, key=self._pending.__getitem__))
                self._pending[sock] = now + HANDSHAKE_S
            threading.Thread(target=self._handshake, args=(sock,), daemon=True).start()

    def _drop(self, sock: socket.socket) -> None:
        """End a pending handshake (its thread then fails and closes the socket)."""
        del self._pending[sock]
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _handshake(self, sock: socket.socket) -> None:
        try:
            # Per read, a backstop: ``_accept`` ends the whole handshake at its deadline.
            conn, hello = protocol.accept_rank(sock, self.token, HANDSHAKE_S)
        except Exception:
            return
        finally:
            with self._lock:
                self._pending.pop(sock, None)
            sock.close()  # the connection, if any, has its own descriptor
        if not 0 <= hello.rank < len(self.links) or self.links[hello.rank].conn is not None:
            conn.close()  # a rank we don't expect, or a second connection for one
            return
        link = self.links[hello.rank]
        link.conn, link.pid, link.host = conn, hello.pid, hello.host
        self._read(link)

    def _read(self, link: RankLink) -> None:
        try:
            while True:
                message = protocol.recv(link.conn)
                if isinstance(message, protocol.Here):  # asked from any thread, any time
                    self.answers.put((link.rank, message, time.time()))
                elif not isinstance(message, protocol.Metrics):
                    self.events.put((link.rank, message))
                elif (deliver := self.publish()) is not None:
                    try:
                        deliver(link.rank, message)
                    except BaseException:  # a record's trouble is no rank's death
                        traceback.print_exc()
        except BaseException:  # closed, or a stream we can no longer read: the rank is gone
            link.lost = True
            self.events.put((link.rank, protocol.Lost()))

    def close(self) -> None:
        """Stop listening and close every connection, pending handshakes included."""
        listener, self.listener = self.listener, None
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the thread blocked in accept()
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            for sock in list(self._pending):
                self._drop(sock)
        for link in self.links:
            if link.conn is not None:
                link.conn.close()
