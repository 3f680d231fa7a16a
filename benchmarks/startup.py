"""Start-up and first-run cost of a pdlab cluster, against torchrun as the baseline.

    python benchmarks/startup.py [--repeats 5] [--idle 8] [--calls 200]

Prints, in one invocation, medians over ``--repeats`` (and the load average before and after,
since these are times on a shared machine):

1. a kernel's first cluster to its first barrier at world sizes 2 and 4 (new processes, as
   ``prestart=False`` starts every cluster), against torchrun starting as many ranks;
2. a new Python process (a kernel) that imports pdlab, starts ``Cluster(2)``, idles
   ``--idle`` s, then runs a 1-step ``pdlab.train`` twice: the first against the second, with
   the kernel's and the ranks' warm-ups (the default), with ``prestart=False`` (no rank
   warm-up), and on ranks forked from the fork server; then what each warm-up step cost;
3. the first run of each strategy on the same ranks (switching strategy), forked and plain,
   and forked after ``--idle`` s (what the ranks' main threads warm up while idle);
4. in a kernel that already ran a cluster, a new ``Cluster(n)`` to its first trained step,
   against torchrun starting n ranks to a barrier, at n = 2 and 4;
5. the warm round trip of a ``run`` at world size 4 that does nothing, prints or logs, what
   a no-op's round trip is made of, and the transport alone (``ECHO``: processes that only
   echo a frame, through reader threads as pdlab's, and read by their main threads);
6. a new kernel's dashboard (no browser): Start to the first point on its plot after
   ``--idle`` s, after a change to 4 ranks, and on those 4 ranks again;
7. each figure of issue 22 beside its target (of the sections run: ``--sections``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from multiprocessing.connection import Connection

import cloudpickle

import pdlab
import pdlab.training.registry
from pdlab.control import keeper, launcher, protocol, warmup

TORCHRUN_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import torch.distributed as dist
    dist.init_process_group("gloo")
    dist.barrier()
    if dist.get_rank() == 0:
        print(time.time(), flush=True)
    dist.barrier()  # gloo may abort a rank whose peer tore down first
    dist.destroy_process_group()
    """
)

# A new kernel (issue 22's first impression): import pdlab, start a cluster, leave it idle,
# then time two 1-step runs; what the kernel's and rank 0's warm-ups spent on each step.
FRESH_KERNEL = textwrap.dedent(
    """
    import json, sys, time
    import pdlab
    from pdlab.control import warmup
    idle, mode, strategy, impl = sys.argv[1:]
    cluster = pdlab.Cluster(2, prestart=mode == "prestart")
    time.sleep(float(idle))
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        pdlab.train(cluster, strategy=strategy, impl=impl, model="gpt", steps=1, batch_size=16)
        runs.append(time.perf_counter() - start)
    ranks = cluster.run(lambda: dict(warmup.timings))
    cluster.shutdown()
    print(json.dumps({"runs": runs, "kernel": warmup.timings, "rank": ranks[0]}))
    """
)
# A new kernel's dashboard: Start to the first point on its loss plot, then after a change
# of ranks, then on those ranks again.
DASHBOARD = textwrap.dedent(
    """
    import json, sys, time
    import pdlab
    cluster = pdlab.Cluster(2)
    dashboard = pdlab.Dashboard(cluster, refresh_s=0.05)
    time.sleep(float(sys.argv[1]))

    def plotted(run):
        tag = run.name.split()[0] + " "
        traces = dashboard.figure.data
        return any(t.name and t.name.startswith(tag) and t.x is not None and len(t.x) for t in traces)

    seconds = []
    for world_size in (2, 4, 4):
        start = time.perf_counter()
        run = dashboard.start(strategy="dp", steps=5, world_size=world_size)
        while not plotted(run) and dashboard.running:
            time.sleep(0.002)
        seconds.append(time.perf_counter() - start)
        dashboard.wait()
    dashboard.close()
    cluster.shutdown()
    print(json.dumps(seconds))
    """
)
# A fresh kernel's first cluster: no-op calls while its ranks warm up, then once they are warm.
CALLS_WHILE_WARMING = textwrap.dedent(
    """
    import json, threading, time
    import pdlab

    def warming():
        return any(t.name == "pdlab-warm-up" for t in threading.enumerate())

    cluster = pdlab.Cluster(2)
    during, after = [], []
    while len(during) < 50 and all(cluster.run(warming)):
        start = time.perf_counter()
        cluster.run(int)
        during.append(time.perf_counter() - start)
    while any(cluster.run(warming)):
        time.sleep(0.2)
    for _ in range(50):
        start = time.perf_counter()
        cluster.run(int)
        after.append(time.perf_counter() - start)
    cluster.shutdown()
    print(json.dumps({"during": during, "after": after}))
    """
)
# A rank reduced to its transport: a frame in, the same frame pickled back; ``threads``: read
# by a reader thread and handed to the main thread through a queue, as pdlab's ranks do.
ECHO = textwrap.dedent(
    """
    import pickle, queue, socket, sys, threading
    from multiprocessing.connection import Connection
    sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    conn = Connection(sock.detach())
    take = conn.recv_bytes
    if sys.argv[2] == "threads":
        frames = queue.SimpleQueue()
        threading.Thread(target=lambda: [frames.put(conn.recv_bytes()) for _ in iter(int, 1)], daemon=True).start()
        take = frames.get
    while (frame := take()) != b"end":
        conn.send_bytes(pickle.dumps(pickle.loads(frame)))
    """
)
FIRST_RUNS = [("dp", "scratch"), ("dp", "torch")]
SWITCHES = [
    ("dp", "torch"),
    ("tp", "scratch"),
    ("tp", "torch"),
    ("pp-1f1b", "scratch"),
    ("pp-1f1b", "torch"),
    ("zero1", "torch"),
    ("zero3", "scratch"),
    ("zero3", "torch"),
]


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def torchrun_to_barrier(world_size: int, script: str) -> float:
    """Seconds from launching torchrun until rank 0 has passed its first barrier."""
    start = time.time()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={world_size}",
            "--standalone",
            script,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // world_size))},
    )
    return float(out.stdout.split()[-1]) - start


