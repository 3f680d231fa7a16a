"""The core: a persistent process group driven from the kernel, and how it fails."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import pdlab
from pdlab.control import protocol
from pdlab.control.cluster import choose_backend

from .conftest import worker_pids
from .helpers import wait_for_warm_up


@pytest.fixture(scope="module")
def cluster():
    with pdlab.Cluster(2) as c:
        yield c


def pids_of(cluster: pdlab.Cluster) -> list[int]:
    return cluster.run(os.getpid)


def all_reduce_rank_sum() -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(3) * (pdlab.rank() + 1)
    dist.all_reduce(t)
    print("sum is", t.tolist())
    return t.sum().item()


def test_run_returns_results_by_rank_and_streams_prefixed_output(cluster, capfd):
    assert cluster.run(all_reduce_rank_sum) == [9.0, 9.0]
    out = capfd.readouterr().out
    assert "[rank 0] sum is [3.0, 3.0, 3.0]" in out
    assert "[rank 1] sum is [3.0, 3.0, 3.0]" in out


def test_warm_calls_reuse_the_same_processes(cluster):
    first = pids_of(cluster)
    assert pids_of(cluster) == first
    assert len(set(first)) == 2 and os.getpid() not in first


def test_closures_args_kwargs_and_rank_subsets(cluster):
    offset = 100

    def add(x, *, y):
        return offset + x + y + pdlab.rank()

    assert cluster.run(add, 1, y=2) == [103, 104]
    assert cluster.run(add, 1, y=2, ranks=[1]) == [104]
    with pytest.raises(ValueError, match="ranks 0..1"):
        cluster.run(add, 1, y=2, ranks=[5])


def test_stderr_is_streamed_with_rank_prefix(cluster, capfd):
    cluster.run(lambda: print("careful", file=sys.stderr))
    assert "[rank 1] careful" in capfd.readouterr().err


def test_metrics_are_collected_and_pushed_to_subscribers(cluster):
    seen = []
    unsubscribe = cluster.subscribe(seen.append)
    cluster.run(lambda: pdlab.log(step=1, loss=0.5 * pdlab.rank()))
    unsubscribe()
    assert sorted(r["rank"] for r in seen) == [0, 1]
    assert {r["loss"] for r in seen} == {0.0, 0.5}
    assert all("time" in r for r in seen)
    assert seen[-1] in cluster.metrics


def test_metrics_keep_the_latest_records_only():
    with pdlab.Cluster(1, keep_metrics=5) as c:
        c.run(lambda: [pdlab.log(value=i) for i in range(12)])
        assert 5 <= len(c.metrics) <= 10
        assert [r["value"] for r in c.metrics][-5:] == [7, 8, 9, 10, 11]


def test_error_without_a_stuck_peer_keeps_the_cluster(cluster):
    before = pids_of(cluster)

    def fail_on_one():
        if pdlab.rank() == 1:
            raise ValueError("bad value on one rank")
        return "fine"

    with pytest.raises(pdlab.RankError) as info:
        cluster.run(fail_on_one)
    assert info.value.rank == 1
    assert "ValueError: bad value on one rank" in str(info.value)
    assert "fail_on_one" in str(info.value)  # the remote traceback
    assert pids_of(cluster) == before


def test_error_while_peers_wait_in_a_collective_names_the_raising_rank(cluster):
    def raise_before_all_reduce():
        import torch
        import torch.distributed as dist

        if pdlab.rank() == 0:
            raise RuntimeError("rank 0 gave up")
        dist.all_reduce(torch.ones(1))  # rank 1 waits here for rank 0, forever

    start = time.monotonic()
    with pytest.raises(pdlab.RankError) as info:
        cluster.run(raise_before_all_reduce)
    assert time.monotonic() - start < 10
    assert info.value.rank == 0
    assert "rank 0 gave up" in str(info.value)
    assert "still running" in str(info.value)
    assert "broken" in str(cluster.status())
    # Usable again, by itself, with fresh ranks.
    assert cluster.run(all_reduce_rank_sum) == [9.0, 9.0]


def test_ranks_that_stop_at_different_collectives_get_a_fresh_group(cluster):
    # What a Stop during bucketed all-reduces can do: one rank launched one more async
    # all-reduce than its peer, then both raised. Nothing is left running, yet the next
    # all-reduce would pair with the stale one and hang.
    def one_extra_async_all_reduce():
        import torch
        import torch.distributed as dist

        if pdlab.rank() == 1:
            dist.all_reduce(torch.ones(1), async_op=True)
        raise KeyboardInterrupt

    before = pids_of(cluster)
    with pytest.raises(pdlab.RankError) as info:
        cluster.run(one_extra_async_all_reduce)
    assert "stopped at different collectives" in str(info.value)
    assert "rank 0 issued 0 op(s), rank 1 issued 1 op(s)" in str(info.value)
    assert cluster.run(all_reduce_rank_sum, timeout=30) == [9.0, 9.0]
    assert not set(pids_of(cluster)) & set(before)  # fresh ranks


def test_uneven_point_to_point_traffic_is_not_mistaken_for_a_broken_group(cluster4):
    # A chain 0 -> 1 -> 2 -> 3 (a pipeline's shape) leaves the inner ranks with twice the
    # operations of the outer ones, legitimately; a later plain error must keep the ranks.
    def chain():
        import torch
        import torch.distributed as dist

        t, r = torch.ones(1), pdlab.rank()
        if r > 0:
            dist.recv(t, r - 1)
        if r < 3:
            dist.send(t, r + 1)

    def fail_everywhere():
        raise ValueError("a typo")

    cluster4.run(chain)
    before = pids_of(cluster4)
    with pytest.raises(pdlab.RankError, match="a typo") as info:
        cluster4.run(fail_everywhere)
    assert "different collectives" not in str(info.value)
    assert pids_of(cluster4) == before


def test_sigkilled_rank_is_reported_not_hung(cluster):
    victim = pids_of(cluster)[1]

    def wait_in_collective():
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))

    def sleep_once_started():
        pdlab.log(started=True)
        time.sleep(30)

    def kill_once_started(record: dict) -> None:  # once it has the call, however busy the machine
        if record.get("started"):
            os.kill(victim, signal.SIGKILL)

    unsubscribe = cluster.subscribe(kill_once_started)
    start = time.monotonic()
    with pytest.raises(pdlab.RankError, match="rank 1 died: it was killed by SIGKILL"):
        cluster.run(lambda: sleep_once_started() if pdlab.rank() == 1 else wait_in_collective())
    unsubscribe()
    assert time.monotonic() - start < 10
    assert cluster.run(pdlab.rank) == [0, 1]


def test_timeout_names_the_ranks_still_running(cluster):
    # Fresh ranks (the sigkill test restarts them) warm up: a call waits for the step in
    # flight, which took over the 1 s timeout on rank 0's no-op too when the tests before
    # this module left clusters running (docs, predict, dashboard: the old code failed alike).
    wait_for_warm_up(cluster)
    with pytest.raises(pdlab.CallTimeout) as info:
        cluster.run(lambda: time.sleep(20) if pdlab.rank() == 1 else None, timeout=1)
    assert info.value.ranks == [1]
    assert "ranks [1]" in str(info.value)
    assert cluster.run(pdlab.rank) == [0, 1]


def once_started(cluster: pdlab.Cluster, then: Callable[[], None]) -> Callable[[], None]:
    """Call ``then()`` once every rank has logged ``started`` (on the kernel's thread that read
    the last one, which must not wait for a call). Returns the unsubscribe."""
    started = set()

    def on_record(record: dict) -> None:
        if record.get("started"):
            started.add(record["rank"])
            if len(started) == cluster.world_size:
                then()

    return cluster.subscribe(on_record)


def interrupt_once_started(cluster: pdlab.Cluster) -> Callable[[], None]:
    """Interrupt this (the kernel's) main thread once every rank has logged ``started``:
    an interrupt that lands before, while a rank still waits for its warm-up, stops the call
    before the user's code runs (CI under load). Returns the unsubscribe."""
    main = threading.main_thread().ident
    return once_started(cluster, lambda: signal.pthread_kill(main, signal.SIGINT))


def sleep_until_interrupted() -> None:
    """On a rank: log ``started``, sleep, and log ``interrupted`` if interrupted."""
    try:
        pdlab.log(started=True)
        time.sleep(60)
    except KeyboardInterrupt:
        pdlab.log(interrupted=True)
        raise


def spin(seconds: float) -> None:
    """Run Python for ``seconds`` (where an interrupt can land), not sleep."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def interrupted_in(cluster: pdlab.Cluster, fn: Callable[[], None]) -> list[int]:
    """Run ``fn`` (which logs ``started``, then runs until interrupted) with a Ctrl-C once
    every rank has started; the ranks that logged ``interrupted`` within 10 s."""
    seen = len(cluster.metrics)  # test_prestart runs these after other interrupting tests
    unsubscribe = interrupt_once_started(cluster)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cluster.run(fn)
    unsubscribe()
    assert time.monotonic() - start < 10
    return sorted(r["rank"] for r in cluster.metrics[seen:] if r.get("interrupted"))


def test_interrupt_reaches_the_ranks(cluster):
    before = pids_of(cluster)
    assert interrupted_in(cluster, sleep_until_interrupted) == [0, 1]
    assert pids_of(cluster) == before  # they finished; nothing was killed


def test_an_interrupt_between_two_sends_stops_the_ranks_that_have_the_call(cluster, monkeypatch):
    """Under load, Ctrl-C once landed while the kernel still sent the call to rank 1, with
    rank 0 running it: the kernel raised and left rank 0 running (CI)."""
    before = pids_of(cluster)
    link = cluster._resources.links[1]
    send, started = link.send, threading.Event()
    unsubscribe = cluster.subscribe(lambda record: record.get("started") and started.set())

    def interrupted_before_the_call(message):
        if isinstance(message, protocol.Call):
            assert started.wait(30)  # rank 0 runs the call
            raise KeyboardInterrupt  # as a Ctrl-C landing here does
        send(message)

    monkeypatch.setattr(link, "send", interrupted_before_the_call)
    seen = len(cluster.metrics)
    start = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cluster.run(sleep_until_interrupted)
    unsubscribe()
    monkeypatch.undo()
    assert time.monotonic() - start < 10
    assert [r["rank"] for r in cluster.metrics[seen:] if r.get("interrupted")] == [0]
    assert cluster.run(pdlab.rank) == [0, 1] and pids_of(cluster) == before


def test_an_interrupt_right_after_the_last_send_still_waits_for_that_rank(cluster, monkeypatch):
    """Under load, every rank had started the call, and so the test's Ctrl-C came, before the
    kernel noted the last one as running: it stopped waiting for that rank, whose records then
    landed in the next call (CI). Here the Ctrl-C lands just after the last send."""
    before = pids_of(cluster)
    link = cluster._resources.links[1]
    send, both = link.send, threading.Event()
    unsubscribe = once_started(cluster, both.set)

    def interrupted_after_the_call(message):
        send(message)
        if isinstance(message, protocol.Call):
            assert both.wait(30)  # both run the user's code: an earlier Ctrl-C stops it sooner
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def rank_1_finishes_last() -> None:
        try:
            sleep_until_interrupted()
        except KeyboardInterrupt:
            time.sleep(pdlab.rank())  # within the kernel's grace: it must wait for rank 1
            pdlab.log(finished=True)
            raise

    monkeypatch.setattr(link, "send", interrupted_after_the_call)
    seen = len(cluster.metrics)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(rank_1_finishes_last)
    unsubscribe()
    monkeypatch.undo()
    assert sorted(r["rank"] for r in cluster.metrics[seen:] if r.get("finished")) == [0, 1]
    assert cluster.run(pdlab.rank) == [0, 1] and pids_of(cluster) == before


def test_an_interrupt_landing_in_a_finalizer_still_reaches_the_call(cluster):
    """Python drops what a ``__del__`` raises ("Exception ignored in"): lab 05's Stop once
    landed in pdlab.measure.memory's finalizer and the rank trained on. Here nearly all the
    time is spent in a ``__del__``; the interrupt must still stop the loop."""

    def spin_in_finalizers():
        class Slow:
            def __del__(self):
                spin(0.05)

        try:
            pdlab.log(started=True)
            for _ in range(400):  # 20 s, all but nothing of it inside __del__
                Slow()
        except KeyboardInterrupt:
            pdlab.log(interrupted=True)
            raise

    assert interrupted_in(cluster, spin_in_finalizers) == [0, 1]


def test_an_interrupt_landing_in_a_weakref_callback_still_reaches_the_call(cluster):
    """Python drops what a weakref callback raises too (torch's caches use them), and no
    ``__del__`` is on the stack to tell: the interrupt was lost and the loop ran on."""

    def spin_in_weakref_callbacks():
        import weakref

        class Target:
            pass

        def spin_in_callback(_):
            spin(0.05)

        try:
            pdlab.log(started=True)
            for _ in range(400):  # 20 s, nearly all inside the callback
                weakref.ref(Target(), spin_in_callback)
        except KeyboardInterrupt:
            pdlab.log(interrupted=True)
            raise

    assert interrupted_in(cluster, spin_in_weakref_callbacks) == [0, 1]


def test_an_interrupt_whose_finalizer_ran_from_c_reaches_a_blocking_call_after_it(cluster):
    """A finalizer run from C code that then blocks: the frame it interrupted resumes only
    when the block ends, so a raise waiting for its next line came 60 s late."""

    def finalizer_then_sleep():
        import itertools

        class Seconds(float):  # made and dropped by C: no Python frame but the __del__'s
            def __del__(self):
                if self == 1.0:
                    pdlab.log(started=True)
                    spin(2)

        try:
            # compress drops Seconds(1.0) (its __del__ spins, and is interrupted), then
            # time.sleep takes Seconds(60.0), all inside this one line.
            for _ in map(time.sleep, itertools.compress(map(Seconds, [1.0, 60.0]), [0, 1])):
                pass
        except KeyboardInterrupt:
            pdlab.log(interrupted=True)
            raise

    assert interrupted_in(cluster, finalizer_then_sleep) == [0, 1]


def test_an_interrupt_through_a_finalizer_leaves_the_users_tracer_in_place(cluster):
    """The interrupt that lands in a finalizer is raised by a trace function: the one the
    user's code had set (a debugger's, coverage's) must be back once it has fired, not
    replaced by None (as it was, for the rest of the rank's life)."""

    def spin_in_finalizers_traced():
        import sys

        def users_tracer(frame, event, arg):
            return None

        class Slow:
            def __del__(self):
                spin(0.05)

        sys.settrace(users_tracer)
        pdlab.log(started=True)
        for _ in range(400):
            Slow()

    def tracer_name():
        import sys

        return getattr(sys.gettrace(), "__name__", None)

    unsubscribe = interrupt_once_started(cluster)
    with pytest.raises(KeyboardInterrupt):
        cluster.run(spin_in_finalizers_traced)
    unsubscribe()
    try:
        assert cluster.run(tracer_name) == ["users_tracer"] * 2
    finally:
        cluster.exec("import sys; sys.settrace(None)")


def test_unpicklable_function_is_refused_before_sending(cluster):
    lock = threading.Lock()
    with pytest.raises(TypeError, match="can't send 'uses_lock' to the ranks"):

        def uses_lock():
            return lock.locked()

        cluster.run(uses_lock)


def test_cell_code_runs_in_persistent_per_rank_namespaces(cluster):
    assert cluster.exec("x = pdlab.rank() * 10\nx") == [0, 10]
    assert cluster.exec("x + 1", ranks=[1]) == [11]
    with pytest.raises(pdlab.RankError, match="NameError"):
        cluster.exec("undefined_name")


def test_magics_start_run_cells_and_stop(capfd):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "pdlab")
    ip.run_line_magic("pdlab", "start 2")
    try:
        ip.run_cell_magic("ranks", "", "y = dist.get_rank() + 5\ny")
        ip.run_cell_magic("ranks", "1", "y * 2")
        ip.run_line_magic("pdlab", "status")
    finally:
        ip.run_line_magic("pdlab", "stop")
    out = capfd.readouterr().out
    assert "[rank 0] Out: 5" in out and "[rank 1] Out: 6" in out
    assert "[rank 1] Out: 12" in out and "[rank 0] Out: 10" not in out
    assert "backend=gloo, device=cpu" in out
    assert "pdlab cluster stopped" in out


def listening_addresses(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets in LISTEN state that ``pids`` hold open."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1])
    return found


def is_loopback(hex_address: str) -> bool:
    host = hex_address.split(":")[0]
    if len(host) == 8:  # IPv4, little-endian
        return bytes.fromhex(host)[::-1][0] == 127
    return host == "0" * 24 + "01000000"  # ::1


def test_nothing_listens_beyond_loopback(cluster):
    pids = [os.getpid(), *pids_of(cluster)]
    cluster.run(all_reduce_rank_sum)  # gloo's transport is up
    addresses = listening_addresses(pids)
    assert addresses, "expected the control channel and gloo to listen somewhere"
    assert all(is_loopback(a) for a in addresses), addresses


def test_unauthenticated_peers_are_refused(cluster):
    from multiprocessing.connection import AuthenticationError, Client

    with pytest.raises(AuthenticationError):
        Client(("127.0.0.1", cluster.port), authkey=b"wrong token")
    with socket.create_connection(("127.0.0.1", cluster.port)) as raw:
        raw.sendall(b"\x00\x00\x00\x05hello")  # not the challenge's answer
    assert cluster.run(pdlab.rank) == [0, 1]


def test_shutdown_leaves_no_process_port_or_temp_file():
    c = pdlab.Cluster(2)
    pids = pids_of(c)
    port, tmpdir = c.port, c._resources.local.tmpdir
    assert tmpdir and Path(tmpdir).exists()
    c.shutdown()
    c.shutdown()  # twice is fine
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert not Path(tmpdir).exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    with pytest.raises(RuntimeError, match="shut down: call .restart"):
        c.run(pdlab.rank)


def test_ranks_exit_when_the_kernel_is_sigkilled(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, time, pdlab
            c = pdlab.Cluster(2)
            print(*c.run(os.getpid), flush=True)
            time.sleep(600)
            """
        )
    )
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        ranks = [int(p) for p in kernel.stdout.readline().split()]
        assert len(ranks) == 2
    finally:
        kernel.kill()
        kernel.wait()
    deadline = time.monotonic() + 5
    while any(Path(f"/proc/{p}").exists() for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [p for p in ranks if Path(f"/proc/{p}").exists()]
    assert not alive, f"ranks {alive} outlived their kernel"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 0}, "world_size must be a whole number >= 1"),
        ({"world_size": 2, "backend": "mpi"}, "unknown backend 'mpi'"),
        ({"world_size": 2, "device": "tpu"}, "unknown device 'tpu'"),
        ({"world_size": 2, "backend": "nccl", "device": "cpu"}, "use backend='gloo'"),
    ],
)
def test_bad_arguments_fail_before_any_process_starts(kwargs, message):
    before = worker_pids(os.getpid())
    with pytest.raises(ValueError, match=message):
        pdlab.Cluster(**kwargs)
    assert worker_pids(os.getpid()) == before


def test_busy_port_is_named():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ValueError, match=f"127.0.0.1:{port}.*port=0"):
            pdlab.Cluster(2, port=port)


def test_rank_dying_while_starting_shows_its_output(tmp_path, monkeypatch):
    broken = tmp_path / "torch"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('this torch is broken on purpose')")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="died while starting(.|\n)*broken on purpose"):
        pdlab.Cluster(2, device="cpu")


def test_backend_choice():
    assert choose_backend(4, None, None, gpus=0) == ("gloo", "cpu", None)
    assert choose_backend(2, None, None, gpus=2)[:2] == ("nccl", "cuda")
    backend, device, note = choose_backend(4, None, None, gpus=1)
    assert (backend, device) == ("gloo", "cuda") and "share 1 GPU" in note
    with pytest.raises(ValueError, match="NCCL needs one GPU per rank.*backend='gloo'"):
        choose_backend(4, "nccl", None, gpus=1)
    with pytest.raises(ValueError, match="no GPU is visible"):
        choose_backend(2, None, "cuda", gpus=0)


def test_torchrun_nodes_attach_to_the_kernels_cluster():
    c = pdlab.Cluster(2, attach=True)
    assert "torchrun --nnodes=2 --nproc-per-node=1" in c.attach_command()
    nodes = c.launch_local_nodes(2)
    try:
        assert c.run(all_reduce_rank_sum) == [9.0, 9.0]
        assert c.status().ranks[1].alive
    finally:
        c.shutdown()
        codes = [n.wait(30) for n in nodes]
    assert codes == [0, 0]


def test_a_second_concurrent_call_is_refused_not_lost(cluster):
    running, errors = threading.Event(), []
    unsubscribe = once_started(cluster, running.set)

    def second_call():
        assert running.wait(30)
        try:
            cluster.run(pdlab.rank)
        except RuntimeError as exc:
            errors.append(str(exc))
        finally:
            cluster.interrupt()  # the first call's end

    other = threading.Thread(target=second_call)
    other.start()
    with pytest.raises(pdlab.RankError, match="KeyboardInterrupt"):
        cluster.run(sleep_until_interrupted)
    other.join()
    unsubscribe()
    assert errors and "already running a call" in errors[0]
    assert cluster.run(pdlab.rank) == [0, 1]


def test_a_dropped_cluster_stops_its_ranks():
    import gc

    c = pdlab.Cluster(2)
    pids = pids_of(c)
    c = pdlab.Cluster(2)  # as when a notebook cell is run again
    gc.collect()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{p}").exists() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    c.shutdown()


def test_interrupts_between_calls_are_ignored(cluster):
    before = pids_of(cluster)
    for _ in range(20):
        cluster.interrupt()
    assert cluster.run(pdlab.rank) == [0, 1]
    assert pids_of(cluster) == before
