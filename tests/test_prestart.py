"""Issue 13: ranks forked warm from the fork server, and ranks that warm themselves while idle.

Every guarantee the core's tests check is checked again here on forked ranks, by importing
those tests: pytest runs them with this module's ``cluster`` and ``cluster2`` fixtures, and
``only_forked_ranks`` fails any of them that would start a rank as a new process instead.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import pdlab
from pdlab.control import forkserver, launcher, warmup
from pdlab.control.processes import Spawned

from .conftest import leaked_processes, pids_running
from .helpers import assert_parity, wait_for_warm_up
from .prestart_probes import draws_while_warming_up, first_draws
from .test_cluster import (  # noqa: F401  (run again here, on forked ranks)
    is_loopback,
    listening_addresses,
    test_a_dropped_cluster_stops_its_ranks,
    test_a_second_concurrent_call_is_refused_not_lost,
    test_error_while_peers_wait_in_a_collective_names_the_raising_rank,
    test_interrupt_reaches_the_ranks,
    test_interrupts_between_calls_are_ignored,
    test_ranks_that_stop_at_different_collectives_get_a_fresh_group,
    test_run_returns_results_by_rank_and_streams_prefixed_output,
    test_shutdown_leaves_no_process_port_or_temp_file,
    test_sigkilled_rank_is_reported_not_hung,
    test_stderr_is_streamed_with_rank_prefix,
    test_timeout_names_the_ranks_still_running,
    test_unauthenticated_peers_are_refused,
)
from .test_hardening import (  # noqa: F401
    alive,
    test_a_huge_line_arrives_whole,
    test_a_stopped_rank_is_blamed_at_once,
    test_control_frames_are_sent_without_delay,
    test_what_a_rank_started_ends_with_it,
    wait_until_gone,
)

pytestmark = pytest.mark.skipif(not forkserver.supported(), reason="fork servers need Linux 5.3+")
SPAWN = launcher.LocalRanks._popen


def warm_server() -> forkserver.ForkServer:
    """This kernel's fork server, started if need be, once it has imported everything."""
    if launcher.fork_server() is None or launcher.fork_server().gone:
        pdlab.Cluster(1).shutdown()  # a kernel's first cluster starts one (or replaces it)
    server = launcher.fork_server()
    assert server is not None and server.warm.wait(120), "the fork server never got warm"
    return server


@pytest.fixture(autouse=True)
def only_forked_ranks(monkeypatch):
    """Fail a test here that would spawn a rank a fork server should have forked."""
    spawn = launcher.LocalRanks._popen

    def refuse(self, rank):
        assert not self.settings.prestart, "a rank was spawned, not forked"
        return spawn(self, rank)

    warm_server()
    monkeypatch.setattr(launcher.LocalRanks, "_popen", refuse)


@pytest.fixture(scope="module")
def cluster():
    warm_server()
    with pdlab.Cluster(2) as c:
        yield c


@pytest.fixture(scope="module")
def cluster2(cluster):
    return cluster


def parents(cluster: pdlab.Cluster) -> list[int]:
    """Who started each rank: its keeper's parent (the kernel, or the fork server)."""

    def starter() -> int:
        keeper = Path(f"/proc/{os.getppid()}/stat").read_text()
        return int(keeper.rsplit(")", 1)[1].split()[1])

    return cluster.run(starter)


