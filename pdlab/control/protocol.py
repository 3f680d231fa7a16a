"""The wire between the kernel and its ranks: typed messages, their encoding, the handshake.

Every message is a small frozen dataclass, pickled whole (cloudpickle) into one frame of a
``multiprocessing.connection.Connection``. What user code produced — a call's function and
arguments, its return value, a ``pdlab.log`` record — travels as bytes *inside* a message, so
the envelope always decodes, and a value the other side can't unpickle is that value's error
(named, with its rank), never a broken connection.

Before anything is unpickled, both ends prove they hold the cluster's token: a mutual HMAC
challenge (``multiprocessing.connection``'s), kernel first.
"""

from __future__ import annotations

import enum
import os
import pickle
import socket
import struct
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

import cloudpickle

# ---- rank -> kernel ------------------------------------------------------------------------

Counts = dict[str, int]  # operations issued per process group, by group name


@dataclass(frozen=True)
class Hello:
    """The first message after the handshake: who is on this connection."""

    rank: int
    pid: int
    host: str


@dataclass(frozen=True)
class Ready:
    """The rank joined the process group; ``counts`` are its operations so far (a barrier)."""

    counts: Counts


@dataclass(frozen=True)
class StartFailed:
    """Joining the process group raised; the rank exits after sending this."""

    traceback: str


@dataclass(frozen=True)
class Output:
    """A chunk of what the rank wrote to fd 1 or 2 (not split into lines), and when the rank
    read it (``time.time()``), so the kernel can show the ranks' lines in printed order."""

    stream: str  # "stdout" or "stderr"
    text: str
    at: float


@dataclass(frozen=True)
class Display:
    """A rank's ``display(obj)``: the object pickled (b"" if it would not pickle) and its
    ``repr``, shown instead when the kernel can't unpickle it."""

    value: bytes
    text: str


@dataclass(frozen=True)
class WidgetState:
    """A rank's ipywidgets widget (``module.name``), new or changed: its synced state."""

    model_id: str
    module: str
    name: str
    state: dict[str, Any]


@dataclass(frozen=True)
class Metrics:
    """A ``pdlab.log`` record, pickled by the rank; ``types`` names its values' types, for an
    error message if the kernel cannot unpickle them."""

    record: bytes
    types: str


@dataclass(frozen=True)
class Result:
    """A call finished: its return value, pickled."""

    call_id: int
    value: bytes
    value_type: str  # for an error message if the kernel cannot unpickle ``value``
    counts: Counts
    group_problem: str = ""  # why the process group is unusable after the call ('' if it isn't)


@dataclass(frozen=True)
class Error:
    """A call raised (KeyboardInterrupt too): the exception's type name and traceback."""

    call_id: int
    exc_type: str
    traceback: str
    counts: Counts
    group_problem: str = ""


@dataclass(frozen=True)
class Here:
    """The answer to ``Where``: a ``pdlab.measure.where.Location``, sent by the rank's reader thread
    while its main thread runs on (or waits in a collective)."""

    request_id: int
    location: Any


@dataclass(frozen=True)
class Lost:
    """Made by the kernel, never sent: the rank's connection ended."""


@dataclass(frozen=True)
class Undecodable:
    """Made by the kernel, never sent: a value from the rank would not unpickle here."""

    what: str  # "a pdlab.log record", ...
    types: str  # the value's type(s), as the rank named them
    error: str  # what unpickling raised


