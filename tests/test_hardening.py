"""Faults found by trying to break pdlab (issue 10), each reproduced and closed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pdlab


def ranks_of_kernel(kernel_pid: int) -> list[int]:
    """Rank processes started by the kernel ``kernel_pid`` (orphans included), from /proc."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdlab.worker" in args and f"--parent-pid={kernel_pid}".encode() in args:
            found.append(int(cmdline.parent.name))
    return found


def alive(pids: list[int]) -> list[int]:
    """The ``pids`` still running (a zombie has exited: its reaper may be slow, not it)."""
    running = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            running.append(pid)
    return running


def wait_until_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive(pids)


def test_ranks_die_with_a_kernel_killed_while_they_start(tmp_path):
    # Before: the worker imported torch (2 s and more) before arming its parent-death signal.
    script = tmp_path / "kernel.py"
    script.write_text("import os, pdlab\nprint(os.getpid(), flush=True)\npdlab.Cluster(4)\n")
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(kernel.stdout.readline())
        deadline = time.monotonic() + 30
        while len(ranks := ranks_of_kernel(pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ranks) == 4
        time.sleep(0.1)  # the ranks are importing
    finally:
        kernel.kill()
        kernel.wait()
    left = wait_until_gone(ranks, 1.5)
    for pid in left:  # don't leak them into the other tests
        os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks {left} outlived their kernel"


def test_control_frames_are_sent_without_delay(cluster2):
    # Before: Nagle's algorithm held each small frame (a printed line, a pdlab.log record)
    # until the previous one was acknowledged, ~40 ms a call that prints.
    import socket

    def nodelay_to_kernel(port: int) -> list[int]:
        flags = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=os.dup(int(fd)))
            except OSError:
                continue
            with sock:
                if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                    with contextlib.suppress(OSError):
                        if sock.getpeername()[1] == port:
                            flags.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return flags

    kernel_side = [
        socket.socket(fileno=os.dup(link.conn.fileno())) for link in cluster2._resources.links
    ]
    try:
        assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in kernel_side)
    finally:
        for s in kernel_side:
            s.close()
    assert cluster2.run(nodelay_to_kernel, cluster2.port) == [[1], [1]]


def test_idle_strangers_cannot_pin_the_kernel(cluster2):
    # Before: each connection that never answered the handshake parked a kernel thread and
    # an fd forever, and survived shutdown().
    import socket
    import threading

    from pdlab import control

    threads_before = threading.active_count()
    strangers = [socket.create_connection(("127.0.0.1", cluster2.port)) for _ in range(200)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - threads_before <= control.MAX_PENDING
        assert cluster2.run(pdlab.rank, timeout=30) == [0, 1]  # the ranks are unaffected
        deadline = time.monotonic() + control.HANDSHAKE_S + 10
        for s in strangers:  # every one is answered by a close: turned away, or timed out
            s.settimeout(max(0.1, deadline - time.monotonic()))
            while s.recv(4096):  # the challenge, then EOF
                pass
        assert threading.active_count() <= threads_before + 1
    finally:
        for s in strangers:
            s.close()


def test_shutdown_closes_pending_handshakes():
    import socket

    cluster = pdlab.Cluster(1)
    try:
        stranger = socket.create_connection(("127.0.0.1", cluster.port))
        stranger.recv(4096)  # the kernel's challenge: the handshake is pending
    finally:
        cluster.shutdown()
    stranger.settimeout(2)
    assert stranger.recv(4096) == b""  # closed by shutdown, not by the 5 s deadline
    stranger.close()
