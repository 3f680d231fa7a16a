"""Faults found by trying to break pdlab (issue 10), each reproduced and closed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import pdlab


def ranks_of_kernel(kernel_pid: int) -> list[int]:
    """Rank processes started by the kernel ``kernel_pid`` (orphans included), from /proc."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"pdlab.control.worker" in args and f"--parent-pid={kernel_pid}".encode() in args:
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

    cluster2.run(int)  # a cluster a test before broke restarts now, on a new port
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

    from pdlab.control import channel as control

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


class _BreaksOnLoad:
    """Pickles fine on a rank; unpickling it raises (as a class the kernel lacks would)."""

    def __reduce__(self):
        import operator

        return operator.truediv, (1, 0)


def test_a_return_value_the_kernel_cannot_unpickle_names_the_rank_and_type(cluster2):
    # Before: a bare ZeroDivisionError in the kernel, no rank named.
    before = cluster2.run(os.getpid)
    with pytest.raises(pdlab.RankError) as info:
        cluster2.run(lambda: _BreaksOnLoad() if pdlab.rank() == 1 else "fine")
    assert info.value.rank == 1
    assert "return value" in str(info.value) and "_BreaksOnLoad" in str(info.value)
    assert "ZeroDivisionError" in str(info.value)
    assert cluster2.run(os.getpid) == before  # the cluster is kept


def test_a_log_record_the_kernel_cannot_unpickle_keeps_the_cluster(cluster2):
    # Before: "rank 0 died: its connection closed", and the cluster restarted.
    before = cluster2.run(os.getpid)

    def log_it():
        pdlab.log(value=_BreaksOnLoad() if pdlab.rank() == 0 else 1)
        return pdlab.rank()

    with pytest.raises(pdlab.RankError) as info:
        cluster2.run(log_it)
    assert info.value.rank == 0
    assert "pdlab.log record" in str(info.value) and "_BreaksOnLoad" in str(info.value)
    assert cluster2.run(os.getpid) == before
    assert cluster2.run(log_it, ranks=[1]) == [1]  # records still flow


def test_a_stopped_rank_is_blamed_at_once(cluster2):
    # Before: nothing for 300 s (the collective timeout), then rank 0 was blamed.
    def freeze_one():
        import torch
        import torch.distributed as dist

        if pdlab.rank() == 1:
            os.kill(os.getpid(), signal.SIGSTOP)
        dist.all_reduce(torch.ones(1))

    start = time.monotonic()
    with pytest.raises(pdlab.RankError) as info:
        cluster2.run(freeze_one)
    assert time.monotonic() - start < 20
    assert info.value.rank == 1
    assert "is stopped" in str(info.value)
    assert cluster2.run(pdlab.rank) == [0, 1]  # fresh ranks


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 10_000}, r"10000 ranks would need about .* GiB.*use world_size <= \d+"),
        ({"world_size": 2, "threads": -1}, "threads must be a whole number >= 1"),
        ({"world_size": 2, "timeout": -5}, "timeout must be a number of seconds > 0"),
    ],
)
def test_cluster_arguments_are_checked_before_any_rank_starts(kwargs, message):
    from .conftest import worker_pids

    before = worker_pids(os.getpid())
    with pytest.raises(ValueError, match=message):
        pdlab.Cluster(**kwargs)
    assert worker_pids(os.getpid()) == before


def test_ranks_must_be_rank_numbers(cluster2):
    with pytest.raises(ValueError, match=r"ranks must be a list of rank numbers, e\.g\. \[0, 2\]"):
        cluster2.run(pdlab.rank, ranks="01")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": True}, "steps must be a whole number >= 1, got True"),
        ({"checkpoint_every": -1, "checkpoint_dir": "/tmp/x"}, "checkpoint_every must be"),
        ({"lr": float("inf")}, "lr must be finite"),
        ({"lr": float("nan")}, r"lr must be > 0 \(a number\)"),
        ({"strategy": "dp", "micro_batches": 4}, "micro_batches=4 applies to pipelines only"),
    ],
)
def test_training_settings_are_checked_before_any_rank_works(cluster2, change, message):
    from pdlab.training.loop import train

    calls = []
    unsubscribe = cluster2.subscribe(calls.append)
    try:
        with pytest.raises(ValueError, match=message):
            train(cluster2, **{"model": "mlp", "steps": 2, **change})
    finally:
        unsubscribe()
    assert not calls  # no rank trained a step


