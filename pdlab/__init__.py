"""pdlab: learn distributed training by running it, one notebook cell away.

    import pdlab
    cluster = pdlab.Cluster(world_size=4)   # 4 rank processes in one process group
    cluster.run(fn)                         # fn on every rank; results ordered by rank
    cluster.shutdown()

Inside a rank: ``pdlab.rank()``, ``pdlab.world_size()``, ``pdlab.device()``,
``pdlab.log(**metrics)`` and ``pdlab.display(obj)``. In IPython: ``%load_ext pdlab``, then
``%pdlab start 4`` and ``%%ranks``.
"""

import importlib

__all__ = [
    "CallTimeout",
    "Cluster",
    "ClusterStatus",
    "Dashboard",
    "RankError",
    "Topology",
    "TrainConfig",
    "TrainResult",
    "device",
    "display",
    "expected_comm",
    "load_ipython_extension",
    "log",
    "plan",
    "predict",
    "rank",
    "train",
    "world_size",
]

# Loaded on first use, so that ``import pdlab`` — which every rank process does first, before
# it can arm its parent-death signal — costs next to nothing; and the kernel pays for torch,
# pandas, plotly and ipywidgets only when it needs them.
_LAZY = {
    "CallTimeout": "pdlab.cluster",
    "Cluster": "pdlab.cluster",
    "ClusterStatus": "pdlab.cluster",
    "RankError": "pdlab.cluster",
    "device": "pdlab.runtime",
    "display": "pdlab.rich_output",
    "log": "pdlab.runtime",
    "rank": "pdlab.runtime",
    "world_size": "pdlab.runtime",
    "train": "pdlab.training",
    "expected_comm": "pdlab.training",
    "TrainResult": "pdlab.training",
    "TrainConfig": "pdlab.config",
    "Topology": "pdlab.topology",
    "plan": "pdlab.planner",
    "predict": "pdlab.predictor",
    "Dashboard": "pdlab.dashboard",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    try:
        return importlib.import_module(f"pdlab.{name}")  # a submodule: pdlab.runtime, ...
    except ModuleNotFoundError:
        raise AttributeError(f"module 'pdlab' has no attribute {name!r}") from None


def load_ipython_extension(ipython) -> None:
    """``%load_ext pdlab``: registers ``%pdlab`` and ``%%ranks``."""
    from pdlab.magics import register

    register(ipython)
