"""Clusters you choose: links, devices and how they are wired, as plain numbers.

A ``Topology`` is ``nodes`` × ``gpus_per_node`` copies of one ``Device``, joined inside a node
by the ``intra`` link and between nodes by the ``inter`` link. A ``Link`` is a bandwidth per
direction (bytes/s) and a latency (s) per message; ``pdlab.cost.costmodel`` turns them into the
time of every op pdlab meters, and ``pdlab.cost.planner`` into step times for real model sizes.

    Topology.parse("8xH100")                      # a preset (PRESETS)
    Topology.parse("2x8 nvlink4 ib-ndr400")       # [NODESx]GPUS [DEVICE] INTRA [INTER]
    Topology(nodes=2, gpus_per_node=8, intra="nvlink4", inter="25Gbit/s@5us")
    calibrate(cluster).topology                   # this machine, measured (pdlab.cost.calibration)
    parse_link("100Mbit/s"), parse_link("1GB/s@10us"), parse_link("nvlink4")

Every vendor figure lives in ``LINKS`` and ``DEVICES`` below, each with its source; the tables
in docs/clusters.md repeat them (a test keeps the two in step).

Conventions the other modules rely on:
- ``Link.bandwidth`` is what one GPU can send while it also receives the same amount (per
  direction): NCCL-tests' bus bandwidth of a ring on that link. Datasheets quote NVLink and
  PCIe as the sum of both directions; the table halves them.
- ``inter`` is each GPU's own share of the network (DGX-style nodes have one NIC per GPU). A
  node whose 8 GPUs share one 100 GbE port has ``inter="12.5Gbit/s"`` per GPU, or
  ``inter="100Gbit/s", shared_inter=True``: every op crossing nodes then queues for the one
  port (the predictor's replay), whichever ranks issue it.
- Latency is per message (one ring step), not per collective; NCCL's tuning model
  (src/graph/tuning.cc, ``hwLat``) counts latency the same way.
- Rates use decimal prefixes (1 GB/s = 10⁹ bytes/s); bits are written ``bit/s`` and bytes
  ``B/s`` so the two can't be confused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from pdlab import checks

GB = 1e9


@dataclass(frozen=True)
class Link:
    """A link: ``bandwidth`` in bytes/s per direction, ``latency`` in s per message."""

    name: str
    bandwidth: float
    latency: float
    source: str = ""

    def __post_init__(self) -> None:
        checks.number(
            self.bandwidth, f"the bandwidth of link {self.name!r}", above=0, unit="bytes/s"
        )
        # At most a timeout's longest: an emulated op waits this long on a timer.
        checks.number(
            self.latency,
            f"the latency of link {self.name!r}",
            least=0,
            most=checks.MAX_SECONDS,
            unit="seconds",
        )

    def __str__(self) -> str:
        return f"{self.name} ({self.bandwidth / GB:.4g} GB/s, {self.latency * 1e6:.3g} µs)"


@dataclass(frozen=True)
class Device:
    """An accelerator: dense peak FLOP/s per dtype ("fp32", "tf32", "bf16", "fp16") and memory."""

    name: str
    peak_flops: Mapping[str, float] = field(hash=False)
    memory_bytes: float
    source: str = ""

    def peak(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; a clear error if this device has no figure for it."""
        if dtype not in self.peak_flops:
            raise ValueError(
                f"device {self.name!r} has no peak FLOP/s for {dtype!r}; it has "
                f"{', '.join(self.peak_flops)}. Choose a precision it supports."
            )
        return self.peak_flops[dtype]


# ---- the one table of vendor figures ---------------------------------------------------------

