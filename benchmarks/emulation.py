"""The emulated link against a link the kernel really throttles, in one invocation (root only).

    python benchmarks/emulation.py [--steps 10] [--repeats 3]
        [--cases dp:scratch:2:100Mbit/s,tp:scratch:2:100Mbit/s,pp-1f1b:scratch:2:20Mbit/s]
    python benchmarks/emulation.py --every 30Mbit/s [--world-sizes 2,3,4]   # every strategy

For each case (strategy:impl:world size:rate[:model], the lab's GPT unless a model is named;
the rates make communication most of a step; ``--every``: each strategy and impl that fits):

- *real*: ``python -m pdlab run ... --json`` inside a private network namespace whose loopback
  is rate-limited by a ``tbf`` qdisc (``throttled_loopback``). The kernel process, its ranks,
  their gloo sockets and the kernel-rank control channel all live there: every byte any of
  them sends crosses the one qdisc (the control channel's per-step metrics, a few KB, too).
- *emulated*: the same command on this machine's ordinary loopback with ``--link RATE:shared``:
  pdlab's emulation of one medium of that rate shared by all ranks (``pdlab.cost.emulation``).

Each run's step time is the median over its steps after the first ``WARMUP``; runs alternate
real and emulated, and the table shows the median over ``--repeats`` of each, and their ratio.
The tbf rate counts IP and TCP headers and the ACKs coming back (about 6% of a bulk
transfer: shared/FACTS.md measured 94 Mbit/s of payload through 100 Mbit/s), which the
emulated medium, counting payload, leaves out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

try:
    from common import emulated_shape, strategies  # run as a script: python benchmarks/emulation.py
except ModuleNotFoundError:  # imported as benchmarks.emulation (the tests, two_hosts.py)
    from benchmarks.common import emulated_shape, strategies

from pdlab.cost.topology import parse_link
from pdlab.training import registry

WARMUP = 2  # steps left out of each run's median: lazy init, first DDP constructor
CASES = (
    "dp:scratch:2:100Mbit/s", "dp:torch:2:100Mbit/s", "tp:scratch:2:100Mbit/s",
    "pp-1f1b:scratch:2:20Mbit/s", "dp:scratch:4:100Mbit/s", "tp:scratch:4:400Mbit/s",
    "pp-1f1b:scratch:4:20Mbit/s", "dp-tp:scratch:4:200Mbit/s", "dp-pp:scratch:4:50Mbit/s",
)  # fmt: skip
NETNS_PREFIX = "pdlab-tbf-"


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def remove_stale_namespaces() -> None:
    """Namespaces this script made in processes that no longer exist (killed before cleanup)."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in (line.split()[0] for line in names.splitlines() if line.strip()):
        pid = name.removeprefix(NETNS_PREFIX).split("-")[0]  # also benchmarks/two_hosts.py's
        if name.startswith(NETNS_PREFIX) and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cannot_throttle() -> str | None:
    """Why this process can't make a throttled namespace (not root, no ``ip``/``tc``), or None."""
    if os.geteuid() != 0:
        return "a tbf-throttled network namespace needs root (CI runs as root)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found: install iproute2"
    return None


def bucket_bytes(bytes_per_s: float) -> int:
    """tbf's bucket for a link of ``bytes_per_s``: as small as works, 128 us of the rate and
    no less than 4 KB (two 1500-byte packets and their headers); 16 KB at 1 Gbit/s, where
    a smaller bucket would need the qdisc's timer every few microseconds."""
    return max(4096, round(bytes_per_s * 128e-6))


