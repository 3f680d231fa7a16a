"""pdlab: learn distributed training by running it, one notebook cell away.

    import pdlab
    cluster = pdlab.Cluster(world_size=4)   # 4 rank processes in one process group
    cluster.run(fn)                         # fn on every rank; results ordered by rank
    cluster.shutdown()

Inside a rank: ``pdlab.rank()``, ``pdlab.world_size()``, ``pdlab.device()`` and
``pdlab.log(**metrics)``. In IPython: ``%load_ext pdlab``, then ``%pdlab start 4`` and
``%%ranks``.
"""

from pdlab.cluster import CallTimeout, Cluster, ClusterStatus, RankError
from pdlab.runtime import device, log, rank, world_size

__all__ = [
    "CallTimeout",
    "Cluster",
    "ClusterStatus",
    "Dashboard",
    "RankError",
    "Topology",
    "TrainResult",
    "device",
    "expected_comm",
    "load_ipython_extension",
    "log",
    "plan",
    "rank",
    "train",
    "world_size",
]


def __getattr__(name: str):
    """The heavier parts on first use: ``import pdlab`` (which every rank process does at
    start-up) stays free of pandas, plotly and ipywidgets."""
    if name in ("train", "expected_comm", "TrainResult"):
        from pdlab import training

        return getattr(training, name)
    if name == "Topology":
        from pdlab.topology import Topology

        return Topology
    if name == "plan":
        from pdlab.planner import plan

        return plan
    if name == "Dashboard":
        from pdlab.dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module 'pdlab' has no attribute {name!r}")


def load_ipython_extension(ipython) -> None:
    """``%load_ext pdlab``: registers ``%pdlab`` and ``%%ranks``."""
    from pdlab.magics import register

    register(ipython)
