"""Data parallelism and the training driver: parity with ``single``, exact comm, validation."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pdlab.measure.comm import totals
from pdlab.training import registry
from pdlab.training.loop import train, validate
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_parity, measured_per_step

STEPS = 20


@pytest.fixture(scope="module")
def baseline():
    return train(strategy="single", model="mlp", steps=STEPS, full_state=True)


@pytest.mark.parametrize(
    ("strategy", "impl"), [("dp", "scratch"), ("dp", "torch"), ("ps", "scratch")]
)
def test_parity_and_exact_comm_at_world_2(cluster2, baseline, strategy, impl):
    result = train(cluster2, strategy=strategy, impl=impl, steps=STEPS, full_state=True)
    assert_parity(result, baseline)
    expected = totals(result.expected_comm)
    s = 34828  # the mlp's gradient bytes
    assert expected == (
        {("all_reduce", "dp"): (2 * s, 2 * s)}
        if strategy == "dp"
        else {("send", "dp"): (2 * s, 2 * s)}
    )
    # DDP's hook counts every bucket it all-reduces, so every step matches exactly.
    for step, measured in enumerate(measured_per_step(result)):
        assert measured == expected, f"step {step}"


@pytest.mark.parametrize("strategy", ["dp", "ps"])
def test_parity_and_exact_comm_at_world_4(cluster4, baseline, strategy):
    result = train(cluster4, strategy=strategy, steps=STEPS, full_state=True)
    assert_parity(result, baseline)
    s = 34828
    # Ring all-reduce: payload 4 S, bus 4 x 2(3)/4 S = 6 S. Parameter server: 3 pushes and 3
    # pulls of S: the same 6 S of traffic, all through rank 0.
    expected = {
        "dp": {("all_reduce", "dp"): (4 * s, 6 * s)},
        "ps": {("send", "dp"): (6 * s, 6 * s)},
    }
    assert totals(result.expected_comm) == expected[strategy]
    assert all(m == expected[strategy] for m in measured_per_step(result))
    if strategy == "ps":
        sent = result.ranks.groupby("rank").comm_bytes.mean()
        assert sent.tolist() == [3 * s, s, s, s]  # the server's link carries N-1 times more
        assert result.memory.optimizer_bytes.tolist()[1:] == [0, 0, 0]  # state on the server only


def test_gpt_gradients_go_in_buckets(cluster2):
    result = train(cluster2, strategy="dp", model="gpt", steps=2, batch_size=4)
    per_rank_step = result.comm[(result.comm.step == 0) & (result.comm["rank"] == 0)]
    assert len(per_rank_step) > 1  # ~0.8 MB of gradients in 256 KiB buckets
    assert per_rank_step.payload_bytes.sum() == result.max_rank_param_bytes
    assert all(m == totals(result.expected_comm) for m in measured_per_step(result))


def test_single_runs_on_rank_0_of_a_cluster(cluster2, baseline):
    result = train(cluster2, strategy="single", steps=STEPS)
    assert result.ranks["rank"].unique().tolist() == [0]
    assert result.steps.loss.tolist() == baseline.steps.loss.tolist()
    assert result.comm.empty and (result.steps.comm_bytes == 0).all()


def test_result_tables(cluster2):
    result = train(cluster2, strategy="dp", steps=3)
    assert result.ranks.shape[0] == 6 and set(result.ranks["rank"]) == {0, 1}
    assert {
        "loss",
        "samples_per_s",
        "step_time",
        "all_reduce@dp",
        "param_bytes",
        "peak_bytes",
    } <= set(result.ranks)
    assert (result.steps.comm_bytes == result.steps.expected_comm_bytes).all()
    assert result.final_loss == result.steps.loss.iloc[-1]
    records = [r for r in cluster2.metrics if r.get("strategy") == "dp"]
    assert {
        "step",
        "loss",
        "samples",
        "step_time",
        "comm",
        "memory",
        "timeline",
        "rank",
        "time",
    } <= set(records[-1])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "fsdp"}, "unknown strategy 'fsdp': choose one of single, dp, ps"),
        ({"impl": "jax"}, "unknown impl 'jax': choose one of scratch, torch"),
        ({"model": "resnet"}, "unknown model 'resnet': choose one of article, mlp, gpt"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion': choose one of sgd, adam"),
        ({"strategy": "ps", "impl": "torch"}, "PyTorch has no parameter-server API: use impl='scratch'"),
        ({"batch_size": 30, "world_size": 4}, "batch_size 30 does not split over 4 data-parallel ranks: use a multiple of 4, e.g. 32"),
        ({"world_size": 1}, "needs at least 2 ranks"),
        ({"strategy": "dp-tp", "world_size": 2}, "needs an even world_size >= 4"),
        ({"steps": 0}, "steps must be a whole number >= 1"),
        ({"lr": 0.0}, "lr must be a finite number > 0, got 0"),
    ],
)  # fmt: skip
def test_validate_says_what_to_change(changes, message):
    config = TrainConfig(**{"strategy": "dp", "world_size": 2, **changes})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(config)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "tp", "model": "article", "world_size": 4}, "10"),  # hidden width 10
        ({"strategy": "pp-gpipe", "model": "article", "world_size": 4}, "stages"),
        ({"strategy": "pp-gpipe", "batch_size": 32, "micro_batches": 3}, "micro-batches"),
    ],
)
def test_validate_delegates_shape_checks_to_the_strategy(changes, message):
    config = TrainConfig(**{"world_size": 2, **changes})
    try:
        validate(TrainConfig(**{**changes, "model": "mlp", "micro_batches": 1, "world_size": 2}))
    except NotImplementedError:
        pytest.skip(f"{config.strategy} is not registered in pdlab.training.loop yet")
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_not_implemented_yet_is_clear(monkeypatch):
    monkeypatch.delitem(registry.get("ps").impls, "scratch")
    with pytest.raises(
        NotImplementedError, match="'ps' with impl 'scratch' is not implemented yet"
    ):
        validate(TrainConfig(strategy="ps", world_size=2))


def test_without_a_cluster_only_single_runs():
    with pytest.raises(ValueError, match=r"run it on a pdlab.Cluster\(2\)"):
        train(strategy="dp")


def test_cli_json_lines():
    run = [sys.executable, "-m", "pdlab", "run", "--strategy", "dp", "--world-size", "2"]
    out = subprocess.run(
        [*run, "--steps", "3", "--json"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["step"] for r in lines[:-1]] == [0, 1, 2]
    assert {"loss", "samples_per_s", "comm_bytes", "expected_comm_bytes", "bus_bytes"} <= set(
        lines[0]
    )
    assert lines[0]["comm_bytes"] == lines[0]["expected_comm_bytes"] == 2 * 34828
    assert {"final_loss", "max_rank_param_bytes"} <= set(lines[-1]["summary"])
    bad = subprocess.run([*run, "--batch-size", "7"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "use a multiple of 2" in bad.stderr