# Per-message latencies are NCCL's own model of one ring step with its low-latency protocol
# (NVIDIA/nccl src/graph/tuning.cc, hwLat[..][Ring][LL]: NVLink 0.6 µs, PCI 1.0 µs, NET 2.7 µs).
# Vendors publish no per-message latency for plain Ethernet; we assume kernel TCP sockets (what
# gloo and NCCL's socket transport use) through one switch: 10 µs one way on 10-100 GbE and
# 50 µs on 1 GbE, where a 1,500-byte frame alone takes 12 µs on the wire.
_NCCL = "NCCL tuning.cc hwLat (ring, LL)"
_TCP = "assumed: kernel TCP through one switch"
LINKS: dict[str, Link] = {
    link.name: link
    for link in (
        Link("nvlink4", 450 * GB, 0.6e-6, f"H100 SXM datasheet: NVLink 900 GB/s both ways; {_NCCL}"),
        Link("nvlink3", 300 * GB, 0.6e-6, f"A100 datasheet: NVLink 600 GB/s both ways; {_NCCL}"),
        Link("pcie5", 64 * GB, 1.0e-6, f"H100 datasheet: PCIe Gen5 128 GB/s both ways; {_NCCL}"),
        Link("pcie4", 32 * GB, 1.0e-6, f"A100 datasheet: PCIe Gen4 64 GB/s both ways; {_NCCL}"),
        Link("ib-ndr400", 50 * GB, 2.7e-6, f"ConnectX-7 manual: NDR 400 Gb/s a port; {_NCCL}"),
        Link("ib-hdr200", 25 * GB, 2.7e-6, f"ConnectX-6 manual: HDR 200 Gb/s a port; {_NCCL}"),
        Link("eth100", 12.5 * GB, 10e-6, f"IEEE 802.3 100 Gb/s line rate; {_TCP}"),
        Link("eth25", 3.125 * GB, 10e-6, f"IEEE 802.3 25 Gb/s line rate; {_TCP}"),
        Link("eth10", 1.25 * GB, 10e-6, f"IEEE 802.3 10 Gb/s line rate; {_TCP}"),
        Link("eth1", 0.125 * GB, 50e-6, f"IEEE 802.3 1 Gb/s line rate; {_TCP}"),
    )
}  # fmt: skip

# Datasheets give Tensor Core figures "with sparsity"; dense is half of that.
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (Tensor Core figures with sparsity, halved)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (80 GB; TF32/BF16/FP16 dense)"
DEVICES: dict[str, Device] = {
    device.name: device
    for device in (
        Device("h100-sxm", {"fp32": 67e12, "tf32": 494.5e12, "bf16": 989.5e12, "fp16": 989.5e12}, 80 * GB, _H100),
        Device("h100-pcie", {"fp32": 51e12, "tf32": 378e12, "bf16": 756.5e12, "fp16": 756.5e12}, 80 * GB, _H100),
        Device("a100-sxm", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}, 80 * GB, _A100),
        Device("a100-pcie", {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12}, 80 * GB, _A100),
    )
}  # fmt: skip

# The device a node with this intra-node link usually has (so "2x8 nvlink4 ib-ndr400" reads).
DEVICE_FOR_LINK = {"nvlink4": "h100-sxm", "nvlink3": "a100-sxm", "pcie5": "h100-pcie", "pcie4": "a100-pcie"}  # fmt: skip

PRESETS: dict[str, str] = {
    "8xH100": "8 h100-sxm nvlink4",
    "8xA100": "8 a100-sxm nvlink3",
    "4xPCIe4": "4 a100-pcie pcie4",
    "4xPCIe5": "4 h100-pcie pcie5",
    "2x8xH100-ib-ndr400": "2x8 h100-sxm nvlink4 ib-ndr400",
    "4x8xH100-ib-ndr400": "4x8 h100-sxm nvlink4 ib-ndr400",
    "2x8xA100-ib-hdr200": "2x8 a100-sxm nvlink3 ib-hdr200",
    "2x8xH100-eth100": "2x8 h100-sxm nvlink4 eth100",
    "2x8xA100-eth25": "2x8 a100-sxm nvlink3 eth25",
}
THIS_MACHINE = "this-machine"


