"""Bytes on the wire: the kernel's TCP counters agree with what a collective must move."""

from __future__ import annotations

import socket

import pytest

from pdlab.measure import wire

S = 1 << 20  # bytes each rank contributes
# gloo's message headers on top of the payload, for the ops below with S = 1 MiB: measured
# 576 bytes (all_reduce, world 2), 1,728 (all_reduce, world 4), 96 (send).
FRAMING = 4096


def within_framing(measured: int, payload: float) -> bool:
    return payload <= measured <= payload + FRAMING


# ---- on the ranks --------------------------------------------------------------------------


def control_fd(port: int) -> int:
    """This rank's descriptor for its connection to the kernel (listening at ``port``)."""
    (fd,) = wire.connections_to(port)
    return fd


def deduplicated(port: int) -> tuple[int, int]:
    return wire.bytes_on_wire(exclude_fds=[control_fd(port)])


def with_control(port: int) -> tuple[int, int]:
    return wire.bytes_on_wire()


def per_descriptor(port: int) -> tuple[int, int]:
    """The wrong sum: every descriptor's socket, as often as it has descriptors."""
    import os

    kernel = control_fd(port)
    infos = [wire.tcp_info(int(fd)) for fd in os.listdir("/proc/self/fd") if int(fd) != kernel]
    counts = [wire.sent_received(info) for info in infos if info is not None]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


def count_then_run(count, port, op, *args):
    """The count before ``op``, and what ``op`` returns (sent back to the kernel)."""
    return count(port), op(*args)


def all_reduce(size: int) -> None:
    import torch
    import torch.distributed as dist

    dist.all_reduce(torch.ones(size // 4))


def send_0_to_1(size: int) -> None:
    import torch
    import torch.distributed as dist

    if dist.get_rank() == 0:
        dist.send(torch.ones(size // 4), 1)
    elif dist.get_rank() == 1:
        dist.recv(torch.empty(size // 4), 0)


def return_object(size: int):
    import torch

    return torch.zeros(size // 4)


def dup_sockets(port: int) -> list[int]:
    """A second descriptor for each of this rank's sockets but the kernel's."""
    import os
    import stat

    ours = [int(n) for n in os.listdir("/proc/self/fd") if int(n) != control_fd(port)]
    return [os.dup(fd) for fd in ours if stat.S_ISSOCK(os.fstat(fd).st_mode)]


def close_fds(fds_by_rank: list[list[int]]) -> None:
    import os

    from pdlab.control import runtime

    for fd in fds_by_rank[runtime.rank()]:
        os.close(fd)


# ---- in the kernel -------------------------------------------------------------------------


def measure(cluster, op, *args, count=deduplicated) -> list[tuple[int, int]]:
    """Each rank's ``(sent, received)`` over ``op``: read before it, and after it in a second
    call, once every rank has returned (so the receivers hold every byte: a sender's
    ``send`` can return with its bytes still queued)."""
    before = [b for b, _ in cluster.run(count_then_run, count, cluster.port, op, *args)]
    after = cluster.run(count, cluster.port)
    return [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)]


@pytest.mark.parametrize("world", [2, 4])
def test_all_reduce_moves_the_rings_bytes_on_every_rank(request, world):
    """Ring all-reduce: each rank sends and receives 2(n-1)/n of the buffer (reduce-scatter
    then all-gather), not the buffer's size, and not twice it."""
    cluster = request.getfixturevalue(f"cluster{world}")
    ring = 2 * (world - 1) / world * S
    for sent, received in measure(cluster, all_reduce, S):
        assert within_framing(sent, ring), (sent, ring)
        assert within_framing(received, ring), (received, ring)


def test_a_send_is_counted_on_its_two_ends_only(cluster4):
    (sent0, received0), (sent1, received1), *others = measure(cluster4, send_0_to_1, S)
    assert within_framing(sent0, S) and within_framing(received1, S)
    assert received0 <= FRAMING and sent1 <= FRAMING  # gloo's small notices, no payload
    assert others == [(0, 0), (0, 0)]


def test_the_control_connection_is_excluded(cluster2):
    big = 10 * S  # returned to the kernel over the control connection
    assert measure(cluster2, return_object, big) == [(0, 0), (0, 0)]
    # Counted, it would show: the kernel's connection is what excluding removes.
    counted = measure(cluster2, return_object, big, count=with_control)
    assert all(sent >= big for sent, _ in counted), counted


def test_a_socket_behind_two_descriptors_counts_once(cluster2):
    dups = cluster2.run(dup_sockets, cluster2.port)
    try:
        for sent, _ in measure(cluster2, all_reduce, S):
            assert within_framing(sent, S)
        # Summed per descriptor, the same traffic reads twice: the bound catches it.
        for sent, _ in measure(cluster2, all_reduce, S, count=per_descriptor):
            assert not within_framing(sent, S) and within_framing(sent, 2 * S), sent
    finally:
        cluster2.run(close_fds, dups)


def test_counters_of_a_local_connection():
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        with client, peer:
            client.sendall(b"x" * 100_000)
            got = 0
            while got < 100_000:
                got += len(peer.recv(65536))
            info = wire.tcp_info(client.fileno())
            assert wire.sent_received(info) == (100_000, 0)
            assert wire.sent_received(wire.tcp_info(peer.fileno())) == (0, 100_000)
            # Linux 4.18's struct ended at byte 200, before tcpi_bytes_sent: no number.
            assert wire.sent_received(info[:200]) is None


def test_only_tcp_sockets_have_counters(tmp_path):
    unix, _ = pair = socket.socketpair()
    with pair[0], pair[1], open(tmp_path / "file", "w") as file:
        assert wire.tcp_info(unix.fileno()) is None
        assert wire.tcp_info(file.fileno()) is None


def test_a_kernel_without_the_counters_gives_none(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        with client, server.accept()[0]:
            assert wire.bytes_on_wire() is not None
            real = wire._info

            def as_on_linux_4_18(sock: socket.socket) -> bytes | None:
                info = real(sock)
                return None if info is None else info[:200]

            monkeypatch.setattr(wire, "_info", as_on_linux_4_18)
            assert wire.bytes_on_wire() is None


def test_reading_leaves_no_descriptor_open(tmp_path):
    import os

    with open(tmp_path / "file", "w") as file, socket.create_server(("127.0.0.1", 0)) as server:
        before = sorted(os.listdir("/proc/self/fd"))
        for _ in range(20):
            wire.bytes_on_wire()
            wire.tcp_info(file.fileno())
            wire.connections_to(server.getsockname()[1])
        assert sorted(os.listdir("/proc/self/fd")) == before
