"""Cost: what a run would cost elsewhere.

Topologies and their links, the alpha-beta cost model, calibration of this machine,
emulating a slower link on the ranks, the predictor (replays a measured run on another
topology), memory footprints and the planner.
"""

from pdlab._lazy import submodules

__getattr__ = submodules(__name__)
