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
its bytes counted; on the sender when TCP transmits it, which can be after ``send`` returned
(gloo may still hold the bytes: at world 4 a 1 MiB ``dist.send`` had as little as 6% counted
when it returned, the rest once the receiver had them). A step that ends in a send can therefore
leave bytes to the sender's next reading; totals over a run are exact, and a reading taken
once every peer has finished receiving (after the ``cluster.run`` call) is exact too.

Cost: a listing of ``/proc/self/fd`` and an ``fstat`` per descriptor, then a ``dup``,
``getsockopt`` and ``close`` per TCP socket; nothing is cached, so a socket gloo opens lazily
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
from collections.abc import Iterable

# offsetof(struct tcp_info, ...) in <linux/tcp.h> (checked with gcc against this machine's
# headers). The struct only grows, at its end: an older kernel returns fewer bytes, never others.
_BYTES_RECEIVED = 128  # __u64 tcpi_bytes_received, Linux 4.1
_BYTES_SENT = 200  # __u64 tcpi_bytes_sent, Linux 4.19 (retransmissions included)
_BYTES_RETRANS = 208  # __u64 tcpi_bytes_retrans, Linux 4.19
_NEEDED = _BYTES_RETRANS + 8


def tcp_info(fd: int) -> bytes | None:
    """The kernel's ``struct tcp_info`` (as far as ``tcpi_bytes_retrans``) for the TCP socket open
    at ``fd``; None when ``fd`` is not one (a file, a pipe, a Unix socket, closed meanwhile)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None  # closed meanwhile
    try:
        # Our own duplicate, so that closing the socket object leaves the caller's fd open.
        # AF_INET is only a label (TCP_INFO is the same for IPv6): getsockopt tells TCP apart.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=dup)
    except OSError:
        os.close(dup)
        return None  # not a socket
    with sock:
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _NEEDED)
        except OSError:
            return None  # a Unix or UDP socket


def sent_received(info: bytes) -> tuple[int, int] | None:
    """``(bytes sent, bytes received)`` from ``tcp_info``'s bytes, each byte counted once (sent:
    ``tcpi_bytes_sent - tcpi_bytes_retrans``); None when the kernel's struct ends before them
    (Linux < 4.19)."""
    if len(info) < _NEEDED:
        return None
    sent, retransmitted = struct.unpack_from("=QQ", info, _BYTES_SENT)
    (received,) = struct.unpack_from("=Q", info, _BYTES_RECEIVED)
    return sent - retransmitted, received


def _socket_inode(fd: int) -> int | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None  # closed since it was listed (the listing's own descriptor is)
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def bytes_on_wire(exclude_fds: Iterable[int] = ()) -> tuple[int, int] | None:
    """``(bytes sent, bytes received)`` summed over this process's TCP sockets, each counted
    once however many descriptors it has, without the sockets open at ``exclude_fds``.

    Counters run from each socket's opening: take differences. None where they cannot be
    read (not Linux, or Linux < 4.19): no number beats a wrong one.
    """
    if not hasattr(socket, "TCP_INFO") or not os.path.isdir("/proc/self/fd"):
        return None
    seen = {_socket_inode(fd) for fd in exclude_fds}
    sent = received = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        inode = _socket_inode(fd)
        if inode is None or inode in seen:
            continue
        seen.add(inode)
        if (info := tcp_info(fd)) is None:
            continue
        if (counters := sent_received(info)) is None:
            return None
        sent += counters[0]
        received += counters[1]
    return sent, received


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