# ---- kernel -> rank ------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """Run ``payload`` on the rank: a pickled ``(fn, args, kwargs)``, or source to exec.

    ``workdir``: the kernel's working directory and ``sys.path``, when they changed since the
    last call: the rank follows them, so relative paths and notebook-side modules work."""

    call_id: int
    kind: str  # "call" or "exec"
    payload: bytes | str
    workdir: tuple[str, list[str]] | None = None


@dataclass(frozen=True)
class Interrupt:
    """Raise KeyboardInterrupt in the code the rank is running (ignored between calls)."""


@dataclass(frozen=True)
class Where:
    """Say where you are now (answered with ``Here``, without stopping the call)."""

    request_id: int


@dataclass(frozen=True)
class Abort:
    """Exit now, without cleaning up: the group is being torn down."""


@dataclass(frozen=True)
class Shutdown:
    """Finish the current call, leave the process group and exit."""


# ---- who to blame --------------------------------------------------------------------------


class Blame(enum.IntEnum):
    """How telling a rank's failure is about the cause of a failed call; lowest first.

    A rank that is stopped (SIGSTOP, a debugger) or died is the cause; one that raised is
    likely the cause; one that reports its peer vanished mid-collective ("Connection reset by
    peer") is a consequence.
    """

    STOPPED = 0
    DIED = 1
    RAISED = 2
    PEER_LOST = 3

    @property
    def breaks_group(self) -> bool:
        """A death or a lost peer leaves the process group unusable, even if no rank runs."""
        return self is not Blame.RAISED


# What a rank reports when a peer it was talking to vanished: a consequence, never the cause.
_PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def blame_error(traceback: str) -> Blame:
    """``PEER_LOST`` if a rank's traceback says a peer vanished, else ``RAISED``."""
    return Blame.PEER_LOST if any(s in traceback for s in _PEER_LOST) else Blame.RAISED


@dataclass
class Failure:
    """One rank's part in a failed call."""

    rank: int
    blame: Blame
    summary: str  # one line: "rank 1 raised ValueError" / "rank 1 died: ..."
    exc_type: str | None = None
    traceback: str = field(default="", repr=False)


# ---- a rank's start ----------------------------------------------------------------------------

# The environment variable holding what a rank's own start changed (PYTHONPATH, for it to import
# pdlab): the launcher sets it, the worker puts the user's values back, so scripts see them.
WORKER_ONLY = "PDLAB_WORKER_ONLY"


# ---- encoding and the handshake ------------------------------------------------------------

# Messages whose fields are numbers, strings, bytes and containers of them only.
PLAIN = {Hello, Ready, Output, Metrics, Result, Error, Call, Interrupt, Where, Abort, Shutdown}


def send(conn: Connection, message: Any) -> None:
    """Send one message as one frame."""
    conn.send_bytes(encode(message))


def encode(message: Any) -> bytes:
    """``message`` as one frame. Those that hold only plain values (and bytes pickled by
    cloudpickle already) take the C pickler: half the time of cloudpickle's, which walks
    every object in Python to find what to pickle by value; a warm round trip is made of
    them. The others may hold a rank's objects: cloudpickle."""
    if type(message) in PLAIN:
        return pickle.dumps(message, cloudpickle.DEFAULT_PROTOCOL)
    return cloudpickle.dumps(message)


def recv(conn: Connection) -> Any:
    """Receive one message (the peer authenticated: its frames are ours to unpickle)."""
    return cloudpickle.loads(conn.recv_bytes())


def type_name(value: Any) -> str:
    """``module.Qualname`` of ``value``'s type, for messages about values that won't unpickle."""
    kind = type(value)
    return f"{kind.__module__}.{kind.__qualname__}"


def _io_timeout(sock: socket.socket, seconds: float) -> None:
    """Make blocking reads and writes on ``sock`` fail after ``seconds`` (0: never).

    A kernel-level timeout (SO_RCVTIMEO), not ``settimeout``, which would leave the fd
    non-blocking under the ``Connection`` that takes it over."""
    value = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def no_delay(sock: socket.socket) -> None:
    """Send small frames at once: without it, Nagle's algorithm holds a rank's output or
    metrics frame until the previous one is acknowledged, and the receiver delays that
    acknowledgement (~40 ms) waiting for more — every call that prints costs 40 ms."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def accept_rank(sock: socket.socket, token: bytes, timeout: float) -> tuple[Connection, Hello]:
    """The kernel's side of the handshake: challenge the peer, answer its challenge and read
    its ``Hello``, all within ``timeout`` s.

    The connection returned runs on a duplicate of ``sock``'s descriptor; ``sock`` stays the
    caller's, to close, or to shut down to abort the handshake from another thread. Raises
    (``AuthenticationError``, ``OSError``, ``EOFError``, ``ValueError``) for a peer without
    the token or one that stays silent: nothing it sent has been unpickled.
    """
    no_delay(sock)
    _io_timeout(sock, timeout)
    conn = Connection(os.dup(sock.fileno()))
    try:
        deliver_challenge(conn, token)
        answer_challenge(conn, token)
        hello = recv(conn)
        if not isinstance(hello, Hello):
            raise ValueError(f"expected Hello, got {type(hello).__name__}")
        _io_timeout(sock, 0)  # an authenticated rank may be silent for hours
    except BaseException:
        conn.close()
        raise
    return conn, hello


def connect_to_kernel(address: tuple[str, int], token: bytes, patience: float = 30.0) -> Connection:
    """The rank's side of the handshake: connect, answer the kernel's challenge, challenge it.

    A kernel busy turning strangers away may close a connection unanswered; the rank tries
    again for ``patience`` seconds. A wrong token is not retried.
    """
    deadline = time.monotonic() + patience
    while True:
        sock = socket.create_connection(address)
        no_delay(sock)
        conn = Connection(sock.detach())
        try:
            answer_challenge(conn, token)
            deliver_challenge(conn, token)
            return conn
        except (EOFError, ConnectionError) as exc:
            conn.close()
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"the kernel at {address[0]}:{address[1]} closed every connection before "
                    f"its handshake for {patience:.0f} s ({type(exc).__name__}): is another "
                    "program connecting to its port? Start the cluster on another port"
                ) from exc
            time.sleep(0.1)
        except BaseException:
            conn.close()
            raise
