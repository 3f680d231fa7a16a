"""What the benchmarks share."""

import statistics


def median_after(values, warmup: int) -> float:
    """The median of ``values`` after the first ``warmup`` (lazy init, caches, counted steps)."""
    return statistics.median(list(values)[warmup:])
