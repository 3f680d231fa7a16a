"""Assertions the strategy tests share."""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from pdlab.comm import CommEvent, totals


def assert_parity(result, baseline) -> None:
    """Same loss every step and same final parameters as one process, up to float32 rounding."""
    torch.testing.assert_close(
        torch.tensor(result.steps.loss.values), torch.tensor(baseline.steps.loss.values),
        rtol=1e-5, atol=1e-6,
    )  # fmt: skip
    assert result.state_dict.keys() == baseline.state_dict.keys()
    # Adam divides by sqrt(v): where a gradient is near 0, rounding differences in the
    # reduction order move a weight by up to ~1e-5 over 20 steps (seen on CUDA).
    for name, p in baseline.state_dict.items():
        torch.testing.assert_close(result.state_dict[name], p, rtol=1e-5, atol=1e-5, msg=name)


def measured_per_step(result) -> list[dict]:
    """``comm.totals`` of each step's events, over all ranks."""
    return [
        totals(CommEvent(**e.drop(["step", "rank"]).to_dict()) for _, e in g.iterrows())
        for _, g in result.comm.groupby("step")
    ]


def line_of(fn, text: str) -> str:
    """``file.py:N``, as pdlab.flight names it: the line of ``fn`` holding ``text``."""
    source, first = inspect.getsourcelines(fn)
    offset = next(i for i, line in enumerate(source) if text in line)
    return f"{Path(inspect.getsourcefile(fn)).name}:{first + offset}"