# ---- link specs ------------------------------------------------------------------------------

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0}
_NUMBER = r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?"
_RATE = re.compile(rf"^({_NUMBER})\s*([kKMGT]?)(bit/s|B/s)$")
_LATENCY = re.compile(rf"^([-+]?{_NUMBER})\s*(ns|us|µs|ms|s)$")  # signed: -5us is refused
LINK_FORMS = (
    "a preset name ({presets}), a rate in bits or bytes per second with decimal prefixes "
    "k, M, G, T ('100Mbit/s', '25Gbit/s', '1GB/s'), either followed by '@' and a latency in "
    "ns, us, ms or s ('25Gbit/s@5us', 'nvlink4@2us'); a rate alone has no latency"
)


def _bad_link(text: str, why: str = "") -> ValueError:
    forms = LINK_FORMS.format(presets=", ".join(LINKS))
    return ValueError(f"can't read link {text!r}{why}: write {forms}")


def parse_link(text: str | Link) -> Link:
    """A ``Link`` from a preset name or a rate spec (see ``LINK_FORMS``); ValueError otherwise."""
    if isinstance(text, Link):
        return text
    spec = str(text).strip()
    rate, _, latency = spec.partition("@")
    rate, latency = rate.strip(), latency.strip()
    if latency:
        lat = _LATENCY.match(latency)
        if lat is None:
            raise _bad_link(text, f" (latency {latency!r} needs a unit: ns, us, ms or s)")
        seconds = float(lat[1]) * _SECONDS[lat[2]]
    if rate.lower() in LINKS:
        base = LINKS[rate.lower()]
        if not latency:
            return base
        return Link(f"{base.name}@{latency}", base.bandwidth, seconds, base.source)
    match = _RATE.match(rate)
    if match is None:
        hint = ""
        if re.search(r"(b|B)ps$|[kKMGT]?b/s$", rate):
            hint = " ('b/s' and 'bps' are ambiguous: write 'bit/s' for bits, 'B/s' for bytes)"
        raise _bad_link(text, hint)
    value = float(match[1]) * _PREFIX[match[2]]
    bandwidth = value / 8 if match[3] == "bit/s" else value
    return Link(spec.replace(" ", ""), bandwidth, seconds if latency else 0.0, "given")


def parse_device(name: str | Device) -> Device:
    if isinstance(name, Device):
        return name
    if name.lower() not in DEVICES:
        raise ValueError(f"unknown device {name!r}: choose one of {', '.join(DEVICES)}")
    return DEVICES[name.lower()]


# ---- topologies ------------------------------------------------------------------------------


TOPOLOGY_FORMS = (
    "a preset ({presets}); 'this-machine' (measured: pass cluster=); or "
    "'[NODESx]GPUS [DEVICE] INTRA [INTER]' with a device among {devices} (default: the usual "
    "one for the intra link, {defaults}) and links as preset names or rates, e.g. "
    "'2x8 nvlink4 ib-ndr400', '4 a100-pcie pcie4', '2x4 h100-sxm nvlink4 25Gbit/s@5us'"
)


def _bad_topology(text: str, why: str) -> ValueError:
    forms = TOPOLOGY_FORMS.format(
        presets=", ".join(PRESETS),
        devices=", ".join(DEVICES),
        defaults=", ".join(f"{k} → {v}" for k, v in DEVICE_FOR_LINK.items()),
    )
    return ValueError(f"can't read topology {text!r}: {why}. Write {forms}")


