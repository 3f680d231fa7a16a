"""Assertions the strategy tests share."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from pdlab.measure.comm import CommEvent, totals


def assert_float32_close(actual, expected, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to float32 rounding: both as float32, with torch's
    float32 tolerance (rtol 1.3e-6, atol 1e-5). pandas and Python floats are float64, and
    float64's tolerance (1e-7) fails a correct float32 run on a different reduction order."""
    torch.testing.assert_close(
        torch.tensor(np.array(actual, dtype=np.float32)),  # a copy: pandas' arrays are read-only
        torch.tensor(np.array(expected, dtype=np.float32)),
        msg=msg,
    )


def assert_bfloat16_close(actual, expected, msg: str | None = None) -> None:
    """``actual`` equals ``expected`` up to bfloat16 rounding: both as bfloat16, with torch's
    bfloat16 tolerance (rtol 1.6e-2, atol 1e-5): 8 bits of mantissa, a step of 2^-8 (0.4%)."""
    torch.testing.assert_close(
        torch.tensor(np.array(actual, dtype=np.float32)).to(torch.bfloat16),
        torch.tensor(np.array(expected, dtype=np.float32)).to(torch.bfloat16),
        msg=msg,
    )


def assert_same_losses(result, baseline) -> None:
    """Every step's loss of ``result`` is ``baseline``'s, up to the rounding of the run's
    precision (float32, or bfloat16 for a bf16 run against a bf16 baseline)."""
    assert result.config.precision == baseline.config.precision
    close = assert_bfloat16_close if result.config.precision == "bf16" else assert_float32_close
    close(result.steps.loss.values, baseline.steps.loss.values)


def assert_parity(result, baseline) -> None:
    """Same loss every step and same final parameters as one process, up to the rounding of
    the run's precision."""
    assert_same_losses(result, baseline)
    assert result.state_dict.keys() == baseline.state_dict.keys()
    for name, p in baseline.state_dict.items():
        if result.config.precision == "bf16":
            # Rounded to 8 bits, a sum of partial results (TP's all-reduce, DP's) is off by
            # 2^-9 of its largest part, not of the sum: a weight near 0 can move by a
            # rounding of the tensor's large ones (seen: 1 ulp of 0.07 on a weight of 0.01).
            scale = p.float().abs().max().item()
            torch.testing.assert_close(
                result.state_dict[name].float(),
                p.float(),
                rtol=1.6e-2,
                atol=2**-8 * scale,
                msg=name,
            )
        else:  # Adam divides by sqrt(v): where a gradient is near 0, rounding differences in
            # the reduction order move a weight by up to ~1e-5 over 20 steps (seen on CUDA).
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
    """Until every rank has imported what its warm-up preloads and taken its first steps,
    on its main thread too (``pdlab.control.warmup``): a warm-up in the background changes a rank's modules, and its
    imports set variables such as TORCHINDUCTOR_CACHE_DIR, while a test compares two runs."""
    import threading
    import time

    from pdlab.control import warmup

    def warming() -> bool:
        missing = [m for m in warmup.modules() if m not in sys.modules]
        on_main_thread = warmup._imported.is_set() and bool(warmup._main_thread_uses)
        return (
            bool(missing)
            or on_main_thread
            or any(t.name == "pdlab-warm-up" for t in threading.enumerate())
        )

    deadline = time.monotonic() + seconds
    while any(cluster.run(warming)):
        assert time.monotonic() < deadline, "the warm-up did not finish"
        time.sleep(3 * warmup.IDLE_S)  # idle: a rank's main thread warms up only then


def small_run(strategy: str) -> dict:
    """What a small run of ``strategy`` needs beyond the defaults: context parallelism a
    model with a sequence (the gpt, on 4 samples: its ~0.8 MB of gradients are all-reduced
    over cp), expert parallelism the moe model, and a strategy without a scratch version
    (pp-zbv) runs torch's."""
    from pdlab.training import registry

    impls = registry.get(strategy).impls
    run = {"impl": "scratch" if "scratch" in impls else next(iter(impls))}
    if strategy in ("cp", "dp-cp"):
        run |= {"model": "gpt", "batch_size": 4}
    if strategy in ("ep", "dp-ep"):
        run |= {"model": "moe", "batch_size": 4}  # 4 sequences: ~0.3 MB a rank a step
    return run
