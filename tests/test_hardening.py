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


def survivors(pids: list[int], seconds: float) -> list[int]:
    """The ``pids`` still running after ``seconds``, killed (not leaked into other tests)."""
    left = wait_until_gone(pids, seconds)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


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
    left = survivors(ranks, 1.5)
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
        # The handshake threads end once they wake to their closed sockets.
        while threading.active_count() > threads_before + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
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
        ({"world_size": 2, "timeout": -5}, "timeout must be a finite number of seconds > 0"),
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
        ({"lr": float("inf")}, "lr must be a finite number > 0, got inf"),
        ({"lr": float("nan")}, "lr must be a finite number > 0, got nan"),
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


def write_while_the_pump_dawdles() -> None:
    """On a rank: write below Python (as C extensions do), while the thread that sends
    output to the kernel takes 0.5 s over its next chunk."""
    from pdlab.control import protocol

    output = protocol.Output

    def slowly(*fields):
        protocol.Output = output
        time.sleep(0.5)
        return output(*fields)

    protocol.Output = slowly
    os.write(1, b"the end of what it wrote\n")


def test_output_written_below_python_arrives_before_the_result(cluster2, capfd):
    # The rank can't tell it wrote: before the result it checks that its pipe is empty and
    # that its output thread holds nothing unsent. Skipping that check (the pipe is empty
    # once the thread has read it) lets the result overtake the output.
    cluster2.run(write_while_the_pump_dawdles)
    out = capfd.readouterr().out
    assert "[rank 0] the end of what it wrote" in out and "[rank 1] the end" in out


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


# ---- issue 21: hardening, third pass ------------------------------------------------------


def test_a_dead_rank_is_named_while_a_child_it_forked_holds_its_socket(cluster2, tmp_path):
    # Before: the kernel learnt of a death only from the control socket, which the child kept
    # open: the call waited for its timeout (CallTimeout), not "rank 1 died".
    import threading

    from .conftest import descendants

    forked = tmp_path / "forked"

    def fork_then_wait(path: str) -> None:
        if pdlab.rank() == 1:
            child = os.fork()
            if child == 0:
                time.sleep(1000)
                os._exit(0)
            Path(path).write_text(f"{os.getpid()} {child}")
        time.sleep(1000)

    def kill_rank_once_forked() -> None:
        while not forked.exists() or len(forked.read_text().split()) < 2:
            time.sleep(0.01)
        os.kill(int(forked.read_text().split()[0]), signal.SIGKILL)

    killer = threading.Thread(target=kill_rank_once_forked)
    killer.start()
    start = time.monotonic()
    with pytest.raises(pdlab.RankError, match=r"rank 1 died: it was killed by SIGKILL") as failed:
        cluster2.run(fork_then_wait, str(forked), timeout=60)
    killer.join()
    assert failed.value.rank == 1
    assert time.monotonic() - start < 3 + 5  # "within ~3 s", with room for a busy machine
    child = int(forked.read_text().split()[1])
    assert child not in descendants(os.getpid()) or not wait_until_gone([child], 5)


KERNEL_WITH_CHILDREN = """
import json, os, subprocess, sys, time
import pdlab
from pdlab.control import launcher

def start_children():
    plain = subprocess.Popen(["sleep", "1000"])
    detached = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    forked = os.fork()
    if forked == 0:
        time.sleep(1000)
        os._exit(0)
    return [plain.pid, detached.pid, forked]

spawned = pdlab.Cluster(2)  # a kernel's first cluster: new processes
assert launcher.fork_server().ready.wait(120)
forked = pdlab.Cluster(2)  # forked from the fork server
assert all(isinstance(r.process, type(next(iter(launcher.fork_server().ranks.values()))))
           for r in forked._resources.links)
pids = [p for c in (spawned, forked) for r in c.run(start_children) for p in r]
print(json.dumps(pids), flush=True)
forked.run(lambda: (print("sleeping", flush=True), time.sleep(1000)))  # mid-call; spawned idle
"""


def test_what_ranks_started_dies_with_a_killed_kernel(tmp_path):
    # Before: ranks died with the kernel (parent-death signal), the `sleep`s and fork()
    # children they started lived on, re-parented to init.
    import json

    from .conftest import descendants

    script = tmp_path / "kernel.py"
    script.write_text(KERNEL_WITH_CHILDREN)
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    everything: list[int] = []
    try:
        children = json.loads(kernel.stdout.readline())
        assert len(children) == 12
        while "sleeping" not in kernel.stdout.readline():  # the forked ranks are mid-call
            pass
        everything = descendants(kernel.pid)
        assert set(children) <= set(everything)
    finally:
        kernel.kill()
        kernel.wait()
    left = survivors(everything, 5)
    assert not left, f"{len(left)} processes outlived their kernel"


def _trickling_stranger(port: int, stop) -> None:
    """A local process's connection that reads the challenge, announces a 200-byte answer,
    then sends it a byte every 0.5 s: never silent for a whole read timeout, never done."""
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port)) as s:
        s.recv(4096)
        s.send(struct.pack("!i", 200))
        s.settimeout(0.5)
        while not stop.is_set():
            try:
                s.send(b"x")
                if s.recv(4096) == b"":
                    return
            except TimeoutError:
                continue
            except OSError:
                return


def test_a_handshake_has_one_deadline_and_strangers_cannot_crowd_out_ranks():
    # Before: the 5 s limit was per read, so a peer sending a byte every few seconds held its
    # connection for ever; MAX_PENDING of them closed every rank's connection on arrival.
    import queue
    import secrets
    import threading

    from pdlab.control import channel as control
    from pdlab.control import protocol

    token = secrets.token_hex(16).encode()
    links = [control.RankLink(0)]
    server = control.ControlServer("127.0.0.1", 0, token, links, queue.Queue(), lambda: None)
    stop = threading.Event()
    strangers = [
        threading.Thread(target=_trickling_stranger, args=(server.port, stop))
        for _ in range(control.MAX_PENDING + 4)
    ]
    try:
        start = time.monotonic()
        for t in strangers:
            t.start()
        while len(server._pending) < control.MAX_PENDING:
            time.sleep(0.01)
        conn = protocol.connect_to_kernel(("127.0.0.1", server.port), token, patience=3)
        protocol.send(conn, protocol.Hello(0, os.getpid(), "here"))
        while links[0].conn is None and time.monotonic() - start < 10:
            time.sleep(0.01)
        assert links[0].conn is not None, "the rank's handshake was crowded out"
        conn.close()
        for t in strangers:  # each cut off at its deadline, though it never stopped sending
            t.join(timeout=max(0.0, start + control.HANDSHAKE_S + 5 - time.monotonic()))
        assert not any(t.is_alive() for t in strangers), (
            "a trickling handshake outlived its deadline"
        )
    finally:
        stop.set()
        server.close()
        for t in strangers:
            t.join()


def test_a_rank_that_cannot_connect_says_why(monkeypatch):
    import socket

    from pdlab.control import protocol

    with socket.create_server(("127.0.0.1", 0)) as closing:  # accepts, then closes at once
        port = closing.getsockname()[1]
        import threading

        def close_each() -> None:
            with contextlib.suppress(OSError):
                while True:
                    closing.accept()[0].close()

        threading.Thread(target=close_each, daemon=True).start()
        with pytest.raises(ConnectionError, match="closed every connection before its handshake"):
            protocol.connect_to_kernel(("127.0.0.1", port), b"t", patience=0.5)
