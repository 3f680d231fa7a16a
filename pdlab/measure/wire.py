"""Bytes on the wire: what this process's TCP sockets sent and received, by the OS's count.

pdlab's comm meter adds up the payload each collective was *asked* to move and the analytic
bus bytes a ring *should* move; neither can disagree with itself. The kernel's per-socket
counters can. Linux keeps, for every TCP socket, ``tcpi_bytes_sent`` (data bytes put on the
network, retransmissions included; RFC 4898 tcpEStatsPerfHCDataOctetsOut), ``tcpi_bytes_retrans``
(both Linux >= 4.19) and ``tcpi_bytes_received`` (RFC 4898 tcpEStatsAppHCThruOctetsReceived,
Linux >= 4.1) in ``struct tcp_info``, which a process reads for its own sockets with
``getsockopt(IPPROTO_TCP, TCP_INFO)``. They count TCP payload: gloo's messages with their
headers, not TCP/IP headers. Sent bytes here leave retransmissions out, so that each byte
counts once on both ends, as received bytes do: even over loopback, TCP retransmits on this
busy 2-core machine (2 of 40 world-4 all-reduces of 1 MiB resent 48-154 bytes; up to 48 KB
seen in other runs).

A rank on gloo calls ``bytes_on_wire`` around a step; the difference is that step's traffic
over every socket the process holds, gloo's and any other, except the ones at ``exclude_fds``:
pdlab's control connection to the kernel (the worker's ``channel.conn.fileno()``), whose
results and metrics are not the strategy's traffic. NCCL moves bytes over NVLink, PCIe or
its own transports: on NCCL these numbers are not the strategy's.

When a byte is counted: on the receiver when it arrives, so a ``recv`` that returned has all
its bytes counted; on the sender when the process hands it to TCP: the bytes TCP transmitted
plus those still queued in the socket (``tcpi_notsent_bytes``, Linux >= 4.6). TCP transmits
a byte only when the receiver has room for it, which can be long after ``send`` returned (at
world 4 a 1 MiB ``dist.send`` had as little as 6% transmitted when it returned); counted when
handed over, a send that returned is counted whole, in the step that sent it.

gloo sends data only to a receive that is waiting for it: every receive first sends its
sender a 48-byte "ready" message, and every message carries a 48-byte header. A peer that
started its next step early can therefore have its first "ready" messages arrive before this
process's reading; ``connections`` gives the bytes per connection, so that what a process
received in a step can be read from what its peers sent it in theirs (``pdlab.training.loop``).

Cost: a listing of ``/proc/self/fd`` and an ``fstat`` per descriptor, then a ``dup``,
``getsockopt``, ``getsockname``, ``getpeername`` and ``close`` per TCP socket; nothing is cached, so a socket gloo opens lazily
(a new group, a first send to a peer) counts from the first call that sees it. A socket
closed between two calls takes its bytes with it: compare readings taken while the same
process groups live. A socket behind several descriptors (``dup``) counts once, by inode.
Measured per call by ``benchmarks/wire.py``.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Hashable, Iterable, Mapping

# offsetof(struct tcp_info, ...) in <linux/tcp.h> (checked with gcc against this machine's
# headers). The struct only grows, at its end: an older kernel returns fewer bytes, never others.
_BYTES_RECEIVED = 128  # __u64 tcpi_bytes_received, Linux 4.1
_NOTSENT = 144  # __u32 tcpi_notsent_bytes, Linux 4.6 (written, not yet transmitted)
_BYTES_SENT = 200  # __u64 tcpi_bytes_sent, Linux 4.19 (retransmissions included)
_BYTES_RETRANS = 208  # __u64 tcpi_bytes_retrans, Linux 4.19
_NEEDED = _BYTES_RETRANS + 8


def _open(fd: int) -> socket.socket | None:
    """A socket object on our own duplicate of ``fd`` (closing it leaves ``fd`` open); None
    when ``fd`` is no socket (a file, a pipe, closed meanwhile)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None  # closed meanwhile
    try:
        # AF_INET is only a label (TCP_INFO is the same for IPv6): getsockopt tells TCP apart.
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=dup)
    except OSError:
        os.close(dup)
        return None


def _info(sock: socket.socket) -> bytes | None:
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _NEEDED)
    except OSError:
        return None  # a Unix or UDP socket


