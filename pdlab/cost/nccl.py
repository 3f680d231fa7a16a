"""NCCL's own time model for the GPU presets: which algorithm and protocol it picks, and when.

NCCL times every collective as ``latency + bytes / bandwidth`` for each algorithm (ring, tree,
NVLS) and protocol (LL, LL128, Simple) and runs the fastest (``ncclTopoTuneModel`` and
``ncclTopoGetAlgoTime`` in NVIDIA/nccl ``src/graph/tuning.cc``, read at commit 5067397 of
2026-06). This module is that model, reduced to what pdlab's presets need:

- Bandwidth: what NCCL's topology gives a GPU (``HARDWARE``: NVLink 4 is 18 links of
  ``SM90_NVLINK_BW`` = 20.6 GB/s, ``src/graph/topo.h``; a NIC gets the fastest entry of the
  search's speed array that fits it, ``search.cc``), times NCCL's refinements: ring LL at
  half that and at most ``llMaxBw``, LL128 at 0.92, tree all-reduce at 0.92 (then LL /3.8,
  LL128 7/9 on one node), NVLS at ``nvlsEfficiency`` (0.85 on Hopper) and twice for an
  all-reduce (it pipelines two), with one NVLS channel per GPU.
- Latency: a base per algorithm and protocol (``baseLatencies``: ring 6.6 / 14 / 8.4 µs) plus
  a hardware latency per step (``hwLatencies``: NVLink ring 0.6 / 1.9 / 3.4 µs, network 2.7 /
  4 / 14 µs); a ring pays 2(n-1) steps for an all-reduce, n-1 for all-gather and
  reduce-scatter, a tree 2·((n/nodes - 1) intra + log2(nodes) network) hops; NVLS 25 µs flat.
- Choice: LL128 only over NVLink (NCCL enables it up to NVB paths), NVLS only for an
  all-reduce inside one node of Hopper GPUs on NVSwitch (more nodes need CollNet), trees only
  for all-reduce; the tree's per-size correction factors are applied as NCCL does.

Left out: per-channel caps (``perChMax*Bws``: they bind only below ~12 channels, and NCCL
runs 16 or more on these presets), PAT (one GPU a node), CollNet/SHARP and NCCL's rings
that spread one node's traffic over all its NICs: pdlab's ``inter`` link is one GPU's
share of the network (``topology``), so a ring across nodes runs at one NIC's pace.

    collective_time("all_reduce", 1 << 30, ranks=8, nodes=1, intra=LINKS["nvlink4"],
                    inter=None, device="h100-sxm")       # seconds, NCCL's pick
    choice(...)                                          # ("nvls", "simple", seconds)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("tree", "ring", "nvls")
PROTOCOLS = ("ll", "ll128", "simple")
US = 1e-6
GB = 1e9

# tuning.cc ``baseLatencies`` (µs), per algorithm, per protocol (LL, LL128, Simple).
BASE_LATENCY = {"tree": (6.8, 14.0, 8.4), "ring": (6.6, 14.0, 8.4), "nvls": (0.0, 0.0, 0.0)}
# tuning.cc ``hwLatencies`` (µs): per hardware, algorithm, protocol.
HW_LATENCY = {
    "nvlink": {"tree": (0.6, 1.25, 4.0), "ring": (0.6, 1.9, 3.4), "nvls": (0.0, 0.0, 25.0)},
    "pci": {"tree": (1.0, 1.9, 4.0), "ring": (1.0, 2.5, 5.7), "nvls": (0.0, 0.0, 0.0)},
    "net": {"tree": (5.0, 8.5, 14.0), "ring": (2.7, 4.0, 14.0), "nvls": (0.0, 0.0, 18.0)},
}
NET_OVERHEAD_US = 1.0  # ``getNetOverhead`` on Intel x86; Simple pays it 3 times
NVLS_EFFICIENCY = {"hopper": 0.85, "ampere": 0.0}  # ``nvlsEfficiency``: no NVLS before Hopper
# ``llMaxBws`` (GB/s): one node by GPU generation; several by CPU (Intel: 2 nodes, more).
LL_MAX_BW_ONE_NODE = {"hopper": 141.0, "ampere": 87.7}
LL_MAX_BW_NODES = (39.0, 20.4)
NVLS_SPEEDS = (
    60.0,
    50.0,
    40.0,
    30.0,
    24.0,
    20.0,
    15.0,
    12.0,
    11.0,
    6.0,
    3.0,
)  # sm90SpeedArrayIntra
# ``treeCorrectionFactor``: per protocol, for messages of 64 B · 2^k, k = 0..23.
TREE_CORRECTION = (
    (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0, 1.0),
    (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9, .9),
)  # fmt: skip


@dataclass(frozen=True)
class Hardware:
    """A link as NCCL's topology sees it: its class and a GPU's bandwidth on it (GB/s)."""

    kind: str  # "nvlink", "pci" or "net" (the rows of ``hwLatencies``)
    bandwidth: float  # GB/s: NVLink links × per-link rate, PCIe width × rate, a NIC's speed
    source: str


# NCCL's view of pdlab's named links (``topology.LINKS``). A link given as a rate, or with a
# latency of its own ("nvlink4@2us"), keeps pdlab's latency + bytes / bandwidth model.
HARDWARE = {
    "nvlink4": Hardware("nvlink", 18 * 20.6, "topo.h SM90_NVLINK_BW 20.6 GB/s × 18 NVLinks (H100 SXM)"),
    "nvlink3": Hardware("nvlink", 12 * 20.0, "topo.h SM80_NVLINK_BW 20.0 GB/s × 12 NVLinks (A100 SXM)"),
    "pcie5": Hardware("pci", 48.0, "xml.cc: x16 at 32 GT/s = 16 × 240 / 80 GB/s"),
    "pcie4": Hardware("pci", 24.0, "xml.cc: x16 at 16 GT/s = 16 × 120 / 80 GB/s"),
    "ib-ndr400": Hardware("net", 48.0, "search.cc sm90SpeedArrayInter: 48 GB/s fits a 50 GB/s NIC"),
    "ib-hdr200": Hardware("net", 24.0, "search.cc speedArrayInter: 24 GB/s fits a 25 GB/s NIC"),
}  # fmt: skip
ARCH = {"h100-sxm": "hopper", "h100-pcie": "hopper", "a100-sxm": "ampere", "a100-pcie": "ampere"}
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")


def models(intra: str, inter: str | None, device: str) -> bool:
    """Whether NCCL's model covers links and a device of these names."""
    return intra in HARDWARE and (inter is None or inter in HARDWARE) and device in ARCH


