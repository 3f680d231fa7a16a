"""A rank process: joins the process group, then runs what the kernel sends until told to stop.

Started by ``pdlab.Cluster`` as ``python -m pdlab.control.worker --connect 127.0.0.1:PORT`` (never
forked from the kernel, which has threads; forked from ``pdlab.control.forkserver``, which has none),
or by torchrun on another host to attach to a kernel's cluster. The connection to the kernel
is authenticated (HMAC challenge with the cluster's token, from ``PDLAB_TOKEN``) before
anything is unpickled on either side.

Threads here, and why:
- main: runs calls one at a time (user code expects the main thread: signals, CUDA init).
- reader: takes messages from the kernel; turns ``interrupt`` into a SIGINT on the main
  thread and exits the process at once on ``abort`` or when the kernel goes away.
- interrupts: sends that SIGINT again until it is raised (``pdlab.control.interrupts``).
- output pump: fd 1 and 2 are pipes read here, so native output (gloo, NCCL, C extensions)
  reaches the kernel too, prefixed by rank, in order with the call's result.
- watchdog: exits when the parent (the rank's keeper, ``pdlab.control.keeper``) dies, even
  before the connection exists.
- warm-up (``--warm-up``): imports the training stack while no call runs (``pdlab.control.warmup``).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import gc
import json
import linecache
import os
import queue
import select
import signal
import struct
import sys
import termios
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing import AuthenticationError
from typing import Any

import cloudpickle

from pdlab.control import keeper, protocol
from pdlab.control.interrupts import Interrupts

HEARTBEAT_S = 0.5
_FLUSH_MARK = b"\x00pdlab-flush\x00"


class Channel:
    """The authenticated connection to the kernel; ``send`` is safe from any thread."""

    def __init__(self, address: tuple[str, int], token: bytes):
        self.conn = protocol.connect_to_kernel(address, token)
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:
            protocol.send(self.conn, message)

    def recv(self) -> Any:
        return protocol.recv(self.conn)


class OutputPump:
    """Moves everything written to fd 1 and 2 to the kernel, one thread per stream."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self._flushed = {1: threading.Event(), 2: threading.Event()}
        self._read_ends: dict[int, int] = {}
        # Held by a pump from the moment its pipe has data until that data is sent.
        self._holding = {1: threading.Lock(), 2: threading.Lock()}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            self._read_ends[fd] = read_end
            threading.Thread(target=self._pump, args=(read_end, fd, name), daemon=True).start()
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115

    def _pump(self, read_end: int, fd: int, name: str) -> None:
        # Chunks go as they come; the kernel joins them into lines per rank and stream.
        while select.select([read_end], [], [])[0]:
            with self._holding[fd]:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    return
                text = chunk.replace(_FLUSH_MARK, b"")
                if text:
                    self.channel.send(
                        protocol.Output(name, text.decode(errors="replace"), time.time())
                    )
            if len(text) != len(chunk):
                self._flushed[fd].set()

    def flush(self) -> None:
        """Return once all output written so far has been sent (so it precedes the result)."""
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, event in self._flushed.items():
            with self._holding[fd]:
                # An empty pipe and a pump holding nothing: all is sent. Most calls print
                # nothing, and the mark costs two thread wake-ups a stream, a third of a
                # warm call's round trip (benchmarks/startup.py).
                if not _unread(self._read_ends[fd]):
                    continue
            event.clear()
            os.write(fd, _FLUSH_MARK)
            event.wait(5)


def _unread(fd: int) -> int:
    """Bytes waiting in the pipe ``fd`` reads."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def set_parent_death_signal(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us when our parent (a rank's keeper; the fork server's kernel)
    dies; the watchdog covers other systems."""
    if not keeper.prctl(keeper.PR_SET_PDEATHSIG, signal.SIGKILL):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(HEARTBEAT_S)
    os._exit(1)


