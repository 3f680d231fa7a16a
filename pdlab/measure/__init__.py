"""Measurement: what happened on a rank, counted exactly.

Bytes each op moved (``comm``, on the wire: ``wire``), memory, FLOPs, busy time, the flight
recorder and ``where`` a rank is, step traces and profiles. The lowest layer: it knows nothing
of clusters, training or cost models; whatever models a link plugs in through ``comm``'s hook.
"""

from pdlab._lazy import submodules

__getattr__ = submodules(__name__)
