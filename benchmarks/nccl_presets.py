"""The GPU presets' all-reduce and all-gather as pdlab's cost model times them (NCCL's model,
``pdlab.cost.nccl``), beside the published bus bandwidths: the table in docs/clusters.md.

    python benchmarks/nccl_presets.py

Each cell: nccl-tests' bus bandwidth of the op at that size (at 8 B, its time) and the
algorithm/protocol NCCL's model picks. Published figures are for large messages.
"""

from __future__ import annotations

from pdlab.cost import nccl
from pdlab.cost.costmodel import op_time
from pdlab.cost.topology import Topology

SIZES = (8, 1 << 20, 64 << 20, 1 << 30)
# (preset, ranks (a count, or global ranks), op) -> (published busbw, source)
PUBLISHED = {
    ("8xH100", 8, "all_reduce"): (
        "~480 GB/s (NVLS, > 256 MB); 476; 475 (H200)",
        "nccl-tests #212, #290, #272",
    ),
    ("8xH100", 8, "all_gather"): ("~370 GB/s (ring)", "nccl-tests #212"),
    ("2x8xH100-ib-ndr400", (0, 8), "all_reduce"): ("46-48 GB/s a NIC", "issue 17"),
}
ROWS = [
    ("8xH100", 8),
    ("8xA100", 8),
    ("4xPCIe5", 4),
    ("4xPCIe4", 4),
    ("2x8xH100-ib-ndr400", (0, 8)),
    ("2x8xH100-ib-ndr400", 16),
]  # ranks: the first n of the preset, or these global ranks


def cell(op: str, size: int, ranks, topology: Topology) -> str:
    group = list(ranks) if isinstance(ranks, tuple) else list(range(ranks))
    n, nodes = len(group), len({topology.node_of(r) for r in group})
    inter = topology.inter.name if topology.inter else None
    algo, proto, _ = nccl.choice(op, size, n, nodes, topology.intra.name, inter, topology.device.name)  # fmt: skip
    seconds = op_time(op, size, group, topology)
    if size < 1024:
        return f"{seconds * 1e6:.3g} µs {algo}/{proto}"
    return f"{nccl.bus_bandwidth(op, size, seconds, n) / 1e9:.3g} GB/s {algo}/{proto}"


def main() -> None:
    print("| preset | ranks | op | 8 B | 1 MiB | 64 MiB | 1 GiB | published | source |")
    print("|---|---|---|---|---|---|---|---|---|")
    for preset, ranks in ROWS:
        topology = Topology.parse(preset)
        label = f"{ranks[0]}, {ranks[1]} (a node each)" if isinstance(ranks, tuple) else ranks
        for op in ("all_reduce", "all_gather"):
            published, source = PUBLISHED.get((preset, ranks, op), ("", ""))
            cells = " | ".join(cell(op, size, ranks, topology) for size in SIZES)
            print(f"| `{preset}` | {label} | {op} | {cells} | {published} | {source} |")


if __name__ == "__main__":
    main()
