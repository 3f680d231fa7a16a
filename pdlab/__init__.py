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

from pdlab._lazy import submodules
from pdlab.control import warmup as _warmup

_submodule = submodules(__name__)

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
    "CallTimeout": "pdlab.control.cluster",
    "Cluster": "pdlab.control.cluster",
    "ClusterStatus": "pdlab.control.cluster",
    "RankError": "pdlab.control.cluster",
    "device": "pdlab.control.runtime",
    "display": "pdlab.control.rich_output",
    "log": "pdlab.control.runtime",
    "rank": "pdlab.control.runtime",
    "world_size": "pdlab.control.runtime",
    "train": "pdlab.training.loop",
    "expected_comm": "pdlab.training.loop",
    "TrainResult": "pdlab.training.loop",
    "TrainConfig": "pdlab.training.config",
    "Topology": "pdlab.cost.topology",
    "plan": "pdlab.cost.planner",
    "predict": "pdlab.cost.predictor",
    "Dashboard": "pdlab.lab.dashboard",
}


# What idle ranks import ahead of a first ``pdlab.train`` (the control plane's warm-up knows
# no trainer): the trainer, whose strategy registry names each strategy's module in turn, and
# the calibration a dashboard's first Start runs on them; and
# what a kernel's first cluster imports for it (``pdlab.control.warmup.in_kernel``): the
# trainer's plug, then the dashboard, a step at a time (plotly, ipywidgets, the cost layer).
_warmup.preload("pdlab.training.loop", "pdlab.cost.calibration")
_warmup.preload(
    "pdlab.cost.emulation",
    "plotly.graph_objects",
    "ipywidgets",
    "pdlab.cost.predictor",
    "pdlab.lab.dashboard",
    kernel=True,
)

# Modules that plug into a lower layer's hook, imported with the module that has the hook:
# the trainer (training) emulates ``link=`` with the cost layer's emulator.
_PLUGS = {"pdlab.training.loop": ("pdlab.cost.emulation",)}


def __getattr__(name: str):
    if name in _LAZY:
        # Not beside the kernel's warm-up, which may be importing this very module graph.
        # (Only here: ``_lazy``'s submodules are reached from inside imports, where waiting
        # for the warm-up could wait for a module this thread is importing.)
        with _warmup.beside_the_kernels():
            module = importlib.import_module(_LAZY[name])
            for plug in _PLUGS.get(module.__name__, ()):
                importlib.import_module(plug)
        return getattr(module, name)
    return _submodule(name)  # a layer (pdlab.measure, ...), or pdlab.compat


def load_ipython_extension(ipython) -> None:
    """``%load_ext pdlab``: registers ``%pdlab`` and ``%%ranks``."""
    from pdlab.lab.magics import register

    register(ipython)
