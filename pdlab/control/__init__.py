"""The control plane: rank processes driven from the kernel.

``Cluster`` starts ranks (``launcher``, the ``forkserver``), talks to them over an
authenticated ``channel`` in ``protocol``'s messages, streams their ``output`` and rich output
back, and runs any code on them (``worker``, ``scripts``). ``runtime`` is the in-rank API
(``pdlab.rank()``, ``pdlab.log()``). It runs code; it knows no strategy, model or cost.
"""

from pdlab._lazy import submodules

__getattr__ = submodules(__name__)