def test_later_clusters_are_forked_from_the_server_born_warm(cluster):
    server = launcher.fork_server()
    assert parents(cluster) == [server.pid, server.pid]

    def who_am_i():
        import contextlib
        import gc
        import sys

        fds = set()
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the listing's own descriptor is gone
                fds.add(os.readlink(f"/proc/self/fd/{fd}"))
        return {
            "cmdline": Path("/proc/self/cmdline").read_bytes().split(b"\0"),
            "group": os.getpgid(0),
            "keeper": Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0"),
            "session": os.getsid(0),
            "stdin": os.readlink("/proc/self/fd/0"),
            "fds": fds,
            "not_loaded": [m for m in warmup.modules() if m not in sys.modules],
            "frozen": gc.get_freeze_count(),  # inherited objects its collector never walks
        }

    server_socket = os.readlink(f"/proc/{server.pid}/fd/{server_fd(server)}")
    for rank, me in enumerate(cluster.run(who_am_i)):
        pid = cluster.status().ranks[rank].pid
        assert [b"pdlab.control.worker", f"--rank={rank}".encode()] == me["cmdline"][:2]
        keeper = cluster._resources.links[rank].process.pid
        assert me["keeper"][:2] == [b"pdlab.control.keeper", f"--rank={rank}".encode()]
        # A process group and session of its own, its keeper's (``launcher.stop`` ends both).
        assert me["group"] == me["session"] == keeper != pid
        assert me["stdin"] == "/dev/null"
        assert server_socket not in me["fds"]  # nothing of the server's is left open
        assert me["not_loaded"] == []  # born with the training stack imported
        assert me["frozen"] > 100_000


def test_idle_ranks_take_each_models_first_step_ahead(cluster):
    """What a first run pays once a process after its imports (a model's build, its first
    autograd pass and Adam step, its data set), paid while the ranks idle; timed there."""
    from pdlab.training.models import MODELS

    wait_for_warm_up(cluster)
    steps = cluster.run(lambda: {k: v for k, v in warmup.timings.items() if "step" in k})
    names = [f"a first {m} step" for m in MODELS] + [f"a first tp/torch {m} step" for m in MODELS]
    assert [sorted(s) for s in steps] == [sorted(names)] * 2
    assert all(0 < seconds < 60 for s in steps for seconds in s.values()), steps


def count_sharding_propagations() -> None:
    """From now on, count on this rank the ops DTensor's sharding propagation meets for the
    first time (its C++ cache's misses, which torch keeps per thread)."""
    from torch.distributed.tensor import DTensor

    dispatcher = DTensor._op_dispatcher
    propagate = type(dispatcher)._propagate_op_sharding_dispatch_slow_path
    dispatcher.misses = 0

    def counting(*args, **kwargs):
        dispatcher.misses += 1
        return propagate(dispatcher, *args, **kwargs)

    dispatcher._propagate_op_sharding_dispatch_slow_path = counting


def sharding_propagations() -> int:
    from torch.distributed.tensor import DTensor

    misses, DTensor._op_dispatcher.misses = DTensor._op_dispatcher.misses, 0
    return misses