def test_single_on_a_cluster_checkpoints_without_the_other_ranks(cluster2, tmp_path):
    # Before: rank 0 waited in DCP's collectives for ranks that never joined (CallTimeout).
    from pdlab.training.loop import train

    run = {"strategy": "single", "model": "mlp", "checkpoint_dir": str(tmp_path)}
    first = train(cluster2, steps=2, checkpoint_every=2, timeout=60, **run)
    resumed = train(cluster2, steps=4, resume=True, timeout=60, **run)
    whole = train(cluster2, steps=4, timeout=60, **{**run, "checkpoint_dir": None})
    assert list(resumed.steps.step) == [2, 3]
    assert resumed.steps.loss.tolist() == whole.steps.loss.tolist()[2:]
    assert first.steps.loss.tolist() == whole.steps.loss.tolist()[:2]


def test_one_huge_line_costs_linear_time():
    # Before: the unfinished line was re-joined on every chunk, so a rank printing one 50 MB
    # line took 39 s. Assembling a 26 MB line from 400 chunks must cost about what it costs
    # from one chunk (re-joining per chunk copies ~200x more).
    import io
    from contextlib import redirect_stdout

    from pdlab.control.output import RankOutput

    def seconds(chunks: list[str]) -> float:
        best = float("inf")
        for _ in range(3):
            out = RankOutput()
            start = time.perf_counter()
            with redirect_stdout(io.StringIO()):
                for chunk in chunks:
                    out.write(0, "stdout", chunk)
            best = min(best, time.perf_counter() - start)
        return best

    piece = "x" * 65536
    assert seconds([piece] * 400 + ["\n"]) < 5 * seconds([piece * 400 + "\n"])


def test_a_huge_line_arrives_whole(cluster2, capfd):
    cluster2.run(lambda: print("y" * 5_000_000) if pdlab.rank() == 1 else None)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("[rank 1]")]
    assert lines == ["[rank 1] " + "y" * 5_000_000]


def test_what_a_rank_started_ends_with_it():
    # Before: a `sleep` (or a DataLoader worker) a rank started outlived shutdown() and restart().
    def start_sleep() -> int:
        return subprocess.Popen(["sleep", "600"]).pid

    cluster = pdlab.Cluster(2)
    try:
        before_restart = cluster.run(start_sleep)
        cluster.restart()
        assert not wait_until_gone(before_restart, 5), "restart() left them"
        before_shutdown = cluster.run(start_sleep)
    finally:
        cluster.shutdown()
    assert not wait_until_gone(before_shutdown, 5), "shutdown() left them"


def test_the_next_start_removes_temp_dirs_of_killed_kernels():
    # Before: a kernel killed by SIGKILL left its private pdlab-* temp dir behind, for good.
    script = "import pdlab; c = pdlab.Cluster(1); print(c._resources.local.tmpdir, flush=True)"
    kernel = subprocess.Popen([sys.executable, "-c", script + "; input()"], stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)  # fmt: skip
    left = Path(kernel.stdout.readline().strip())
    kernel.kill()
    kernel.wait()
    assert left.is_dir()
    pdlab.Cluster(1).shutdown()
    assert not left.exists()


def test_attach_command_never_tells_other_hosts_to_connect_to_themselves():
    from pdlab.control import launcher

    cluster = pdlab.Cluster(2, attach=True, host="0.0.0.0")
    try:
        connect = next(a for a in cluster.attach_command().split() if a.startswith("--connect="))
    finally:
        cluster.shutdown()
    host = connect.removeprefix("--connect=").rpartition(":")[0]
    assert host in launcher.interface_addresses() and not host.startswith("127.")
    assert host != "localhost"


def test_local_torchrun_nodes_listen_on_loopback_only():
    from .conftest import descendants
    from .test_cluster import all_reduce_rank_sum, is_loopback, listening_addresses

    cluster = pdlab.Cluster(2, attach=True)
    nodes = cluster.launch_local_nodes(2)
    try:
        assert cluster.run(all_reduce_rank_sum) == [9.0, 9.0]
        pids = [os.getpid(), *(p for n in nodes for p in [n.pid, *descendants(n.pid)])]
        addresses = listening_addresses(pids)
        assert addresses and all(is_loopback(a) for a in addresses), addresses
    finally:
        cluster.shutdown()
    assert [n.wait(30) for n in nodes] == [0, 0]