@contextmanager
def throttled_loopback(rate: str) -> Iterator[str]:
    """A private network namespace whose loopback sends at most ``rate`` (a pdlab link rate,
    '100Mbit/s'), all senders together; yields its name. Removed on exit, even on failure.

    lo gets MTU 1500: with its default 65,536 bytes a packet never fits the bucket and TCP
    stalls (shared/FACTS.md). The bucket (``bucket_bytes``) is what a link idle long enough
    sends at no rate at all, which no emulated link does: FACTS.md's 64 KB let a pipeline's
    64 KB activation through at once, and 16 KB still a quarter of it (pipelines emulated
    1.15-1.35x slower than tbf at 30 Mbit/s).
    """
    if why := cannot_throttle():
        raise RuntimeError(f"can't throttle loopback: {why}")
    bytes_per_s = parse_link(rate).bandwidth
    bits_per_s = round(bytes_per_s * 8)
    name = f"{NETNS_PREFIX}{os.getpid()}"
    remove_stale_namespaces()
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "netns", "exec", name, "ip", "link", "set", "lo", "mtu", "1500", "up")
        _sh("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
            "rate", f"{bits_per_s}bit", "burst", str(bucket_bytes(bytes_per_s)), "latency", "200ms")  # fmt: skip
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@dataclass(frozen=True)
class Case:
    strategy: str
    impl: str
    world_size: int
    rate: str
    model: str = "gpt"

    @classmethod
    def parse(cls, text: str) -> Case:
        """``strategy:impl:world size:rate[:model]``."""
        strategy, impl, world, rate, *model = text.split(":")
        return cls(strategy, impl, int(world), rate, *model)

    def __str__(self) -> str:
        model = "" if self.model == "gpt" else f" {self.model}"
        return f"{self.strategy}/{self.impl}{model} w{self.world_size} @{self.rate}"


def step_time(case: Case, steps: int, link: str | None = None, netns: str | None = None) -> float:
    """Median step time (after ``WARMUP``) of one ``python -m pdlab run`` of ``case``."""
    cmd = [sys.executable, "-m", "pdlab", "run", "--strategy", case.strategy,
           "--impl", case.impl, "--world-size", str(case.world_size), "--model", case.model,
           "--steps", str(steps), "--json"]  # fmt: skip
    for option, value in emulated_shape(case.strategy, case.world_size).items():
        cmd += [f"--{option.replace('_', '-')}", str(value)]
    if link:
        cmd += ["--link", link]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {run.returncode}:\n{run.stderr[-3000:]}")
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"step"')]
    return statistics.median(r["step_time"] for r in rows[WARMUP:])


def compare(
    case: Case, steps: int = 10, repeats: int = 1, mode: str = ":shared"
) -> tuple[float, float]:
    """``(real, emulated)`` median step times of ``case``; ``mode`` is the suffix of the
    emulated link (":shared", or "" for a link per rank, which is not what tbf is)."""
    real, emulated = [], []
    with throttled_loopback(case.rate) as netns:
        for _ in range(repeats):
            real.append(step_time(case, steps, netns=netns))
            emulated.append(step_time(case, steps, link=case.rate + mode))
    return statistics.median(real), statistics.median(emulated)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--every", metavar="RATE", help="every strategy and impl at RATE instead")
    p.add_argument("--world-sizes", default="2,3,4", help="with --every")
    args = p.parse_args()
    if args.every:
        worlds = [int(w) for w in args.world_sizes.split(",")]
        cases = [(s, i, w) for w in worlds for s, i in strategies(w, list(registry.impls()))]
        # Expert parallelism needs the model with experts.
        model = {(s, w): ":moe" if registry.layout_for(s, w).ep > 1 else "" for s, _, w in cases}
        args.cases = ",".join(f"{s}:{i}:{w}:{args.every}{model[s, w]}" for s, i, w in cases)
    if why := cannot_throttle():
        sys.exit(f"error: {why}")
    print(f"GPT, {args.steps} steps a run, median step time after {WARMUP}, median of "
          f"{args.repeats} runs each; tbf at RATE vs --link RATE:shared")  # fmt: skip
    print(f"{'case':<34} {'real tbf s':>10} {'emulated s':>10} {'emulated/real':>13}")
    ratios, skipped = [], []
    for case in map(Case.parse, args.cases.split(",")):
        try:
            real, emulated = compare(case, args.steps, args.repeats)
        except RuntimeError as refused:  # the model can't take it at this world size
            skipped.append(f"{case}: {str(refused).strip().splitlines()[-1]}")
            continue
        ratios.append(emulated / real)
        print(f"{case!s:<34} {real:>10.4f} {emulated:>10.4f} {emulated / real:>13.3f}", flush=True)
    within = sum(abs(r - 1) <= 0.15 for r in ratios)
    print(f"{within} of {len(ratios)} within 15%; median ratio {statistics.median(ratios):.3f}")
    print("\n".join(f"skipped {why}" for why in skipped))


if __name__ == "__main__":
    main()