def test_idle_ranks_propagate_dtensor_shardings_for_a_first_tp_torch_run(cluster):
    """A first tp/torch run's sharding propagation (0.3 s of 0.7 s at 4 ranks here), paid
    on the ranks' main thread while they idle: a default-sized run finds it done."""
    wait_for_warm_up(cluster)
    cluster.run(count_sharding_propagations)
    pdlab.train(cluster, strategy="tp", impl="torch", model="gpt", steps=1)
    warmed = cluster.run(sharding_propagations)
    # What the warm-up cached (specs on a mesh made without groups) trains as one process
    # does (SGD: see tests/test_tensor.py's PARITY).
    parity = {"model": "gpt", "steps": 2, "optimizer": "sgd", "lr": 0.1, "full_state": True}
    result = pdlab.train(cluster, strategy="tp", impl="torch", **parity)
    assert_parity(result, pdlab.train(strategy="single", **parity))
    cluster.run(sharding_propagations)
    # The known-wrong case: a batch size the warm-up did not take propagates its shapes anew.
    pdlab.train(cluster, strategy="tp", impl="torch", model="gpt", steps=1, batch_size=8)
    not_warmed = cluster.run(sharding_propagations)
    assert all(n >= 20 for n in not_warmed), not_warmed
    assert all(w <= n // 3 for w, n in zip(warmed, not_warmed, strict=True)), (warmed, not_warmed)


def meshes_for(warm_layout: str, real_layout: str) -> tuple[bool, bool]:
    """Whether a warm-up's mesh for ``warm_layout`` is the one a run of ``real_layout``
    makes, as DTensor's caches see it, and names the same tp group."""
    import torch

    from pdlab import compat
    from pdlab.training.loop import layout_for, mesh_for
    from pdlab.training.parallel.base import Mesh

    real = mesh_for(layout_for(real_layout, 2), torch.device("cpu")).device_mesh
    layout = layout_for(warm_layout, 2)
    names, sizes = Mesh.grid(layout)
    warm = compat.mesh_without_groups("cpu", sizes, names)
    same_group = warm["tp"]._dim_group_names == real["tp"]._dim_group_names
    return (warm == real and hash(warm) == hash(real)), same_group


def test_a_warm_ups_mesh_is_the_runs_mesh_without_its_collectives(cluster):
    assert cluster.run(meshes_for, "tp", "tp") == [(True, True)] * 2
    assert cluster.run(meshes_for, "dp", "tp") == [(False, False)] * 2  # the known-wrong mesh
    with pytest.raises(pdlab.RankError, match="one dim must span the 2 ranks"):
        cluster.run(compat_mesh, (2, 2, 1))


def compat_mesh(shape: tuple[int, ...]) -> None:
    from pdlab import compat

    compat.mesh_without_groups("cpu", shape, ("dp", "pp", "tp"))


def server_fd(server: forkserver.ForkServer) -> int:
    args = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
    return int(next(a for a in args if a.startswith(b"--fd=")).split(b"=")[1])


def rank_settings() -> dict:
    import os
    import sys

    import torch

    from pdlab.control import warmup

    for name in warmup.modules():  # spawned ranks import them only now: compare like for like
        warmup.load(name)
    env = dict(os.environ)
    return {
        "threads": (torch.get_num_threads(), torch.get_num_interop_threads()),
        "parallel_info": torch.__config__.parallel_info(),
        "env": env,
        "cwd": os.getcwd(),
        "path": sys.path,
        "argv": sys.argv[1:],
        "cuda": torch.cuda.is_initialized(),
    }


def assert_fresh_and_their_own(draws: list[dict]) -> None:
    """Each process's generators as a new process's: torch's untouched since it was seeded,
    and every process seeded differently."""
    assert all(d["untouched"] for d in draws), draws
    for kind in ("seed", "numpy", "python"):
        assert len({d[kind] for d in draws}) == len(draws), (kind, draws)


def test_a_forked_rank_starts_as_a_spawned_one_would():
    with pdlab.Cluster(2, prestart=False) as spawned, pdlab.Cluster(2) as forked:
        assert parents(spawned) == [os.getpid()] * 2
        assert parents(forked) == [launcher.fork_server().pid] * 2
        with pdlab.Cluster(2) as forked_again:
            assert_fresh_and_their_own(
                spawned.run(first_draws) + forked.run(first_draws) + forked_again.run(first_draws)
            )
        theirs, ours = spawned.run(rank_settings), forked.run(rank_settings)
    for a, b in zip(theirs, ours, strict=True):
        port_and_store = ("--connect=", "--store=", "--parent-pid=", "--warm-up")
        a["argv"], b["argv"] = ([x for x in s["argv"] if not x.startswith(port_and_store)]
                                for s in (a, b))  # fmt: skip
        for s in (a, b):
            s["env"].pop("PDLAB_TOKEN", None)  # the worker pops it; a token per cluster
            # A port, a run id and an error file per cluster, as torchrun gives each run
            for name in ("MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE"):
                s["env"].pop(name)
        assert a == b
    assert ours[1]["env"]["LOCAL_RANK"] == "1" and ours[1]["env"]["GLOO_SOCKET_IFNAME"] == "lo"
    assert ours[0]["threads"][0] == int(ours[0]["env"]["OMP_NUM_THREADS"])


def spawn_with_warm_up(monkeypatch) -> None:
    """Have clusters spawn their ranks (with ``--warm-up``) although a server is ready."""
    monkeypatch.setattr(launcher, "fork_server_for", lambda env: None)
    monkeypatch.setattr(launcher.LocalRanks, "_popen", SPAWN)


ATTEMPTS = 5  # fresh clusters tried until a first call meets every rank's warm-up running


def test_a_first_call_runs_during_the_warm_up_and_finds_the_generators_untouched(monkeypatch):
    spawn_with_warm_up(monkeypatch)
    # A rank imports much before its warm-up starts, so a call sent as the cluster comes up
    # can find a rank's warm-up already done (about 1 in 3 here, on a quiet machine): such an
    # attempt proves nothing, and a fresh cluster tries again.
    tries = []
    for _ in range(ATTEMPTS):
        with pdlab.Cluster(2) as during:
            replies = during.run(draws_while_warming_up)  # the first call
            assert parents(during) == [os.getpid()] * 2  # spawned, not forked warm
        tries.append([warming for warming, _, _ in replies])
        if all(tries[-1]):
            break
    # It ran during the warm-up, without waiting for all of it...
    assert all(tries[-1]), f"no first call met the warm-up running: {tries}"
    # ...but for the module it was importing: two threads importing one module graph can
    # leave a call with a half-imported module (CI: KeyError 'pdlab.training.loop' in pickle)
    assert [half for _, half, _ in replies] == [[], []]
    with pdlab.Cluster(2) as after:
        wait_for_warm_up(after)
        assert_fresh_and_their_own([d for _, _, d in replies] + after.run(first_draws))


def test_an_interrupt_during_the_warm_up_reaches_the_call(monkeypatch):
    spawn_with_warm_up(monkeypatch)
    with pdlab.Cluster(1) as c:
        main = threading.main_thread().ident
        threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT)).start()
        start = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            c.run(time.sleep, 60)
        assert time.monotonic() - start < 10
        assert c.run(pdlab.rank) == [0]


