"""Assertions the strategy tests share."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import torch

from pdlab.measure.comm import CommEvent, totals


def assert_float32_close(actual, expected, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to float32 rounding: both as float32, with torch's
    float32 tolerance (rtol 1.3e-6, atol 1e-5). pandas and Python floats are float64, and
    float64's tolerance (1e-7) fails a correct float32 run on a different reduction order."""
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float32),
        torch.as_tensor(expected, dtype=torch.float32),
        msg=msg,
    )


def assert_same_losses(result, baseline) -> None:
    """Every step's loss of ``result`` is ``baseline``'s, up to float32 rounding."""
    assert_float32_close(result.steps.loss.values, baseline.steps.loss.values)


def assert_parity(result, baseline) -> None:
    """Same loss every step and same final parameters as one process, up to float32 rounding."""
    assert_same_losses(result, baseline)
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
    """``file.py:N``, as pdlab.measure.flight names it: the line of ``fn`` holding ``text``."""
    source, first = inspect.getsourcelines(fn)
    offset = next(i for i, line in enumerate(source) if text in line)
    return f"{Path(inspect.getsourcefile(fn)).name}:{first + offset}"


def rank_lines(text: str, rank: int) -> list[str]:
    """The lines rank ``rank`` printed, as pdlab shows them (``[rank R] ``), without the prefix."""
    prefix = f"[rank {rank}] "
    return [line.removeprefix(prefix) for line in text.splitlines() if line.startswith(prefix)]


def torchrun_lines(
    script: Path | str, args: list[str], logs: Path, cwd: Path | None = None
) -> dict[int, list[str]]:
    """What each rank prints under ``torchrun --nproc-per-node 2`` started in ``cwd`` (the
    script's folder by default); each rank's stdout and stderr stay in ``logs`` (FACTS.md:
    torchrun's own output can glue two ranks' lines together).

    Not checked: torchrun's exit code. gloo sometimes aborts a rank in its teardown after
    the script has finished ("terminate called without an active exception"; FACTS.md)."""
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         f"--log-dir={logs}", "--redirects=3", str(script), *args],
        cwd=cwd or Path(script).parent, capture_output=True, timeout=120,
        # os.environ, as pdlab's ranks get: not the C-level environment, where readline
        # (imported by pytest) put LINES and COLUMNS behind Python's back.
        env=dict(os.environ),
    )  # fmt: skip
    return {rank: torchrun_log(logs, rank) for rank in (0, 1)}


def torchrun_log(logs: Path, rank: int, stream: str = "stdout") -> list[str]:
    """Rank ``rank``'s ``stream`` ("stdout", "stderr") from ``torchrun_lines``' run."""
    [log] = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
    return log.read_text().splitlines()


def wait_for_warm_up(cluster, seconds: float = 120) -> None:
    """Until every rank has imported what its warm-up preloads (``pdlab.control.warmup``): a
    warm-up in the background changes a rank's modules, and its imports set variables such as
    TORCHINDUCTOR_CACHE_DIR, while a test compares two runs."""
    import time

    from pdlab.control import warmup

    deadline = time.monotonic() + seconds
    while any(cluster.run(lambda: [m for m in warmup.modules() if m not in sys.modules])):
        assert time.monotonic() < deadline, "the warm-up did not finish"
        time.sleep(0.5)
