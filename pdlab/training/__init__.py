"""Training: one run as plain values (``config``), the models and data, the loop
(``loop``: ``pdlab.train``), checkpoints, and one file per parallelism in ``parallel/``.
"""

from pdlab._lazy import submodules

__getattr__ = submodules(__name__)