def _steps(op: str, ranks: int) -> int:
    if op == "all_reduce":
        return 2 * (ranks - 1)
    return ranks - 1 if op in ("all_gather", "reduce_scatter") else ranks


def _busbw(
    op: str, algo: str, proto: int, ranks: int, nodes: int, hw: Hardware, arch: str
) -> float:
    """NCCL's bus bandwidth (GB/s) for one algorithm and protocol; 0 where it is not used."""
    if algo == "nvls":  # one channel per GPU, each at the fastest speed all of them fit
        channels = ranks
        speed = next((s for s in NVLS_SPEEDS if s * channels <= hw.bandwidth), NVLS_SPEEDS[-1])
        return channels * speed * NVLS_EFFICIENCY[arch] * (channels - 1) / channels * 2
    bw = hw.bandwidth
    ll_max = LL_MAX_BW_ONE_NODE[arch] if nodes == 1 else LL_MAX_BW_NODES[nodes > 2]
    if algo == "ring":
        return (min(ll_max, bw * 0.5), bw * 0.92, bw)[proto]
    bw *= 0.92  # a tree all-reduce
    return (min(bw / 3.8, ll_max), bw * (7 / 9 if nodes == 1 else 120 / 128), bw)[proto]


def _latency(op: str, algo: str, proto: int, ranks: int, nodes: int, intra: Hardware) -> float:
    """NCCL's latency (µs) for one algorithm and protocol on ``ranks`` over ``nodes``."""
    intra_lat = HW_LATENCY[intra.kind][algo][proto]
    per_node = ranks // nodes
    # One GPU a node exposes the network's latency fully: NCCL charges the tree's then.
    inter_lat = HW_LATENCY["net"]["tree" if per_node == 1 else algo][proto]
    if algo == "nvls":
        return intra_lat
    lat = BASE_LATENCY[algo][proto]
    if algo == "tree":
        return lat + 2 * ((per_node - 1) * intra_lat + int(math.log2(nodes)) * inter_lat)
    steps = _steps(op, ranks)
    if op in ("broadcast", "reduce"):  # a chain, its chunks modelled as steps
        hop = HW_LATENCY[intra.kind if nodes == 1 else "net"]["tree" if proto == 2 else "ring"]
        return lat + steps * hop[proto]
    if nodes > 1:  # inter-node rings still launch every step through the network proxy
        intra_lat = max(intra_lat, NET_OVERHEAD_US * (3 if proto == 2 else 1))
    inter_steps = 0 if nodes == 1 else (2 * (nodes - 1) if op == "all_reduce" else nodes - 1)
    return lat + (steps - inter_steps) * intra_lat + inter_steps * inter_lat