def tcp_info(fd: int) -> bytes | None:
    """The kernel's ``struct tcp_info`` (as far as ``tcpi_bytes_retrans``) for the TCP socket open
    at ``fd``; None when ``fd`` is not one (a file, a pipe, a Unix socket, closed meanwhile)."""
    if (sock := _open(fd)) is None:
        return None
    with sock:
        return _info(sock)


def _tcp_connection(fd: int) -> tuple[str, bytes] | None:
    """``("LOCAL>PEER", tcp_info)`` (``host:port`` each) of the connected TCP socket at ``fd``,
    read through one duplicate of it; None for anything else (a listener carries no data)."""
    if (sock := _open(fd)) is None:
        return None
    with sock:
        if (info := _info(sock)) is None:
            return None
        try:
            local, peer = sock.getsockname(), sock.getpeername()
        except OSError:
            return None  # a listener, or closed meanwhile
    return f"{local[0]}:{local[1]}>{peer[0]}:{peer[1]}", info


def sent_received(info: bytes) -> tuple[int, int] | None:
    """``(bytes sent, bytes received)`` from ``tcp_info``'s bytes, each byte counted once (sent:
    ``tcpi_bytes_sent - tcpi_bytes_retrans``, plus ``tcpi_notsent_bytes``: what the process
    handed to TCP); None when the kernel's struct ends before them (Linux < 4.19)."""
    if len(info) < _NEEDED:
        return None
    sent, retransmitted = struct.unpack_from("=QQ", info, _BYTES_SENT)
    (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED)
    (queued,) = struct.unpack_from("=I", info, _NOTSENT)
    return sent - retransmitted + queued, received


def _socket_inode(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None  # closed since it was listed (the listing's own descriptor is)
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def connections(exclude_fds: Iterable[int] = ()) -> dict[str, tuple[int, int]] | None:
    """``{"LOCAL>PEER": (bytes sent, bytes received)}`` for each of this process's connected
    TCP sockets (addresses as ``host:port``), each counted once however many descriptors it
    has, without the sockets open at ``exclude_fds``. The peer process files the same
    connection under ``"PEER>LOCAL"``.

    Counters run from each socket's opening: take differences. None where they cannot be
    read (not Linux, or Linux < 4.19): no number beats a wrong one.
    """
    if not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"):
        return None
    seen = {_socket_inode(fd) for fd in exclude_fds}
    found = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        inode = _socket_inode(fd)
        if inode is None or inode in seen:
            continue
        seen.add(inode)
        if (read := _tcp_connection(fd)) is None:
            continue
        conn, info = read
        if (counters := sent_received(info)) is None:
            return None
        found[conn] = counters
    return found


def bytes_on_wire(exclude_fds: Iterable[int] = ()) -> tuple[int, int] | None:
    """``(bytes sent, bytes received)`` summed over ``connections(exclude_fds)``."""
    if (found := connections(exclude_fds)) is None:
        return None
    return sum(s for s, _ in found.values()), sum(r for _, r in found.values())


def connections_to(port: int) -> list[int]:
    """Descriptors of this process's TCP connections to ``port`` on any host: the control
    connection to a kernel listening there, when its descriptor is not at hand."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if _socket_inode(fd) is None:
            continue
        with socket.socket(fileno=os.dup(fd)) as sock:
            try:
                peer = sock.getpeername()
            except OSError:
                continue  # a listener, or not an internet socket
        if isinstance(peer, tuple) and peer[1] == port:
            found.append(fd)
    return found


def sent_since(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]
) -> dict[str, int]:
    """Bytes sent on each connection between two ``connections`` readings (one opened in
    between counts from zero, as its counters do)."""
    return {conn: sent - before.get(conn, (0, 0))[0] for conn, (sent, _) in after.items()}


def received_from_peers(sent: Mapping[Hashable, Mapping[str, int]]) -> dict[Hashable, int]:
    """What each process received, read from what the others sent: ``sent`` maps a process
    to its ``sent_since`` over one interval; a process received what the far end of each of
    its connections sent in it (nothing from a far end that is not in ``sent``)."""
    far_ends = {conn: nbytes for per in sent.values() for conn, nbytes in per.items()}

    def reverse(conn: str) -> str:
        local, _, peer = conn.partition(">")
        return f"{peer}>{local}"

    return {p: sum(far_ends.get(reverse(conn), 0) for conn in per) for p, per in sent.items()}
