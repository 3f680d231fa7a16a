"""Two hosts for real: two network namespaces on one switch, their NICs tbf-shaped (root only).

    python benchmarks/two_hosts.py [--rate 100Mbit/s] [--steps 12] [--repeats 3]

Each namespace is a host with its own loopback (unshaped: ranks on one host talk at memory
speed) and a veth to a bridge (``hosts``) whose sending side a ``tbf`` qdisc limits to
``--rate``: one NIC a host, shared by its ranks. The kernel runs in host A as
``pdlab.Cluster(4, attach=True, host=A's address)``; each host starts 2 ranks with the
command ``Cluster.attach_command`` prints (torchrun, c10d rendezvous at A's address: a real
rendezvous across addresses, gloo over the veth between hosts).

For each strategy (dp: a ring over both hosts; dp-tp: TP inside a host, DP across) the
measured median step time is set beside ``pdlab.predict`` on the matching topology: 2 nodes
× 2 ranks, compute the run's own, intra-node link calibrated on a 2-rank cluster inside
host A, inter-node link what one TCP stream measures across the veth (tbf counts headers
and ACKs; the payload gets ~94% of the rate), shared by a node's ranks
(``Topology(shared_inter=True)``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from benchmarks.emulation import NETNS_PREFIX, cannot_throttle, remove_stale_namespaces
from pdlab.cost.topology import Link, parse_link

WARMUP = 2  # steps left out of each median (see benchmarks/emulation.py)
SUBNET = "10.231.7"
STRATEGIES = ("dp", "dp-tp")


@dataclass(frozen=True)
class Host:
    netns: str
    nic: str
    address: str

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.netns, *cmd], **kwargs)


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextmanager
def hosts(
    count: int, rate: str, burst: int = 64 << 10, receive_too: bool = False
) -> Iterator[list[Host]]:
    """``count`` hosts on one switch (a bridge in a namespace of its own), each host's NIC
    sending at most ``rate`` (tbf, a bucket of ``burst`` bytes), and with ``receive_too``
    receiving at most ``rate`` as well: a full-duplex NIC. Every namespace (and so every
    veth) is removed on exit, even on failure."""
    if why := cannot_throttle():
        raise RuntimeError(f"can't make {count} hosts: {why}")
    bits_per_s = round(parse_link(rate).bandwidth * 8)
    tag = os.getpid()
    switch = f"{NETNS_PREFIX}{tag}-switch"
    made = [
        Host(f"{NETNS_PREFIX}{tag}-{k}", f"pdl{tag % 100000}h{k}", f"{SUBNET}.{k + 1}")
        for k in range(count)
    ]
    remove_stale_namespaces()

    def shape(netns: str, nic: str) -> None:
        _sh("ip", "netns", "exec", netns, "tc", "qdisc", "add", "dev", nic, "root", "tbf",
            "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", "200ms")  # fmt: skip

    try:
        _sh("ip", "netns", "add", switch)
        _sh("ip", "-n", switch, "link", "add", "switch", "type", "bridge")
        _sh("ip", "-n", switch, "link", "set", "switch", "up")
        for k, host in enumerate(made):
            port = f"pdl{tag % 100000}s{k}"  # the switch's end of the host's cable
            _sh("ip", "netns", "add", host.netns)
            _sh("ip", "link", "add", host.nic, "type", "veth", "peer", "name", port)
            _sh("ip", "link", "set", host.nic, "netns", host.netns)
            _sh("ip", "link", "set", port, "netns", switch)
            _sh("ip", "-n", switch, "link", "set", port, "master", "switch", "mtu", "1500", "up")
            _sh("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.nic)
            _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
            _sh("ip", "-n", host.netns, "link", "set", host.nic, "mtu", "1500", "up")
            shape(host.netns, host.nic)
            if receive_too:
                shape(switch, port)
        yield made
    finally:
        for netns in (*(host.netns for host in made), switch):
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)


RECEIVER = """
import socket, sys, time
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
total, start = 0, None
while chunk := conn.recv(1 << 20):
    start = start or time.perf_counter()
    total += len(chunk)
