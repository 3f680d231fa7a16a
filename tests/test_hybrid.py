"""Hybrid parallelism on a 2 x 2 grid: parity with ``single``, exact comm per group, errors."""

from __future__ import annotations

import pytest

from pdlab.measure.comm import totals
from pdlab.training.loop import expected_comm, train, validate
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_parity, measured_per_step

# SGD: see tests/test_tensor.py for why parity is checked with it.
PARITY = {"steps": 20, "optimizer": "sgd", "lr": 0.1, "full_state": True}
MLP_GRAD_BYTES = 34828


@pytest.fixture(scope="module")
def baselines():
    return {m: train(strategy="single", model=m, **PARITY) for m in ("mlp", "gpt")}


@pytest.mark.parametrize(
    ("strategy", "impl", "model", "micro_batches"),
    [
        ("dp-tp", "scratch", "mlp", 1),
        ("dp-tp", "torch", "mlp", 1),
        ("dp-tp", "scratch", "gpt", 1),
        ("dp-tp", "torch", "gpt", 1),
        ("dp-pp", "scratch", "mlp", 2),
        ("dp-pp", "torch", "mlp", 2),
        ("dp-pp", "scratch", "gpt", 2),
    ],
)
def test_parity_and_exact_comm(cluster4, baselines, strategy, impl, model, micro_batches):
    result = train(
        cluster4, strategy=strategy, impl=impl, model=model, micro_batches=micro_batches, **PARITY
    )
    assert_parity(result, baselines[model])
    expected = totals(result.expected_comm)
    inner = "tp" if strategy == "dp-tp" else "pp"
    assert {group for _, group in expected} == {inner, "dp"}
    assert all(measured == expected for measured in measured_per_step(result))


def test_dp_all_reduces_only_this_ranks_part():
    """Each rank averages only its part of the gradient over dp: TP halves dp's traffic."""
    events = expected_comm(TrainConfig(strategy="dp-tp", model="mlp", world_size=4))
    # Half of every weight, plus the row-parallel biases (64 + 3 floats) that each tp rank
    # holds whole: 4387 floats a rank, against the whole model's 8707 in plain dp.
    per_rank = (MLP_GRAD_BYTES + (64 + 3) * 4) // 2
    assert totals(events)["all_reduce", "dp"] == (4 * per_rank, 4 * per_rank)
    tp = 4 * 16 * 4 * (64 + 3 + 64)  # f and g as in plain tp, on B/dp = 16 samples a rank
    assert totals(events)["all_reduce", "tp"] == (tp, tp)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "dp-tp", "model": "article", "world_size": 8}, r"divides 10"),
        ({"strategy": "dp-pp", "micro_batches": 3}, r"batch per data-parallel rank \(16\)"),
    ],
)
def test_the_model_parallel_half_checks_shapes(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{"model": "mlp", "world_size": 4, **changes}))