def pdlab_to_barrier(world_size: int) -> float:
    """A kernel's first cluster: new processes (``Cluster`` returns after every barrier)."""
    start = time.time()
    cluster = pdlab.Cluster(world_size, device="cpu", prestart=False)
    elapsed = time.time() - start
    cluster.shutdown()
    return elapsed


def fresh_kernel_runs(idle: float, prestart: bool, strategy: str, impl: str) -> list[float]:
    """First and second 1-step run on a new kernel's first cluster, idle ``idle`` s; the
    kernel's and rank 0's warm-up steps go to ``WARM_UPS``."""
    mode = "prestart" if prestart else "plain"
    out = subprocess.run(
        [sys.executable, "-c", FRESH_KERNEL, str(idle), mode, strategy, impl],
        capture_output=True,
        text=True,
        check=True,
    )
    measured = json.loads(out.stdout.splitlines()[-1])
    if prestart:
        WARM_UPS.append({"kernel": measured["kernel"], "rank": measured["rank"]})
    return measured["runs"]


WARM_UPS: list[dict[str, dict[str, float]]] = []


def dashboard_first_points(idle: float) -> list[float]:
    """Seconds from Start to the first plotted point in a new kernel's dashboard: on its
    first cluster after ``idle`` s, after a change to 4 ranks, on those 4 ranks again."""
    out = subprocess.run(
        [sys.executable, "-c", DASHBOARD, str(idle)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def calls_while_warming() -> dict[str, list[float]]:
    """Seconds of no-op calls on a fresh kernel's first cluster, during its warm-up and after."""
    out = subprocess.run(
        [sys.executable, "-c", CALLS_WHILE_WARMING], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def step_seconds(cluster: pdlab.Cluster, strategy: str, impl: str) -> float:
    pipelined = pdlab.training.registry.get(strategy).micro_batched
    micro_batches = cluster.world_size if pipelined else 1  # torch's 1F1B needs one a stage
    start = time.perf_counter()
    pdlab.train(
        cluster, strategy=strategy, impl=impl, model="gpt", steps=1, micro_batches=micro_batches
    )
    return time.perf_counter() - start


def against_torchrun(ours, world_size: int, script: str, repeats: int) -> tuple[float, float]:
    """Medians of ``ours(world_size)`` and of torchrun to a barrier, run alternately."""
    pairs = [(ours(world_size), torchrun_to_barrier(world_size, script)) for _ in range(repeats)]
    return median([a for a, _ in pairs]), median([b for _, b in pairs])


def forked_runs(idle: float, strategy: str, impl: str) -> list[float]:
    """First and second 1-step run on a cluster forked from the warm fork server."""
    with pdlab.Cluster(2) as cluster:
        time.sleep(idle)
        return [step_seconds(cluster, strategy, impl) for _ in range(2)]


def switching(world_size: int, prestart: bool, idle: float = 0.0) -> dict[str, float]:
    """Each strategy's first 1-step run on the same ranks, after a dp run, the cluster
    idle ``idle`` s first."""
    with pdlab.Cluster(world_size, prestart=prestart) as cluster:
        time.sleep(idle)
        step_seconds(cluster, "dp", "scratch")
        return {f"{s}/{i}": step_seconds(cluster, s, i) for s, i in SWITCHES}


def to_first_step(world_size: int) -> float:
    """A new ``Cluster(world_size)`` (forked: this kernel ran one) to its first trained step."""
    start = time.perf_counter()
    cluster = pdlab.Cluster(world_size)
    pdlab.train(cluster, strategy="dp", model="gpt", steps=1)
    elapsed = time.perf_counter() - start
    cluster.shutdown()
    return elapsed


def _prints() -> None:
    print("hello")


def _logs() -> None:
    pdlab.log(value=1.0)


WARM_CALLS = {"no-op": int, "print": _prints, "pdlab.log": _logs}


def _cpu_s(pid: int) -> float:
    """CPU seconds process ``pid`` has used, all its threads (user and system)."""
    fields = keeper.stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm_round_trip_ms(world_size: int, calls: int) -> tuple[dict[str, float], tuple[float, float]]:
    """Median ms of a warm ``run`` of each of ``WARM_CALLS``, on ``world_size`` ranks; and
    the CPU a no-op call costs, in us: the kernel's (every thread), the ranks' summed."""
    medians, cpu_us = {}, (0.0, 0.0)
    with pdlab.Cluster(world_size, device="cpu") as cluster:
        pids = cluster.run(os.getpid)
        for name, fn in WARM_CALLS.items():
            times = []
            kernel, ranks = time.process_time(), sum(map(_cpu_s, pids))
            for _ in range(calls + 1):  # the first is not counted: it unpickles ``fn``
                t = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):  # the ranks' "[rank r] hello"
                    cluster.run(fn)
                times.append(time.perf_counter() - t)
            medians[name] = median(times[1:]) * 1000
            if name == "no-op":
                kernel, ranks = time.process_time() - kernel, sum(map(_cpu_s, pids)) - ranks
                cpu_us = (kernel / (calls + 1) * 1e6, ranks / (calls + 1) * 1e6)
    return medians, cpu_us


def _per_call_us(fn, n: int = 2000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def _hop_us(pair: tuple[Connection, Connection], n: int = 2000) -> float:
    """Microseconds one message takes from one thread to another, woken, over ``pair``:
    half a ping-pong's round trip."""
    ours, theirs = pair
    echo = threading.Thread(
        target=lambda: [theirs.send_bytes(theirs.recv_bytes()) for _ in range(n)]
    )
    echo.start()
    start = time.perf_counter()
    for _ in range(n):
        ours.send_bytes(b"x" * 64)
        ours.recv_bytes()
    echo.join()
    return (time.perf_counter() - start) / n / 2 * 1e6


def round_trip_parts(world_size: int) -> dict[str, float]:
    """What a warm no-op call's round trip is made of, each part measured here alone (us):
    encoding and decoding its messages (all ranks' work summed), with the wire's encoder and
    with cloudpickle for all (as before issue 22); a thread woken through a queue; a frame
    between two threads over TCP loopback."""
    payload = cloudpickle.dumps((int, (), {}))
    call = protocol.Call(1, "call", payload)
    result = protocol.Result(1, cloudpickle.dumps(0), "builtins.int", {"0": 3})

    def messages(encode) -> None:
        for message in (call, result):  # the kernel encodes the calls, each rank its result
            for _ in range(world_size):
                pickle.loads(encode(message))

    queue_pair = queue.SimpleQueue(), queue.SimpleQueue()

    def pong() -> None:
        for _ in range(2000):
            queue_pair[1].put(queue_pair[0].get())

    echo = threading.Thread(target=pong)
    echo.start()
    start = time.perf_counter()
    for _ in range(2000):
        queue_pair[0].put(1)
        queue_pair[1].get()
    echo.join()
    woken = (time.perf_counter() - start) / 2000 / 2 * 1e6
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        for sock in (client, accepted):
            protocol.no_delay(sock)
        pair = Connection(client.detach()), Connection(accepted.detach())
        hop = _hop_us(pair)
        for conn in pair:
            conn.close()
    return {
        f"encode+decode, world {world_size}": _per_call_us(lambda: messages(protocol.encode)),
        "the same, cloudpickle for all": _per_call_us(lambda: messages(cloudpickle.dumps)),
        "a thread woken through a queue": woken,
        "a frame over TCP loopback to a thread": hop,
    }


def _forward(conn: Connection, to: queue.SimpleQueue) -> None:
    with contextlib.suppress(EOFError, OSError):
        while True:
            to.put(conn.recv_bytes())


def transport_alone_us(world_size: int, calls: int, threads: bool) -> float:
    """Median us of a round trip to ``world_size`` processes that only echo a pickled frame
    (``ECHO``): the transport with none of pdlab's work. ``threads``: both ends read through
    reader threads and queues, as pdlab's kernel and ranks do; else each main thread reads
    its own sockets."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        mode = "threads" if threads else "main"
        port = str(server.getsockname()[1])
        echoes = [subprocess.Popen([sys.executable, "-c", ECHO, port, mode]) for _ in range(world_size)]  # fmt: skip
        conns = []
        for _ in echoes:
            sock, _ = server.accept()
            protocol.no_delay(sock)
            conns.append(Connection(sock.detach()))
    replies: queue.SimpleQueue = queue.SimpleQueue()
    for conn in conns if threads else ():
        threading.Thread(target=_forward, args=(conn, replies), daemon=True).start()
    frame, times = pickle.dumps(("call", 1)), []
    for _ in range(calls + 100):  # the first 100 not counted
        start = time.perf_counter()
        for conn in conns:
            conn.send_bytes(frame)
        for conn in conns:
            pickle.loads(replies.get() if threads else conn.recv_bytes())
        times.append(time.perf_counter() - start)
    for conn in conns:
        conn.send_bytes(b"end")
    for echo in echoes:
        echo.wait(timeout=30)
    for conn in conns:
        conn.close()
    return median(times[100:]) * 1e6


Figure = tuple[str, float, float, str]  # issue 22: what, measured, target, unit


def first_barriers(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    r = args.repeats
    print(f"\n1. a kernel's first cluster to its first barrier (new processes), median of {r}")
    print(f"{'world':>5} {'pdlab s':>8} {'torchrun s':>11} {'ratio':>6}")
    for n in (2, 4):
        ours, base = against_torchrun(pdlab_to_barrier, n, torchrun_script, r)
        print(f"{n:>5} {ours:>8.2f} {base:>11.2f} {ours / base:>6.2f}")
    return []


def first_runs(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    r, figures = args.repeats, []
    print(
        f"\n2. new kernel: Cluster(2), idle {args.idle:g} s, then the first vs the second "
        f"1-step run (gpt, batch 16), median of {r}"
    )
    print(f"{'ranks':<34} {'run':<11} {'first s':>8} {'second s':>9} {'ratio':>6}")
    kinds = {
        "new kernel, warming up (default)": lambda s, i: fresh_kernel_runs(args.idle, True, s, i),
        "new kernel, prestart=False": lambda s, i: fresh_kernel_runs(args.idle, False, s, i),
        "forked from the fork server": lambda s, i: forked_runs(args.idle, s, i),
    }
    for name, runs in kinds.items():
        for strategy, impl in FIRST_RUNS:
            first, second = zip(*(runs(strategy, impl) for _ in range(r)), strict=True)
            a, b = median(list(first)), median(list(second))
            print(f"{name:<34} {strategy + '/' + impl:<11} {a:>8.3f} {b:>9.3f} {a / b:>6.2f}")
            if name.endswith("(default)"):
                what = f"new kernel, idle {args.idle:g} s: first/second {strategy}/{impl}"
                figures.append((what, a / b, 3.0, "x"))
    for side in ("kernel", "rank"):
        # A step not done yet when its kernel asked (the warm-up outlasting the idle time)
        # is left out of its median.
        done = [w[side] for w in WARM_UPS]
        names = dict.fromkeys(k for d in done for k in d)
        steps = {k: median([d[k] for d in done if k in d]) for k in names}
        print(
            f"the {side}'s warm-up (what its first run no longer pays), median s a step: "
            + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())
            + f"; in all {sum(steps.values()):.2f} s"
        )
    calls = [calls_while_warming() for _ in range(r)]
    during = [t * 1000 for c in calls for t in c["during"]]
    after = [t * 1000 for c in calls for t in c["after"]]
    print(
        f"no-op call on a fresh kernel's first cluster while its ranks warm up: median "
        f"{median(during):.1f} ms, max {max(during):.0f} ms ({len(during)} calls); once warm: "
        f"median {median(after):.1f} ms, max {max(after):.0f} ms"
    )
    return figures


def switches(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    r, figures = args.repeats, []
    print(f"\n3. switching strategy: first 1-step run of each on the same ranks, median of {r}")
    print(f"{'world':>5} {'ranks':<8} " + " ".join(f"{s + '/' + i:>15}" for s, i in SWITCHES))
    idle = f"idle {args.idle:g} s"
    for n in (2, 4):
        kinds = ((True, 0.0, "forked"), (False, 0.0, "plain"), (True, args.idle, idle))
        for prestart, seconds, kind in kinds:
            runs = [switching(n, prestart, seconds) for _ in range(r)]
            cells = " ".join(f"{median([run[k] for run in runs]):>15.2f}" for k in runs[0])
            print(f"{n:>5} {kind:<8} {cells}")
            if n == 4 and prestart:
                tp = median([run["tp/torch"] for run in runs])
                when = f"forked, {idle} first" if seconds else "forked, back to back"
                figures.append((f"tp/torch, world 4, first run ({when})", tp, 0.5, "s"))
    return figures


def new_clusters(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    print(
        "\n4. new Cluster(n) in a kernel that ran one (fork server warm) to its first trained "
        f"step (dp, gpt), median of {args.repeats}"
    )
    print(f"{'world':>5} {'pdlab s':>8} {'torchrun to barrier s':>22} {'ratio':>6}")
    for n in (2, 4):
        ours, base = against_torchrun(to_first_step, n, torchrun_script, args.repeats)
        print(f"{n:>5} {ours:>8.2f} {base:>22.2f} {ours / base:>6.2f}")
    return []


def round_trips(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    medians, (kernel, ranks) = warm_round_trip_ms(4, args.calls)
    calls = ", ".join(f"{name} {ms:.3f} ms" for name, ms in medians.items())
    print(f"\n5. warm run, world 4, median over {args.calls} calls: {calls}")
    print(
        f"CPU a no-op call costs: the kernel {kernel:.0f} us (all its threads), the 4 ranks "
        f"{ranks:.0f} us together; {kernel + ranks:.0f} us on {os.cpu_count()} core(s) is at "
        f"least {(kernel + ranks) / os.cpu_count() / 1000:.3f} ms of wall time"
    )
    parts = ", ".join(f"{k} {v:.1f} us" for k, v in round_trip_parts(4).items())
    print(f"what a no-op's round trip is made of, each measured alone: {parts}")
    alone = {
        "through reader threads and queues, as pdlab": transport_alone_us(4, args.calls, True),
        "read by the main threads": transport_alone_us(4, args.calls, False),
    }
    print(
        "the transport alone (4 processes echoing a pickled frame, none of pdlab's work), "
        "median round trip: " + ", ".join(f"{k} {v:.0f} us" for k, v in alone.items())
    )
    return [("warm no-op round trip, world 4", medians["no-op"], 0.2, "ms")]


def dashboards(args: argparse.Namespace, torchrun_script: str) -> list[Figure]:
    r = args.repeats
    points = [dashboard_first_points(args.idle) for _ in range(r)]
    labels = (f"after {args.idle:g} s idle, 2 ranks", "after a change to 4 ranks", "4 ranks again")
    print(f"\n6. a new kernel's dashboard (no browser): Start to the first point, median of {r}")
    for i, label in enumerate(labels):
        seconds = [p[i] for p in points]
        print(f"  {label}: {median(seconds):.2f} s (max {max(seconds):.2f} s)")
    return [
        ("dashboard Start to first point, new kernel", median([p[0] for p in points]), 1.0, "s"),
        ("dashboard Start to first point, changed ranks", median([p[1] for p in points]), 2.0, "s"),
    ]


SECTIONS = {
    "1": first_barriers,
    "2": first_runs,
    "3": switches,
    "4": new_clusters,
    "5": round_trips,
    "6": dashboards,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--idle", type=float, default=8.0, help="seconds a fresh cluster idles")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--sections", default="123456", help="which to run, e.g. 256")
    args = parser.parse_args()

    print(f"host: {os.cpu_count()} CPU(s), python {sys.version.split()[0]}; {load()}")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(TORCHRUN_SCRIPT)
    # This kernel's first cluster starts the fork server (sections 2-4 fork from it), and
    # its warm-up: once it is done, this kernel's own imports share no GIL with a section.
    with pdlab.Cluster(1) as first:
        pdlab.train(first, strategy="single", model="gpt", steps=1)
    launcher.fork_server().warm.wait()
    warmup.in_kernel().join()
    figures = [fig for key in args.sections for fig in SECTIONS[key](args, f.name)]
    os.unlink(f.name)

    print("\n7. issue 22's figures and targets")
    for what, value, target, unit in figures:
        met = "met" if value <= target else "NOT met"
        print(f"  {what:<52} {value:>7.3f} {unit:<2} target <= {target:g} {unit:<2} {met}")
    print(f"\n{load()}")


if __name__ == "__main__":
    main()
