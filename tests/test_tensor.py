"""Tensor parallelism: parity with ``single``, exact f/g communication, divisibility errors."""

from __future__ import annotations

import pytest

from pdlab.measure.comm import totals
from pdlab.training.loop import expected_comm, train, validate
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_parity, assert_same_losses, measured_per_step

STEPS = 20
# SGD for parity: its update is linear in the gradient, so the TP and single runs stay within
# float32 rounding. Adam divides by sqrt(v), which turns rounding noise in a gradient that is
# zero in exact arithmetic (the attention's k bias: softmax ignores a per-query constant)
# into full-size steps; see test_adam_on_shards.
PARITY = {"steps": STEPS, "optimizer": "sgd", "lr": 0.1, "full_state": True}


@pytest.fixture(scope="module")
def baselines():
    """``single`` on each model, trained once for the whole module."""
    return {m: train(strategy="single", model=m, **PARITY) for m in ("article", "mlp", "gpt")}


@pytest.mark.parametrize("impl", ["scratch", "torch"])
@pytest.mark.parametrize(("model", "tp"), [("article", 2), ("mlp", 2), ("mlp", 4), ("gpt", 2)])
def test_parity_and_exact_comm(request, baselines, model, tp, impl):
    cluster = request.getfixturevalue(f"cluster{tp}")
    result = train(cluster, strategy="tp", impl=impl, model=model, **PARITY)
    assert_parity(result, baselines[model])
    expected = totals(result.expected_comm)
    assert list(expected) == [("all_reduce", "tp")]
    assert all(measured == expected for measured in measured_per_step(result))
    assert result.max_rank_param_bytes < baselines[model].max_rank_param_bytes


def test_comm_formula():
    """f and g on the activations, in bytes, for B = 32 float32 samples on every rank."""
    mlp = TrainConfig(strategy="tp", model="mlp", world_size=2)
    # Two regions (64 -> 64 and 64 -> 3 wide outputs); the first one's input is the data.
    per_rank = 32 * 4 * (64 + 3) + 32 * 4 * 64  # g forward + f backward of the second region
    assert totals(expected_comm(mlp)) == {("all_reduce", "tp"): (2 * per_rank, 2 * per_rank)}
    gpt = TrainConfig(strategy="tp", model="gpt", world_size=4)
    # 4 blocks x 2 regions (attention, MLP) x (g forward + f backward) of [32, 32 tokens, 64].
    per_rank = 4 * 2 * 2 * 32 * 32 * 64 * 4
    assert totals(expected_comm(gpt)) == {
        ("all_reduce", "tp"): (4 * per_rank, 4 * 2 * 3 / 4 * per_rank)
    }


@pytest.mark.parametrize("impl", ["scratch", "torch"])
def test_adam_on_shards(cluster2, impl):
    """Adam keeps per-element state, so on shards it is Adam on the whole (up to rounding)."""
    kwargs = {"model": "mlp", "steps": STEPS, "optimizer": "adam"}
    result = train(cluster2, strategy="tp", impl=impl, **kwargs)
    baseline = train(strategy="single", **kwargs)
    assert_same_losses(result, baseline)


@pytest.mark.parametrize(
    ("model", "world_size", "message"),
    [
        ("article", 4, r"cannot split the width of 0.linear \(10\) .* divides 10 \(1, 2, 5, 10\)"),
        ("mlp", 3, r"width of 0.linear \(64\) of model 'mlp': use a tp that divides 64"),
        ("gpt", 8, r"cannot split the attention heads \(4\) .* divides 4 \(1, 2, 4\)"),
    ],
)
def test_indivisible_shapes_say_which_tp_fits(model, world_size, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(strategy="tp", model=model, world_size=world_size))