def test_prestart_false_starts_plain_processes_and_no_server(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time, pdlab
            from pdlab.control import launcher
            c = pdlab.Cluster(2, prestart=False)
            time.sleep(5)
            keepers = [r.process.pid for r in c._resources.links]  # started here: Popens
            print(c.run(os.getppid) == keepers, launcher.fork_server() is None,
                  c.run(lambda: "pdlab.training.loop" in sys.modules))
            c.shutdown()
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["True", "True", "[False,", "False]"], out.stderr


def test_nothing_the_server_or_its_ranks_hold_listens_beyond_loopback(cluster):
    server = launcher.fork_server()
    pids = [os.getpid(), server.pid, *cluster.run(os.getpid)]
    addresses = listening_addresses(pids)
    assert addresses and all(is_loopback(a) for a in addresses), addresses
    assert not listening_addresses([server.pid])


def test_a_changed_environment_gets_spawned_ranks_not_a_stale_server(monkeypatch, cluster):
    # What the server imported may depend on the environment (PYTHONPATH, TORCH_*): ranks
    # that would start from another one are spawned, and the busy server is left alone.
    server = launcher.fork_server()
    monkeypatch.setenv("PDLAB_TEST_SETTING", "1")
    monkeypatch.setattr(launcher.LocalRanks, "_popen", SPAWN)
    with pdlab.Cluster(1) as other:
        assert parents(other) == [os.getpid()]
        assert other.run(os.environ.get, "PDLAB_TEST_SETTING") == ["1"]
    assert launcher.fork_server() is server and parents(cluster) == [server.pid] * 2


def kernel_script(tmp_path: Path, body: str) -> subprocess.Popen:
    """A kernel whose first cluster starts the fork server; ``body`` runs once it is warm."""
    script = tmp_path / "kernel.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time, pdlab
            from pdlab.control import launcher
            pdlab.Cluster(1).shutdown()
            server = launcher.fork_server()
            assert server.warm.wait(120)
            print(server.pid, flush=True)
            """
        )
        + textwrap.dedent(body)
    )
    return subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)


def ranks_of_server(server_pid: int) -> list[int]:
    return pids_running(server_pid, b"pdlab.control.worker")


@pytest.mark.parametrize("when", ["starting", "running"])
def test_forked_ranks_and_the_server_die_with_a_sigkilled_kernel(tmp_path, when):
    # starting: killed as soon as its 4 forked ranks exist; running: once they are ready.
    body = "c = pdlab.Cluster(4)\nprint('running', flush=True)\ntime.sleep(600)\n"
    kernel = kernel_script(tmp_path, body)
    ranks: list[int] = []
    try:
        server = int(kernel.stdout.readline())
        if when == "running":
            assert kernel.stdout.readline().strip() == "running"
        deadline = time.monotonic() + 60
        while len(ranks := ranks_of_server(server)) < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        # 4, or 5 for a moment: a starting rank's own child (fork before exec) bears its name
        # (seen once, in a busy CI run); all of them must go.
        assert len(ranks) >= 4
    finally:
        kernel.kill()
        kernel.wait()
    left = wait_until_gone([server, *ranks], 3)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{left} outlived their kernel (server {server})"


def test_a_killed_server_takes_its_ranks_and_the_next_run_recovers(monkeypatch):
    with pdlab.Cluster(2) as c:
        server = launcher.fork_server()
        ranks = c.run(os.getpid)
        os.kill(server.pid, signal.SIGKILL)
        assert not wait_until_gone(ranks, 3), "the ranks outlived their fork server"
        monkeypatch.setattr(launcher.LocalRanks, "_popen", SPAWN)  # no server left: spawned
        assert c.run(pdlab.rank) == [0, 1]  # restarted by itself
        assert parents(c) == [os.getpid()] * 2
    assert launcher.fork_server() is not server  # replaced by a fresh one
    assert not alive([server.pid])


def test_the_server_refuses_to_fork_once_it_runs_other_threads(tmp_path):
    code = """
        import threading, time, torch
        from pdlab.control import forkserver
        after_import = forkserver.native_threads()
        print(repr(forkserver.fork_hazard(after_import)))
        torch.ones(4096, 4096) @ torch.ones(4096, 4096)  # starts the OpenMP pool
        print(repr(forkserver.fork_hazard(after_import)))
        threading.Thread(target=time.sleep, args=(2,)).start()
        print(repr(forkserver.fork_hazard(forkserver.native_threads())))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})  # fmt: skip
    safe, pool, thread = out.stdout.splitlines()
    assert safe == "''"
    assert "threads" in pool and "threads" in thread


