"""What the benchmarks share."""

import statistics

from pdlab.training import registry


def median_after(values, warmup: int) -> float:
    """The median of ``values`` after the first ``warmup`` (lazy init, caches, counted steps)."""
    return statistics.median(list(values)[warmup:])


def strategies(world: int, impls: list[str]) -> list[tuple[str, str]]:
    """Every registered (strategy, impl) but ``single`` that runs at ``world`` ranks on CPU."""
    found = []
    for name in registry.names():
        strategy = registry.get(name)
        if name != "single" and strategy.fits(world):
            found += [(name, impl) for impl in impls if impl in strategy.impls]
    return found


def batch_for(world: int, micro_batches: int, batch_size: int = 32) -> int:
    """``batch_size`` rounded up so that every rank and micro-batch gets a whole share
    (world 3 with 4 micro-batches: 36)."""
    unit = world * micro_batches
    return -(-batch_size // unit) * unit


def emulated_shape(strategy: str, world: int) -> dict[str, int]:
    """The batch and micro-batches the emulation benchmarks give ``strategy`` at ``world``
    ranks (real and emulated alike): 4 micro-batches for a pipeline, a batch of ~32 that
    every rank and micro-batch divides."""
    return {
        "batch_size": batch_for(world, 4),
        "micro_batches": 4 if registry.get(strategy).micro_batched else 1,
    }
