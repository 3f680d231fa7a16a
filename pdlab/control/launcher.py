"""Starting ranks: which backend and device, the rank processes on this machine, and the
torchrun command that starts them on other hosts instead.

Local ranks are ``pdlab.control.worker`` processes, one per rank, joined through a ``FileStore`` in a
private temp dir, so nothing listens for rendezvous; gloo is pinned to the loopback interface.
The first cluster of a kernel starts them as new processes (``python -m pdlab.control.worker``; never
forked from the kernel, which has threads), then starts a fork server (``pdlab.control.forkserver``)
that has imported torch and the training stack; later clusters, restarts and the
dashboard's changes of size have their ranks forked from it, warm, in milliseconds.
``Cluster(..., prestart=False)`` starts plain processes only.

Processes are started from one long-lived thread: Linux's parent-death signal fires when the
*thread* that started a child exits, so a cluster built from a short-lived thread (a
dashboard callback) must not be their parent.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pdlab.control import forkserver, keeper, protocol
from pdlab.control.processes import Spawned

BACKENDS = ("gloo", "nccl")
DEVICES = ("cpu", "cuda")

_spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pdlab-spawner")


def choose_backend(
    world_size: int, backend: str | None, device: str | None, gpus: int
) -> tuple[str, str, str | None]:
    """Pick ``(backend, device, warning)`` for ``world_size`` ranks on a host with ``gpus``.

    NCCL when every rank has its own GPU; gloo with CUDA tensors when ranks must share GPUs
    (NCCL refuses two ranks on one GPU); gloo on CPU without GPUs.
    """
    if backend not in (None, *BACKENDS):
        raise ValueError(
            f"unknown backend {backend!r}: use 'gloo' (CPU, or ranks sharing GPUs), "
            "'nccl' (one GPU per rank), or None to choose automatically"
        )
    if device not in (None, *DEVICES):
        raise ValueError(f"unknown device {device!r}: use 'cpu', 'cuda', or None for automatic")
    if device is None:
        device = "cuda" if gpus else "cpu"
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' but no GPU is visible: use device='cpu' (gloo)")
    if backend == "nccl" and device == "cpu":
        raise ValueError("NCCL runs on GPUs only: use backend='gloo' for device='cpu'")
    if backend == "nccl" and gpus < world_size:
        raise ValueError(
            f"NCCL needs one GPU per rank: world_size={world_size} but {gpus} GPU(s) visible. "
            f"Use world_size<={gpus}, or backend='gloo' so ranks share the GPU(s)"
        )
    if backend is None:
        backend = "nccl" if device == "cuda" and gpus >= world_size else "gloo"
    note = None
    if device == "cuda" and backend == "gloo" and gpus < world_size:
        note = (
            f"pdlab: {world_size} ranks share {gpus} GPU(s) over gloo with CUDA tensors "
            "(NCCL refuses two ranks on one GPU)"
        )
    return backend, device, note


def visible_gpus() -> int:
    """GPUs torch can use here (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


RANK_BYTES = 300 * 2**20  # a rank's resident memory at start: Python, torch (~220 MB), gloo


def check_memory(world_size: int) -> None:
    """Refuse a world size whose ranks could not all start in this machine's memory."""
    available = available_memory()
    if available is not None and world_size * RANK_BYTES > available:
        raise ValueError(
            f"{world_size} ranks would need about {world_size * RANK_BYTES / 2**30:.1f} GiB "
            f"just to start (~{RANK_BYTES // 2**20} MiB each: Python and torch), and this "
            f"machine has {available / 2**30:.1f} GiB available: use world_size <= "
            f"{max(1, available // RANK_BYTES)}"
        )


def available_memory() -> int | None:
    """Bytes of memory available for new processes (Linux's MemAvailable), None elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux), for GLOO_SOCKET_IFNAME."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), None)


@dataclass(frozen=True)
class RankSettings:
    """What every rank of one cluster start is told."""

    world_size: int
    backend: str
    device: str
    timeout: float  # seconds a collective may wait for peers
    threads: int  # CPU threads per rank
    token: bytes  # the control channel's shared secret
    prestart: bool = True  # fork them from a warm fork server when one is ready; warm them up


def private_dir() -> str:
    """A new temp dir only we can read (mode 0700), named after this process.

    The name carries our PID and start time, so a later kernel can tell that the process
    that made it is gone (killed by SIGKILL: nothing ran to remove it) and remove it
    (``remove_stale_dirs``).
    """
    return tempfile.mkdtemp(prefix=f"pdlab-{os.getpid()}-{_start_time(os.getpid())}-")


def remove_stale_dirs() -> list[str]:
    """Remove our user's ``private_dir``s whose kernel process is gone; returns them."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob("pdlab-*-*-*"):
        pid, started = path.name.split("-")[1:3]
        try:
            mine = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and _start_time(int(pid)) != started:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped (SIGSTOP, Ctrl-Z, a debugger): it can't run."""
    try:
        state = keeper.stat_fields(pid)[0]
    except (OSError, IndexError):
        return False
    return state in ("T", "t")


def _start_time(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot), or "" if there is none."""
    try:
        return keeper.stat_fields(pid)[19]
    except (OSError, IndexError):
        return ""


def rank_environment() -> dict[str, str]:
    """The environment every local rank starts from (before its per-rank variables): ours,
    with pdlab and the working directory on the path, unbuffered output, gloo on loopback.

    A fork server imports torch in exactly this environment, so it serves only clusters
    whose ranks would start from the same one.
    """
    env = dict(os.environ)
    package_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    paths = [package_root, os.getcwd(), env.get("PYTHONPATH", "")]
    # For the rank's own start only: the worker puts back what the user had (WORKER_ONLY).
    env[protocol.WORKER_ONLY] = json.dumps(
        {k: env.get(k) for k in ("PYTHONPATH", "PYTHONUNBUFFERED")}
    )
    env.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONUNBUFFERED="1")
    if lo := loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = lo  # gloo binds the hostname's address otherwise
    return env


class LocalRanks:
    """The rank processes of one cluster start on this machine; logs and store in ``tmpdir``."""

    def __init__(self, settings: RankSettings, control_port: int, tmpdir: str):
        self.settings = settings
        self.control_port = control_port
        self.tmpdir = tmpdir
        self.base_environment = rank_environment()
        self.server = fork_server_for(self.base_environment) if settings.prestart else None
        self.master_port = free_loopback_port()  # for scripts that read it; nothing listens
        self.run_id = str(uuid.uuid4())  # torchrun --standalone's rendezvous id

    def spawn(self, rank: int) -> Spawned | forkserver.ForkedRank:
        """Start rank ``rank``: forked from the fork server when there is one for us, else a
        new process (from the long-lived spawner thread; see the module docstring)."""
        if self.server is not None:
            args = self.arguments(rank, parent_pid=self.server.pid)
            try:
                return self.server.fork(
                    args, self.environment(rank), os.getcwd(), self.log_path(rank)
                )
            except forkserver.ForkRefused:
                self.server = None  # it exited, or can't fork safely: start processes
        return Spawned(_spawner.submit(self._popen, rank).result())

    def prestart_next(self) -> None:
        """Have a fork server ready for the next cluster start (see ``keep_fork_server``)."""
        if self.settings.prestart:
            keep_fork_server(self.base_environment)

    def arguments(self, rank: int, parent_pid: int) -> list[str]:
        """``pdlab.control.worker``'s command-line arguments for rank ``rank``."""
        s = self.settings
        return [
            f"--connect=127.0.0.1:{self.control_port}",
            f"--rank={rank}",
            f"--world-size={s.world_size}",
            f"--backend={s.backend}",
            f"--device={s.device}",
            f"--store={os.path.join(self.tmpdir, 'store')}",
            f"--timeout={s.timeout}",
            f"--threads={s.threads}",
            f"--parent-pid={parent_pid}",
            *(["--warm-up"] if s.prestart else []),
        ]

    def environment(self, rank: int) -> dict[str, str]:
        """Rank ``rank``'s whole environment."""
        s = self.settings
        return {
            **self.base_environment,
            "PDLAB_TOKEN": s.token.decode(),
            "OMP_NUM_THREADS": str(s.threads),
            **torchrun_environment(rank, s.world_size, self.master_port, self.run_id),
            # Where torchrun's @record writes a rank's error (torchrun: its log folder).
            "TORCHELASTIC_ERROR_FILE": os.path.join(self.tmpdir, f"error-{rank}.json"),
        }

    def _popen(self, rank: int) -> subprocess.Popen:
        with open(self.log_path(rank), "wb") as log:
            # A new session: the terminal's or Jupyter's process-group signals don't reach
            # ranks directly; the kernel forwards interrupts itself.
            return subprocess.Popen(
                [sys.executable, "-m", "pdlab.control.worker", *self.arguments(rank, os.getpid())],
                env=self.environment(rank),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log_path(self, rank: int) -> str:
        """Where rank ``rank``'s output goes until it is connected (shown if it dies starting)."""
        return os.path.join(self.tmpdir, f"rank{rank}.log")

    def startup_log(self, rank: int) -> str:
        with open(self.log_path(rank), errors="replace") as f:
            return f.read().strip()


def torchrun_environment(
    rank: int, world_size: int, master_port: int, run_id: str
) -> dict[str, str]:
    """The variables torchrun (``--standalone``, torch 2.13's ``LocalElasticAgent`` and
    ``torch.distributed.launcher``) sets for a rank on a single node, which scripts read."""
    ranks = {"RANK": rank, "LOCAL_RANK": rank, "GROUP_RANK": 0, "ROLE_RANK": rank}
    sizes = {"WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": world_size, "GROUP_WORLD_SIZE": 1}
    return {
        **{k: str(v) for k, v in {**ranks, **sizes, "ROLE_WORLD_SIZE": world_size}.items()},
        "ROLE_NAME": "default",
        "MASTER_ADDR": "localhost",  # what torchrun --standalone sets
        "MASTER_PORT": str(master_port),
        "TORCHELASTIC_RESTART_COUNT": "0",
        "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": run_id,
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": os.environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
        "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
    }


def free_loopback_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the fork server: one a kernel, kept for the next cluster ------------------------------

_fork_server: forkserver.ForkServer | None = None
_fork_server_lock = threading.Lock()


def fork_server() -> forkserver.ForkServer | None:
    """This kernel's fork server, if it started one."""
    return _fork_server


def fork_server_for(environment: dict[str, str]) -> forkserver.ForkServer | None:
    """The fork server that can fork ranks starting from ``environment`` now, if any: one
    that has imported torch in that environment (``ForkServer.serves``)."""
    server = _fork_server
    if server is not None and server.ready.is_set() and server.serves(environment):
        return server
    return None


def keep_fork_server(environment: dict[str, str]) -> None:
    """Start a fork server for ranks starting from ``environment`` unless one runs already,
    in the background (it imports torch, then the training stack). One that turns out to
    serve another environment once its imports are done is replaced, but only once no rank
    of its is left: they would die with it."""
    global _fork_server
    if not forkserver.supported():
        return
    with _fork_server_lock:
        server = _fork_server
        if server is not None:
            settled = server.warm.is_set()  # until then its imports may set more variables
            if not server.gone and (server.ranks or not settled or server.serves(environment)):
                return
            stop_fork_server()
        _fork_server = _spawner.submit(forkserver.ForkServer, environment).result()


def _forget_fork_server() -> None:
    """In a process forked from this kernel (a DataLoader worker, a multiprocessing pool): the
    fork server is its parent's, and so is the conversation with it."""
    global _fork_server
    _fork_server = None


os.register_at_fork(after_in_child=_forget_fork_server)


@atexit.register
def stop_fork_server() -> None:
    """Stop the fork server (and any rank it forked still alive) and reap it."""
    global _fork_server
    server, _fork_server = _fork_server, None
    if server is not None:
        server.close()
        stop(server.process, time.monotonic() + 5.0)


# ---- torchrun, for ranks on other hosts ---------------------------------------------------


def torchrun_args(
    world_size: int,
    nnodes: int,
    nproc_per_node: int | None,
    rendezvous: str,
    connect: str,
    backend: str,
    device: str,
) -> list[str]:
    """torchrun's arguments to start ``world_size`` ranks on ``nnodes`` hosts that attach to
    the kernel's control channel at ``connect`` (``HOST:PORT``)."""
    per_node = nproc_per_node or world_size // nnodes
    if per_node * nnodes != world_size:
        raise ValueError(
            f"{nnodes} node(s) x {per_node} rank(s) is not world_size {world_size}: "
            "pass nnodes and nproc_per_node whose product is the world size"
        )
    return [
        f"--nnodes={nnodes}",
        f"--nproc-per-node={per_node}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rendezvous}",
        "-m",
        "pdlab.control.worker",
        f"--connect={connect}",
        f"--backend={backend}",
        f"--device={device}",
    ]


def launch_local_nodes(
    world_size: int,
    nnodes: int,
    connect: str,
    backend: str,
    device: str,
    token: bytes,
    tmpdir: str,
) -> list[subprocess.Popen]:
    """Start ``nnodes`` torchrun "nodes" on this machine whose ranks attach at ``connect``.

    A rehearsal of a multi-host run that listens on nothing but loopback: torchrun's
    rendezvous and the ranks' process group meet in ``FileStore`` files in ``tmpdir``
    (instead of TCPStores, which listen on every interface), torchrun shares no TCPStore
    with its workers, and gloo stays on the loopback interface.
    """
    args = torchrun_args(
        world_size, nnodes, None, os.path.join(tmpdir, "rendezvous"), connect, backend, device
    )
    args.insert(args.index("--rdzv-backend=c10d") + 1, "--rdzv-conf=store_type=file")
    args.append(f"--store={os.path.join(tmpdir, 'store')}")
    env = {
        **os.environ,
        "PDLAB_TOKEN": token.decode(),
        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
    }
    if lo := loopback_interface():
        env["GLOO_SOCKET_IFNAME"] = lo
    return [
        _spawner.submit(
            subprocess.Popen,
            [sys.executable, "-m", "torch.distributed.run", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a process group of its own, for ``stop``
        ).result()
        for _ in range(nnodes)
    ]


def stop(process: Spawned | forkserver.ForkedRank, deadline: float) -> None:
    """Give ``process`` until ``deadline`` (``time.monotonic()``) to exit, then end it and
    everything it started (a ``sleep``, DataLoader workers), and reap it."""
    while time.monotonic() < deadline and not process.exited():
        time.sleep(0.01)
    process.end()


def reachable_address(host: str) -> str:
    """The address other hosts should connect to for a server listening on ``host``.

    ``host`` itself, unless it is a wildcard ("0.0.0.0", "::", ""); then this machine's one
    non-loopback IPv4 address (the hostname can resolve to loopback, e.g. when /etc/hosts maps
    it to 127.0.0.1, so it is not used). Raises ValueError, naming the choices, when there
    is none or several.
    """
    if host not in ("0.0.0.0", "::", ""):
        return host
    found = [a for a in interface_addresses() if not a.startswith("127.")]
    if len(found) != 1:
        raise ValueError(
            f"this machine has {'no' if not found else 'several'} non-loopback addresses "
            f"({', '.join(found) or 'only 127.x'}): create the cluster with "
            "host=<the address other hosts reach it at>"
        )
    return found[0]


def interface_addresses() -> list[str]:
    """The IPv4 address of each network interface (Linux; empty elsewhere)."""
    import fcntl
    import struct

    siocgifaddr = 0x8915
    found = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(s.fileno(), siocgifaddr, struct.pack("256s", name.encode()))
            except OSError:  # no IPv4 address on it
                continue
            found.append(socket.inet_ntoa(answer[20:24]))
    return found