def _usable(op: str, algo: str, proto: int, nodes: int, intra: Hardware, arch: str) -> bool:
    if algo == "nvls":  # NVLink SHARP, Simple only: an all-reduce in one node of Hopper GPUs
        # (an NVLink node is taken to have NVSwitches, as the DGX/HGX presets do). NVLS for an
        # all-gather runs at (n-1)/n of the all-reduce's rate, below the ring's: left out.
        return op == "all_reduce" and nodes == 1 and intra.kind == "nvlink" and NVLS_EFFICIENCY[arch] > 0 and proto == 2  # fmt: skip
    if algo == "tree" and op != "all_reduce":
        return False
    return proto != 1 or intra.kind == "nvlink"  # LL128 only over NVLink paths


def times(
    op: str, nbytes: float, ranks: int, nodes: int, intra: str, inter: str | None, device: str
) -> dict[tuple[str, str], float]:
    """Seconds of ``op`` on ``nbytes`` (NCCL's count: an all-gather's whole output) for every
    algorithm and protocol NCCL would consider."""
    if op not in COLLECTIVES:
        raise ValueError(f"NCCL's tuning model covers {', '.join(COLLECTIVES)}, not {op!r}")
    if not models(intra, inter, device):
        raise ValueError(f"NCCL's model has no figures for {intra!r}/{inter!r}/{device!r}: "
                         f"links {', '.join(HARDWARE)}, devices {', '.join(ARCH)}")  # fmt: skip
    if nodes > 1 and inter is None:
        raise ValueError(f"a group over {nodes} nodes needs an inter-node link")
    arch, hw_intra = ARCH[device], HARDWARE[intra]
    hw_bw = HARDWARE[inter] if nodes > 1 else hw_intra  # a ring across nodes runs at a NIC's pace
    log_size = int(math.log2(nbytes / 64)) if nbytes >= 64 else -1
    found = {}
    for algo in ALGORITHMS:
        for proto, name in enumerate(PROTOCOLS):
            if not _usable(op, algo, proto, nodes, hw_intra, arch):
                continue
            bus = _busbw(op, algo, proto, ranks, nodes, hw_bw, arch)
            if algo == "tree" and 0 <= log_size < 23:
                bus *= TREE_CORRECTION[proto][log_size]
            # NCCL's bandwidths are per byte of the op: bus bytes · n / steps (a tree: half).
            alg = bus * (0.5 if algo == "tree" else ranks / _steps(op, ranks))
            lat = _latency(op, algo, proto, ranks, nodes, hw_intra)
            if algo == "ring" and proto == 2 and nodes > 1 and op == "all_reduce":
                lat *= 1.4  # "plateau effect of ring" on Ampere and later
            found[algo, name] = lat * US + nbytes / (alg * GB)
    return found


def choice(
    op: str, nbytes: float, ranks: int, nodes: int, intra: str, inter: str | None, device: str
) -> tuple[str, str, float]:
    """``(algorithm, protocol, seconds)`` NCCL would pick: the fastest of ``times``."""
    (algo, proto), seconds = min(
        times(op, nbytes, ranks, nodes, intra, inter, device).items(), key=lambda kv: kv[1]
    )
    return algo, proto, seconds


def collective_time(
    op: str, nbytes: float, ranks: int, nodes: int, intra: str, inter: str | None, device: str
) -> float:
    """Seconds NCCL's model gives ``op`` on ``nbytes`` over ``ranks`` GPUs on ``nodes`` nodes."""
    if ranks < 2:
        return 0.0
    return choice(op, nbytes, ranks, nodes, intra, inter, device)[2]


def bus_bandwidth(op: str, nbytes: float, seconds: float, ranks: int) -> float:
    """nccl-tests' bus bandwidth (bytes/s) of an op that took ``seconds``: ``nbytes /
    seconds`` times 2(n-1)/n for an all-reduce, (n-1)/n for all-gather and reduce-scatter
    (nccl-tests doc/PERFORMANCE.md)."""
    factor = {"all_reduce": 2 * (ranks - 1) / ranks, "broadcast": 1.0, "reduce": 1.0}
    return nbytes / seconds * factor.get(op, (ranks - 1) / ranks)