@dataclass(frozen=True)
class Topology:
    """``nodes`` × ``gpus_per_node`` devices; ``intra`` joins GPUs in a node, ``inter`` nodes.

    Devices and links may be given as names or specs (``device="a100-sxm"``,
    ``inter="25Gbit/s@5us"``); ``device`` defaults to the usual one for the intra link.
    Global rank ``r`` sits on node ``r // gpus_per_node`` (torchrun's order).
    """

    nodes: int = 1
    gpus_per_node: int = 8
    device: Device | None = None
    intra: Link = LINKS["nvlink4"]
    inter: Link | None = None
    name: str = ""
    # True: a node's GPUs share one ``inter`` link (one NIC a host, as on two workstations),
    # rather than each its own (DGX-style nodes, one NIC per GPU).
    shared_inter: bool = False

    def __post_init__(self) -> None:
        checks.whole(self.nodes, "nodes")
        checks.whole(self.gpus_per_node, "gpus_per_node")
        intra = parse_link(self.intra)
        inter = None if self.inter is None else parse_link(self.inter)
        if self.nodes > 1 and inter is None:
            raise ValueError(
                f"a topology of {self.nodes} nodes needs an inter-node link: pass "
                f"inter='ib-ndr400' (or any of {', '.join(LINKS)}, or a rate like '25Gbit/s')"
            )
        device = self.device
        if device is None:
            if intra.name not in DEVICE_FOR_LINK:
                raise ValueError(
                    f"name the device for intra link {intra.name!r}: one of {', '.join(DEVICES)}"
                )
            device = DEVICE_FOR_LINK[intra.name]
        object.__setattr__(self, "device", parse_device(device))
        object.__setattr__(self, "intra", intra)
        object.__setattr__(self, "inter", inter)
        if not self.name:
            count = (
                f"{self.nodes}x{self.gpus_per_node}" if self.nodes > 1 else f"{self.gpus_per_node}"
            )
            parts = [count, self.device.name, intra.name] + ([inter.name] if inter else [])
            object.__setattr__(self, "name", " ".join(parts))

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def node_of(self, rank: int) -> int:
        if not 0 <= rank < self.world_size:
            raise ValueError(
                f"rank {rank} is not in {self.name!r} (ranks 0..{self.world_size - 1})"
            )
        return rank // self.gpus_per_node

    def __str__(self) -> str:
        text = f"{self.name}: {self.nodes} node(s) × {self.gpus_per_node} {self.device.name}"
        text += f", intra {self.intra}"
        return text + (f", inter {self.inter}" if self.inter else "")

    @classmethod
    def parse(cls, text: str | Topology) -> Topology:
        """A topology from a preset name or the grammar in ``TOPOLOGY_FORMS``; ValueError
        naming the accepted forms otherwise (``"this-machine"`` is measured:
        ``pdlab.cost.calibration.calibrate(cluster).topology``)."""
        if isinstance(text, Topology):
            return text
        spec = " ".join(str(text).split())
        presets = {name.lower(): name for name in PRESETS}
        if spec.lower() in presets:
            name = presets[spec.lower()]
            return cls._from_tokens(PRESETS[name], name)
        if spec.lower() == THIS_MACHINE:
            raise _bad_topology(text, "'this-machine' is measured on a running cluster: pass cluster=, or calibrate(cluster).topology")  # fmt: skip
        return cls._from_tokens(spec, "")

    @classmethod
    def _from_tokens(cls, spec: str, name: str) -> Topology:
        count, *rest = spec.split() or [""]
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", count)
        if match is None:
            raise _bad_topology(spec, f"{count!r} is neither a preset nor a GPU count")
        nodes, gpus = (int(match[1]), int(match[2])) if match[2] else (1, int(match[1]))
        device = None
        links = []
        for token in rest:
            if token.lower() in DEVICES:
                device = token
                continue
            try:
                links.append(parse_link(token))
            except ValueError:
                raise _bad_topology(spec, f"{token!r} is neither a device nor a link") from None
        if not 1 <= len(links) <= 2:
            raise _bad_topology(spec, f"it names {len(links)} links; give the intra-node link and, for several nodes, the inter-node one")  # fmt: skip
        try:
            return cls(nodes, gpus, device, links[0], links[1] if len(links) > 1 else None, name)
        except ValueError as exc:
            raise _bad_topology(spec, str(exc)) from None
