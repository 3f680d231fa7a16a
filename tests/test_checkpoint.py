"""Checkpoints: save under one sharding and resume under another; survive a killed rank."""

from __future__ import annotations

import pytest
import torch

import pdlab
from pdlab.parallel.base import TrainConfig
from pdlab.training import train

STEPS, EVERY = 20, 10


def losses_from(result, step: int) -> torch.Tensor:
    return torch.tensor(result.steps.loss[result.steps.step >= step].values)


def run_and_die_at(config, step: int):
    """``run_on_rank``, except that rank 1 is SIGKILLed as it reports ``step`` (an OOM kill)."""
    import os
    import signal

    from pdlab import runtime
    from pdlab.training import run_on_rank

    report = runtime.log

    def report_or_die(**record):
        if record["step"] == step and runtime.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        report(**record)

    runtime.log = report_or_die
    try:
        return run_on_rank(config)
    finally:
        runtime.log = report


@pytest.mark.parametrize(
    ("strategy", "impl"), [("tp", "torch"), ("zero3", "torch"), ("zero1", "torch")]
)
def test_dp_checkpoint_resumes_under_another_sharding(cluster2, tmp_path, strategy, impl):
    """DDP saves replicated tensors; DTensor TP and FSDP2 load just their shards of them, and
    ZeroRedundancyOptimizer's local optimizer the moments of its own partition."""
    uninterrupted = train(cluster2, strategy="dp", impl="torch", steps=STEPS)
    train(cluster2, strategy="dp", impl="torch", steps=EVERY, checkpoint_dir=str(tmp_path), checkpoint_every=EVERY)  # fmt: skip
    resumed = train(cluster2, strategy=strategy, impl=impl, steps=STEPS, checkpoint_dir=str(tmp_path), resume=True)  # fmt: skip
    assert resumed.steps.step.tolist() == list(range(EVERY, STEPS))
    # Model *and* Adam moments moved: the next ten losses are the uninterrupted run's.
    torch.testing.assert_close(losses_from(resumed, EVERY), losses_from(uninterrupted, EVERY))


def test_a_killed_rank_resumes_from_its_last_checkpoint(cluster2, tmp_path):
    kw = {"strategy": "zero3", "impl": "torch", "steps": STEPS, "checkpoint_dir": str(tmp_path)}
    uninterrupted = train(cluster2, strategy="zero3", impl="torch", steps=STEPS)
    config = TrainConfig(**kw, checkpoint_every=5, world_size=2)
    # Rank 0 fails too, in its next collective; which failure the cluster reports first races.
    with pytest.raises(pdlab.RankError):
        cluster2.run(run_and_die_at, config, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000010"]

    resumed = train(cluster2, **kw, checkpoint_every=5, resume=True)
    assert resumed.steps.step.tolist() == list(range(10, STEPS))
    # Nothing lost: the same losses, bit for bit, as if the rank had never died.
    assert losses_from(resumed, 10).tolist() == losses_from(uninterrupted, 10).tolist()


def test_plain_tensor_shards_are_refused_not_half_saved(cluster2, tmp_path):
    """ZeRO-3 from scratch keeps a different ``shard`` per rank under one name."""
    with pytest.raises(pdlab.RankError, match="DCP would save one rank's copy"):
        train(cluster2, strategy="zero3", steps=1, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    assert list(tmp_path.iterdir()) == []
