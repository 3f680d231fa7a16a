"""What test_prestart runs on ranks, in a module that imports nothing heavy: a function is
shipped to the ranks by reference, so a rank imports its module first, and the test
modules import most of pdlab (a first call would then do the warm-up's work itself)."""

from __future__ import annotations

import sys


def first_draws() -> dict:
    """What a call draws from the global generators first, and whether torch's is still as
    seeded: its draws equal a fresh generator's with the same seed."""
    import random

    import numpy as np
    import torch

    drawn = torch.randn(4)
    fresh = torch.randn(4, generator=torch.Generator().manual_seed(torch.initial_seed()))
    return {
        "untouched": bool(drawn.equal(fresh)),
        "seed": torch.initial_seed(),
        "numpy": tuple(np.random.rand(2).tolist()),
        "python": random.random(),
    }


def draws_while_warming_up() -> tuple[bool, list[str], dict]:
    import threading

    warming = any(t.name == "pdlab-warm-up" for t in threading.enumerate())
    half_imported = [
        name
        for name, module in list(sys.modules.items())
        if getattr(getattr(module, "__spec__", None), "_initializing", False)
    ]
    return warming, half_imported, first_draws()