def test_the_server_refuses_to_fork_once_cuda_is_loaded(tmp_path):
    import _ctypes
    import shutil

    fake = tmp_path / "libcuda.so.1"  # a harmless library, mapped under the driver's name
    shutil.copy(_ctypes.__file__, fake)
    code = f"""
        import ctypes, torch
        from pdlab.control import forkserver
        print(forkserver.cuda_driver_loaded())
        ctypes.CDLL({str(fake)!r})
        print(forkserver.cuda_driver_loaded(), forkserver.fork_hazard(forkserver.native_threads()))
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    before, after = out.stdout.splitlines()
    assert before == "False" and after.startswith("True") and "CUDA" in after


def test_a_process_forked_from_the_kernel_leaves_its_fork_server_alone():
    server = launcher.fork_server()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # as a DataLoader worker or a multiprocessing pool would be
        os.write(write, b"1" if launcher.fork_server() is None else b"0")
        launcher.stop_fork_server()  # what an atexit in the child would do
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(child, 0)
    os.close(read)
    assert launcher.fork_server() is server and not server.gone
    with pdlab.Cluster(1) as c:
        assert parents(c) == [server.pid]


def test_leaked_servers_are_caught():
    server = launcher._spawner.submit(forkserver.ForkServer, launcher.rank_environment()).result()
    try:
        assert server.pid in leaked_processes()
    finally:
        server.close()
        launcher.stop(server.process, time.monotonic() + 5)
    assert server.pid not in leaked_processes()


PHASES = ("starting a cluster of 4", "building the model", "first step", "training", "done")


def test_a_change_of_ranks_in_the_dashboard_forks_and_shows_each_phase():
    seen: list[str] = []
    dashboard = pdlab.Dashboard(pdlab.Cluster(2), refresh_s=0.05)
    dashboard.message.observe(lambda change: seen.append(change["new"]), "value")
    try:
        dashboard.start(strategy="dp", model="mlp", steps=3, world_size=4)
        dashboard.wait(timeout=120)
        assert parents(dashboard.cluster) == [launcher.fork_server().pid] * 4
    finally:
        dashboard.close()
        dashboard.cluster.shutdown()
    said = [next(p for p in PHASES if p in text) for text in seen if any(p in text for p in PHASES)]
    assert said == list(PHASES), seen


def test_a_forked_ranks_exit_is_seen_before_its_server_reports_it():
    """A server killed with its ranks never reports their exits: the kernel sees them itself
    (else a call sent before the server's end is read meets dead ranks)."""
    process = subprocess.Popen(["sleep", "60"])  # stands in for a rank: nothing reports its exit
    rank = forkserver.ForkedRank(process.pid, server=None)
    assert not rank.exited() and rank.exit_code() is None
    process.kill()
    process.wait()
    assert rank.exited() and rank.returncode is None  # seen, though nobody reported it


def test_a_rank_whose_main_thread_ended_has_exited_though_its_other_threads_have_not():
    """After a SIGKILL a rank's main thread can end milliseconds before its other threads, and
    the process counts as exited only with the last of them: a call sent in between met dead
    ranks (CI, stop 30). A main thread ended with a thread left running stands in for it."""
    code = (
        "import ctypes, sys, threading, time; threading.Thread(target=time.sleep, args=(60,))"
        ".start(); print(flush=True); sys.stdin.readline(); ctypes.CDLL(None).pthread_exit(None)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        process.stdout.readline()
        forked, spawned = forkserver.ForkedRank(process.pid, server=None), Spawned(process)
        assert not forked.exited() and not spawned.exited()
        process.stdin.write("end your main thread\n")
        process.stdin.flush()
        assert not wait_until_gone([process.pid], 10)  # its main thread is a zombie
        assert len(os.listdir(f"/proc/{process.pid}/task")) == 2  # its other thread runs on
        assert forked.exited() and spawned.exited()
    finally:
        process.kill()
        process.wait()


def test_a_call_moves_sys_path_only_between_the_warm_ups_imports(monkeypatch, tmp_path):
    """A rank's first call brings the kernel's sys.path, which reorders the rank's: under an
    import in flight, that can hide a package it needs halfway (pandas, in CI)."""
    from pdlab.control import protocol, worker
    from pdlab.control.interrupts import Interrupts

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    kernels_path = [str(tmp_path / "first"), *sys.path]
    call = protocol.Call(1, "exec", "1 + 1", workdir=(str(tmp_path), kernels_path))
    replies = []
    with warmup.IMPORTING:  # the warm-up is importing a module
        thread = threading.Thread(
            target=lambda: replies.append(worker._call(call, {}, Interrupts()))
        )
        thread.start()
        time.sleep(0.5)
        assert sys.path[0] != kernels_path[0] and not replies  # the call waits
    thread.join(10)
    assert sys.path[0] == kernels_path[0] and isinstance(replies[0], protocol.Result)