print(total / (time.perf_counter() - start), flush=True)
"""


def goodput(sender: Host, receiver: Host, nbytes: int = 8 << 20) -> float:
    """Bytes/s of payload one TCP stream gets from ``sender`` to ``receiver``."""
    cmd = ["ip", "netns", "exec", receiver.netns, sys.executable, "-c", RECEIVER, receiver.address]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as listening:
        port = int(listening.stdout.readline())
        send = f"import socket; s = socket.create_connection(({receiver.address!r}, {port})); s.sendall(bytes({nbytes})); s.close()"  # fmt: skip
        sender.run(sys.executable, "-c", send, check=True)
        return float(listening.stdout.readline())


@contextmanager
def attached(cluster, on: list[Host]) -> Iterator[None]:
    """The ranks of ``cluster`` (``attach=True``, listening in ``on[0]``) started in the hosts
    ``on``, as many in each, with the torchrun command ``Cluster.attach_command`` prints (c10d
    rendezvous at the first host's address: a real rendezvous across addresses, gloo over
    the veths). On exit the cluster is shut down and torchrun waited for; on failure its
    output is printed.

    The hosts share this machine's cores: each rank gets its share of all of them, not of
    its host's (a rank alone on its host would take every core, and 4 such ranks on 2 cores
    run several times slower than 4 that take one each)."""
    nproc = cluster.world_size // len(on)
    attach = cluster.attach_command(nnodes=len(on), nproc_per_node=nproc)
    env, *command = shlex.split(attach.replace("HOST0", on[0].address))
    token = env.split("=", 1)[1]
    threads = max(1, (os.cpu_count() or 1) // cluster.world_size)
    command = [sys.executable, "-m", "torch.distributed.run", *command[1:], f"--threads={threads}"]
    with tempfile.TemporaryFile("w+") as log:
        # The hostname resolves to 127.0.0.1 in every namespace, so torchrun is told what it
        # would guess wrong, as on hosts with several NICs: the first host hosts the
        # rendezvous (torch's _matches_machine_hostname checks the hostname's addresses)
        # and each node's address.
        nodes = []
        for host in on:
            hosting = ["--rdzv-conf=is_host=1"] if host is on[0] else []
            argv = [*command[:3], *hosting, f"--local-addr={host.address}", *command[3:]]
            nodes.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", host.netns, *argv],
                    env={**os.environ, "PDLAB_TOKEN": token, "GLOO_SOCKET_IFNAME": host.nic},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        try:
            yield
        except BaseException:
            log.seek(0)
            print(f"torchrun's output on the hosts:\n{log.read()[-4000:]}", file=sys.stderr)
            raise
        finally:
            cluster.shutdown()
            for node in nodes:
                node.wait(timeout=60)


def on_hosts(a: Host, b: Host, strategies, steps: int, batch_size: int, inter: Link) -> list[dict]:
    """In host A (the kernel's): run each strategy on 2 + 2 attached ranks and predict it on
    the matching topology, there again with each rank starting its steps where it did
    (``BAND_TOP``'s staggered starts: the hosts' 4 ranks share this machine's cores), and on two
    wrong ones: a NIC per rank (each rank its own veth rate), one host (every rank on A's
    loopback). One row per strategy, median step times."""
    import pdlab
    from pdlab.cost.calibration import calibrate, under_load
    from pdlab.cost.predictor import BAND_TOP
    from pdlab.cost.topology import Topology

    with pdlab.Cluster(2) as local:
        calibration = calibrate(local)
    device, loopback = calibration.topology.device, calibration.link
    topologies = {
        "predicted_s": Topology(2, 2, device, loopback, inter, shared_inter=True),
        "nic_per_rank_s": Topology(2, 2, device, loopback, inter),
        "one_host_s": Topology(1, 4, device, loopback),
    }
    rows = []
    with pdlab.Cluster(4, attach=True, host=a.address) as cluster, attached(cluster, [a, b]):
        for strategy in strategies:
            result = pdlab.train(cluster, strategy=strategy, model="gpt", steps=steps,
                                 batch_size=batch_size)  # fmt: skip
            row = {"strategy": strategy, "measured_s": result.steps["step_time"]}
            for column, topology in topologies.items():
                row[column] = pdlab.predict(result, topology)["step_time"]
            row["staggered_s"] = pdlab.predict(result, topologies["predicted_s"], assumptions=BAND_TOP)["step_time"]  # fmt: skip
            # The band's top (as on one host): the loopback as the run's host-local ops met it.
            loaded = under_load(result, calibration, groups=("tp",)).link
            top = Topology(2, 2, device, loaded, inter, shared_inter=True)
            row["top_s"] = pdlab.predict(result, top, assumptions=BAND_TOP)["step_time"]
            rows.append({k: v if k == "strategy" else statistics.median(v.iloc[WARMUP:])
                         for k, v in row.items()})  # fmt: skip
    return rows


def measure(rate: str, strategies=STRATEGIES, steps: int = 12, batch_size: int = 32) -> dict:
    """Build the two hosts, measure the link, run the kernel in host A; its rows as a dict."""
    with hosts(2, rate) as (a, b):
        inter_bandwidth = min(goodput(a, b), goodput(b, a))
        inter = Link(f"veth {rate}", inter_bandwidth, 0.0, "one TCP stream across the veth")
        args = [sys.executable, "-m", "benchmarks.two_hosts", "--on-hosts",
                json.dumps([a.__dict__, b.__dict__, list(strategies), steps, batch_size,
                            inter.bandwidth])]  # fmt: skip
        run = a.run(*args, capture_output=True, text=True, timeout=600)
        if run.returncode:
            raise RuntimeError(f"the kernel in host A failed:\n{run.stderr[-4000:]}")
        return {
            "rate": rate,
            "goodput": inter_bandwidth,
            "rows": json.loads(run.stdout.splitlines()[-1]),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", default="100Mbit/s")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--on-hosts", help=argparse.SUPPRESS)  # the kernel, inside host A
    args = parser.parse_args()
    if args.on_hosts:
        a, b, strategies, steps, batch, bandwidth = json.loads(args.on_hosts)
        inter = Link("veth", bandwidth, 0.0)
        print(json.dumps(on_hosts(Host(**a), Host(**b), strategies, steps, batch, inter)))
        return
    started = time.time()
    print(f"two hosts, 2 ranks each, joined at {args.rate}; load {os.getloadavg()[0]:.2f}")
    print(
        "step time s, median   measured  predicted  ratio | staggered  ratio | top  ratio"
        " | NIC per rank  ratio | one host  ratio"
    )
    for _ in range(args.repeats):
        out = measure(args.rate, steps=args.steps, batch_size=args.batch_size)
        for row in out["rows"]:
            m = row["measured_s"]
            print(f"{row['strategy']:20} {m:10.3f} {row['predicted_s']:10.3f} {row['predicted_s'] / m:6.2f}"
                  f" | {row['staggered_s']:9.3f} {row['staggered_s'] / m:6.2f}"
                  f" | {row['top_s']:5.3f} {row['top_s'] / m:6.2f}"
                  f" | {row['nic_per_rank_s']:12.3f} {row['nic_per_rank_s'] / m:6.2f}"
                  f" | {row['one_host_s']:8.3f} {row['one_host_s'] / m:6.2f}")  # fmt: skip
        print(f"(TCP goodput across the veth: {out['goodput'] * 8 / 1e6:.1f} Mbit/s)")
    print(f"{time.time() - started:.0f} s; load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
