"""bf16 (ZeRO's mixed precision): bf16 parameters and gradients, fp32 master weights and Adam
state. The gradient bytes halve on the wire; the losses match one process run in bf16."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pdlab.cost.footprint import PRECISIONS
from pdlab.measure.comm import totals
from pdlab.training.config import TrainConfig
from pdlab.training.loop import expected_comm, train, validate
from tests.helpers import assert_bfloat16_close, assert_parity, measured_per_step
from tests.test_sharded import P, holds_zero2_split
from tests.test_traffic import assert_bytes_on_the_wire

# SGD: Adam's update is ±lr wherever a gradient is near 0, so a bf16 rounding difference
# (2^-8, where float32's is 2^-24) flips whole steps of a few weights (seen: 0.01 on weights of
# 0.1 in dp/torch). SGD's update is lr·g: rounding moves it by rounding.
RUN = {"model": "mlp", "steps": 3, "batch_size": 16, "full_state": True, "optimizer": "sgd", "lr": 0.05}  # fmt: skip
CASES = [("dp", "torch"), ("tp", "scratch"), ("zero1", "torch"), ("zero2", "scratch"),
         ("zero2", "torch"), ("zero3", "scratch")]  # fmt: skip


def _collectives_in_bf16() -> list:
    """On a rank: gloo's collectives on bfloat16 (supported on CPU since PyTorch PR 113557)."""
    import torch.distributed as dist

    r, bf16 = dist.get_rank(), torch.bfloat16
    summed = torch.full((3,), 1.5 + r, dtype=bf16)
    dist.all_reduce(summed)
    shard = torch.empty(2, dtype=bf16)
    dist.reduce_scatter_tensor(shard, torch.arange(4, dtype=bf16) + r)
    gathered = torch.empty(4, dtype=bf16)
    dist.all_gather_into_tensor(gathered, torch.full((2,), float(r), dtype=bf16))
    return [t.dtype == bf16 and t.tolist() for t in (summed, shard, gathered)]


def test_gloo_reduces_bfloat16(cluster2):
    assert cluster2.run(_collectives_in_bf16) == [
        [[4.0] * 3, [1.0, 3.0], [0.0, 0.0, 1.0, 1.0]],
        [[4.0] * 3, [5.0, 7.0], [0.0, 0.0, 1.0, 1.0]],
    ]


@pytest.fixture(scope="module")
def baseline():
    return train(strategy="single", precision="bf16", **RUN)


@pytest.mark.parametrize(("strategy", "impl"), CASES)
def test_bf16_matches_one_bf16_process_and_halves_the_bytes(cluster2, baseline, strategy, impl):
    result = train(cluster2, strategy=strategy, impl=impl, precision="bf16", **RUN)
    assert_parity(result, baseline)
    assert all(m == totals(result.expected_comm) for m in measured_per_step(result))
    fp32 = expected_comm(replace(result.config, precision="fp32"))
    assert result.steps.comm_bytes.tolist() == [sum(e.payload_bytes for e in fp32) / 2] * 3
    assert_bytes_on_the_wire(result)


def test_a_wrong_step_fails_bf16_parity(baseline):
    """bf16's tolerance is loose (1.6%), but not blind: a doubled step (a gradient summed
    over the 2 ranks instead of averaged) moves the parameters past it."""
    wrong = train(strategy="single", precision="bf16", **(RUN | {"lr": 2 * RUN["lr"]}))
    with pytest.raises(AssertionError):
        assert_parity(wrong, baseline)  # the parameters
    with pytest.raises(AssertionError):
        assert_bfloat16_close(wrong.steps.loss.values[-1] + 0.02, baseline.steps.loss.values[-1])


def test_zero2_in_bf16_holds_the_papers_mixed_precision_bytes(cluster2):
    """2Ψ + (2 + 12)Ψ/N_d: bf16 parameters and gradient shards, fp32 masters and moments."""
    mixed, fp32 = PRECISIONS["mixed"], PRECISIONS["fp32"]
    for precision in ("bf16", "fp32"):
        result = train(cluster2, strategy="zero2", precision=precision, steps=1)
        for held in result.memory.to_dict("records"):
            assert holds_zero2_split(held, 2, mixed) == (precision == "bf16"), held
            assert holds_zero2_split(held, 2, fp32) == (precision == "fp32"), held
    assert result.memory.param_bytes.tolist() == [P, P]


def test_bf16_runs_are_refused_a_checkpoint(tmp_path):
    config = TrainConfig(precision="bf16", checkpoint_dir=str(tmp_path), checkpoint_every=1)
    with pytest.raises(ValueError, match="use precision='fp32' to checkpoint"):
        validate(config)
    with pytest.raises(ValueError, match="unknown precision 'fp16'"):
        validate(TrainConfig(precision="fp16"))


def test_cli_runs_zero2_with_recompute_and_bf16_and_says_what_to_use_instead():
    command = [sys.executable, "-m", "pdlab", "run", "--strategy", "zero2", "--steps", "2"]
    out = subprocess.run(
        [*command, "--impl", "torch", "--model", "gpt", "--recompute", "full", "--precision", "bf16", "--json"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    *steps, summary = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(row["comm_bytes"] == row["expected_comm_bytes"] for row in steps)
    assert summary["summary"]["precision"] == "bf16"
    refused = subprocess.run(
        [*command, "--recompute", "full"], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2
    assert "model 'mlp' has none: use model='gpt', or recompute='none'" in refused.stderr