def _init_process_group(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from pdlab.control import runtime
    from pdlab.measure import flight

    if os.environ.get("PDLAB_FLIGHT_RECORDER") != "0":  # "0": off, for benchmarks to compare
        # Before the group forms: its first barrier is op #1. The black box goes beside the
        # store, in the cluster's private temp dir (ranks torchrun started have none).
        box = args.store and flight.black_box_path(os.path.dirname(args.store), args.rank)
        flight.install(black_box=box or None)
    torch.set_num_threads(args.threads)
    timeout = timedelta(seconds=args.timeout)
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", args.rank))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    runtime.bind(device=device)
    if args.store:  # one machine: a private FileStore, so nothing listens for rendezvous
        store = dist.FileStore(args.store, args.world_size)
        dist.init_process_group(
            args.backend, store=store, rank=args.rank, world_size=args.world_size, timeout=timeout
        )
    else:  # started by torchrun: its env:// rendezvous
        dist.init_process_group(args.backend, timeout=timeout)
    if args.backend == "nccl":
        dist.barrier(device_ids=[device.index])
    else:
        dist.barrier()


def _run_source(source: str, namespace: dict, call_id: int) -> Any:
    """Run a cell's code like IPython: the value of a final expression is returned."""
    filename = f"<pdlab-cell-{call_id}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
    exec(compile(tree, filename, "exec"), namespace)
    if last is not None:
        return eval(compile(ast.Expression(last.value), filename, "eval"), namespace)
    return None


def _follow(workdir: tuple[str, list[str]]) -> None:
    """Work in the kernel's directory, and import from every folder the kernel imports from
    (its order first): a notebook's relative paths and modules beside it work on the rank."""
    cwd, path = workdir
    with contextlib.suppress(OSError):  # a rank on another host may not have that folder
        os.chdir(cwd)
    sys.path[:] = [*path, *(p for p in sys.path if p not in path)]


def _call(call: protocol.Call, namespace: dict, interrupts: Interrupts) -> Any:
    """Run one call; always returns the reply to send (a result or the error's traceback)."""
    from pdlab.control.runtime import collective_counts
    from pdlab.control.scripts import group_problem
    from pdlab.control.warmup import holding

    try:
        interrupts.call_started()  # from here an interrupt may raise KeyboardInterrupt
        try:
            # Not beside the warm-up's import (pdlab.control.warmup): nor may sys.path change under
            # it (CI: pandas half-imported when a first call reordered sys.path mid-import).
            with holding():
                if call.workdir is not None:
                    _follow(call.workdir)
                if call.kind == "exec":
                    value = _run_source(call.payload, namespace, call.call_id)
                else:
                    fn, args, kwargs = cloudpickle.loads(call.payload)
                    value = fn(*args, **kwargs)
        finally:
            interrupts.call_over()
        try:
            pickled = cloudpickle.dumps(value)
        except Exception as exc:
            raise TypeError(f"the return value can't be pickled back to the kernel: {exc}") from exc
        # The kernel compares the counts after a failed call to tell if the group is in step.
        return protocol.Result(
            call.call_id,
            pickled,
            protocol.type_name(value),
            collective_counts(),
            group_problem(),
        )
    except BaseException as exc:  # KeyboardInterrupt too: report it, stay alive
        return protocol.Error(
            call.call_id,
            type(exc).__name__,
            "".join(traceback.format_exception(exc)),
            collective_counts(),
            group_problem(),
        )


def _locate(in_call: bool) -> Any:
    """Where this rank is (``pdlab.measure.flight.locate``), from the reader thread; never raises."""
    from pdlab.control import runtime
    from pdlab.measure import flight
    from pdlab.measure.where import Location

    try:
        return flight.locate(threading.main_thread().ident, in_call)
    except Exception as exc:  # a broken answer must not end the reader, and so the rank
        return Location(runtime.rank(), "unknown", line=f"locate failed: {exc!r}")


def _send_metrics(channel: Channel, record: dict[str, Any]) -> None:
    types = ", ".join(f"{k}: {protocol.type_name(v)}" for k, v in record.items())
    channel.send(protocol.Metrics(cloudpickle.dumps(record), types))


def _serve(channel: Channel, pump: OutputPump, warm_up: bool) -> None:
    from pdlab.control import rich_output, runtime, scripts, warmup

    runtime.bind(
        sink=lambda record: _send_metrics(channel, record), control_fd=channel.conn.fileno()
    )
    rich_output.bind(channel.send, pump.flush)
    scripts.install()
    # "__main__", so a whole script pasted into %%ranks runs its `if __name__ == "__main__":`
    namespace: dict[str, Any] = {"__name__": "__main__", "display": rich_output.display}
    exec("import torch, torch.distributed as dist, pdlab", namespace)
    calls: queue.SimpleQueue = queue.SimpleQueue()
    interrupts = Interrupts()
    interrupts.install()
    if warm_up:
        warmup.in_background(calls)

    def read() -> None:
        try:
            while True:
                message = channel.recv()
                if isinstance(message, protocol.Interrupt):
                    interrupts.request()
                elif isinstance(message, protocol.Abort):
                    os._exit(1)
                elif isinstance(message, protocol.Where):
                    channel.send(
                        protocol.Here(message.request_id, _locate(interrupts.running.is_set()))
                    )
                else:
                    calls.put(message)
                    if isinstance(message, protocol.Shutdown):
                        return  # the kernel may close the connection now: that is no error
        except BaseException:
            os._exit(1)  # the kernel is gone, or its stream is unreadable: nothing to serve

    threading.Thread(target=read, daemon=True).start()
    while isinstance(call := warmup.next_call(calls), protocol.Call):
        reply = _call(call, namespace, interrupts)
        rich_output.flush()  # a widget's last change
        pump.flush()
        channel.send(reply)
    warmup.stop()


def _put_back_the_users_environment() -> None:
    """Undo what only this process's start needed (``protocol.WORKER_ONLY``: PYTHONPATH to
    import pdlab): code run here, and processes it starts, see the user's environment."""
    for name, value in json.loads(os.environ.pop(protocol.WORKER_ONLY, "{}")).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pdlab.control.worker", description=__doc__)
    parser.add_argument("--connect", required=True, help="HOST:PORT of the kernel's cluster")
    parser.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)))
    parser.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)))
    parser.add_argument("--backend", default=os.environ.get("PDLAB_BACKEND", "gloo"))
    parser.add_argument("--device", default=os.environ.get("PDLAB_DEVICE", "cpu"))
    parser.add_argument("--store", help="FileStore path (one machine); torchrun's env:// if unset")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout, s")
    # The host's cores shared by its ranks (torchrun's LOCAL_WORLD_SIZE): each rank taking
    # every core oversubscribed 2 cores with 4 ranks' threads, ~10x slower steps.
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // local_ranks))
    parser.add_argument("--parent-pid", type=int, help="exit when this process dies")
    parser.add_argument(
        "--warm-up", action="store_true", help="import the training stack while idle"
    )
    args = parser.parse_args(argv)

    if args.parent_pid:
        # Started here, by the kernel or its fork server: from now on this is the rank, and
        # its parent the keeper that ends what it starts once it, or the kernel, is gone.
        parent = keeper.split(args.parent_pid, ["pdlab.control.keeper", f"--rank={args.rank}"])
        set_parent_death_signal(parent)
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _put_back_the_users_environment()
    token = os.environ.pop("PDLAB_TOKEN", "").encode()
    if not token:
        sys.exit(
            "pdlab.control.worker: set PDLAB_TOKEN to the cluster's token (see Cluster.attach_command)"
        )
    host, _, port = args.connect.rpartition(":")
    try:
        channel = Channel((host, int(port)), token)
    except (ConnectionError, AuthenticationError) as exc:  # said in the start's error
        sys.exit(f"pdlab.control.worker: rank {args.rank} could not connect: {exc}")
    channel.send(protocol.Hello(args.rank, os.getpid(), os.uname().nodename))
    pump = OutputPump(channel)
    try:
        _init_process_group(args)
    except BaseException as exc:
        pump.flush()
        channel.send(protocol.StartFailed("".join(traceback.format_exception(exc))))
        raise SystemExit(1) from exc
    from pdlab.control.runtime import collective_counts  # torch is loaded by now

    channel.send(protocol.Ready(collective_counts()))
    _serve(channel, pump, args.warm_up)
    import torch.distributed as dist

    dist.destroy_process_group()
    # The interpreter's last collections would walk every object of torch and the training
    # stack: 1.5-3.5 s of CPU before a rank is gone, a change of ranks waiting on it.
    gc.freeze()


if __name__ == "__main__":
    main()
