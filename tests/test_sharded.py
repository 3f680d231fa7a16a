"""ZeRO-1, -2 and -3, scratch and torch: parity with ``single``, exact comm, the memory split."""

from __future__ import annotations

import pytest

import pdlab
from pdlab.cost.footprint import PRECISIONS, model_state_bytes
from pdlab.measure.comm import totals
from pdlab.training.layout import Layout
from pdlab.training.loop import train
from pdlab.training.parallel.sharded import ZERO3_OPS, _padded_unit, _unit_comm
from tests.helpers import assert_parity, measured_per_step

STEPS = 20
P = 34828  # the mlp's parameter bytes: 8707 float32 (odd, so N = 2 pads one element)
CASES = [
    ("zero1", "scratch"), ("zero1", "torch"), ("zero2", "scratch"), ("zero2", "torch"),
    ("zero3", "scratch"), ("zero3", "torch"),
]  # fmt: skip

# Per step, over both ranks: {(op, group): (payload, bus)}; bus = (N-1)/N payload for
# all-gather and reduce-scatter, 2(N-1)/N for all-reduce, 1 for broadcast.
Z1 = 4 * 8708  # zero1 scratch: the flat buffer, padded to 8708 elements
Z3 = 4 * (192 + 4160 + 4160 + 196)  # zero3 scratch: each unit's flat buffer padded to even
F3 = 4 * (192 + 4160 + 4160 + 260)  # FSDP2: each parameter's rows padded (3 -> 4 in the head)
EXPECTED_AT_2 = {
    # DP's all-reduce in its two halves: the same 2 x P bus bytes as dp, plus the padding.
    ("zero1", "scratch"): {("reduce_scatter", "dp"): (2 * Z1, Z1), ("all_gather", "dp"): (2 * Z1, Z1)},
    # DDP's all-reduce, then each rank broadcasts its partition (4355 and 4352 elements).
    ("zero1", "torch"): {("all_reduce", "dp"): (2 * P, 2 * P), ("broadcast", "dp"): (2 * P, 2 * P)},
    # A reduce-scatter (in backward) and an all-gather (after the step) a unit: DP's bus bytes.
    ("zero2", "scratch"): {("reduce_scatter", "dp"): (2 * Z3, Z3), ("all_gather", "dp"): (2 * Z3, Z3)},
    # FSDP2 without resharding after forward: the all-gather before forward, no second one.
    ("zero2", "torch"): {("all_gather", "dp"): (2 * F3, F3), ("reduce_scatter", "dp"): (2 * F3, F3)},
    # Two all-gathers and one reduce-scatter a unit: 1.5 x DP's bus bytes.
    ("zero3", "scratch"): {("all_gather", "dp"): (4 * Z3, 2 * Z3), ("reduce_scatter", "dp"): (2 * Z3, Z3)},
    ("zero3", "torch"): {("all_gather", "dp"): (4 * F3, 2 * F3), ("reduce_scatter", "dp"): (2 * F3, F3)},
}  # fmt: skip

# Each rank's (param, grad, optimizer) bytes. Adam: two moments a weight, plus a 4-byte step
# counter per parameter tensor. DP holds (P, P, 2P + 32) on every rank.
MEMORY_AT_2 = {
    # Full parameters and gradients, and the reduced gradient of the owned half of the padded
    # flat buffer (a buffer of its own); the moments of that half.
    ("zero1", "scratch"): [(P, P + 4 * 4354, 8 * 4354 + 4)] * 2,
    # Whole tensors per rank: 4355 elements in 4 tensors, and 4352 in 4.
    ("zero1", "torch"): [(P, P, 8 * 4355 + 16), (P, P, 8 * 4352 + 16)],
    # Full parameters; gradients and moments of half of every padded unit (4354 elements):
    # the full gradients are dropped once reduce-scattered.
    ("zero2", "scratch"): [(P, 4 * 4354, 8 * 4354 + 16)] * 2,
    # FSDP2 reshards after backward: after the step it holds what ZeRO-3 holds.
    ("zero2", "torch"): [(4 * 4386, 4 * 4386, 8 * 4386 + 32), (4 * 4321, 4 * 4321, 8 * 4321 + 32)],
    # Half of every padded unit: 4354 elements, in one shard per unit.
    ("zero3", "scratch"): [(4 * 4354, 4 * 4354, 8 * 4354 + 16)] * 2,
    # DTensor shards: rank 1 holds one row of the 3-row head, rank 0 two.
    ("zero3", "torch"): [(4 * 4386, 4 * 4386, 8 * 4386 + 32), (4 * 4321, 4 * 4321, 8 * 4321 + 32)],
}


@pytest.fixture(scope="module")
def baseline():
    return train(strategy="single", model="mlp", steps=STEPS, full_state=True)


@pytest.mark.parametrize(("strategy", "impl"), CASES)
def test_parity_exact_comm_and_memory_at_world_2(cluster2, baseline, strategy, impl):
    result = train(cluster2, strategy=strategy, impl=impl, steps=STEPS, full_state=True)
    assert_parity(result, baseline)

    expected = totals(result.expected_comm)
    assert expected == EXPECTED_AT_2[strategy, impl]
    for step, measured in enumerate(measured_per_step(result)):
        assert measured == expected, f"step {step}"

    memory = result.memory.sort_values("rank")
    held = list(zip(memory.param_bytes, memory.grad_bytes, memory.optimizer_bytes, strict=True))
    assert held == MEMORY_AT_2[strategy, impl]


def test_zero3_at_world_4(baseline):
    """Four ranks: the 3-row head shards unevenly (FSDP2 gives rank 3 no row of it at all)."""
    with pdlab.Cluster(4) as cluster:
        for impl, head in [("scratch", 196), ("torch", 260)]:
            result = train(cluster, strategy="zero3", impl=impl, steps=STEPS, full_state=True)
            assert_parity(result, baseline)
            size = 4 * (192 + 4160 + 4160 + head)
            expected = {
                ("all_gather", "dp"): (8 * size, 6 * size),
                ("reduce_scatter", "dp"): (4 * size, 3 * size),
            }
            assert totals(result.expected_comm) == expected
            assert all(m == expected for m in measured_per_step(result))
            assert result.memory.param_bytes.sum() == (4 * 8708 if impl == "scratch" else P)


# ---- ZeRO-2 against the ZeRO paper's formula, and against wrong answers ----------------------


def _zero2_memory(keep_full_gradients: bool) -> dict[str, int]:
    """On a rank: one ZeRO-2 step on the mlp; the memory it then holds. With
    ``keep_full_gradients``, a wrong ZeRO-2 that never drops the full gradient."""
    from pdlab.control import runtime
    from pdlab.measure import memory
    from pdlab.training.config import TrainConfig
    from pdlab.training.data import load_dataset
    from pdlab.training.layout import Layout
    from pdlab.training.loop import mesh_for
    from pdlab.training.models import build_model
    from pdlab.training.parallel.sharded import Zero2

    class KeepsFullGradients(Zero2):
        def drop_gradients(self, bucket) -> None:
            pass

    config = TrainConfig(strategy="zero2", world_size=runtime.world_size())
    mesh = mesh_for(Layout(dp=config.world_size), runtime.device())
    z = (KeepsFullGradients if keep_full_gradients else Zero2)(build_model("mlp"), config, mesh)
    x, y = load_dataset("mlp").batch(0, config.batch_size, mesh.dp_rank, config.world_size)
    z.train_step(x, y)
    return memory.measure(z.module, z.optimizer, mesh.device)


def holds_zero2_split(held: dict[str, int], n: int, precision=PRECISIONS["fp32"]) -> bool:
    """The ZeRO paper's P_os+g split (Figure 1: 2Ψ + (2 + K)Ψ/N_d in mixed precision; fp32:
    4Ψ, 4Ψ/N_d, 8Ψ/N_d), as the planner computes it, up to the padding of each of the mlp's
    4 units (< N_d elements each) and Adam's 4-byte step counter a unit."""
    want = model_state_bytes(P // 4, precision, zero=2, dp=n)
    padding = 4 * (n - 1)  # elements, at most, over the 4 units
    return (
        held["param_bytes"] == want["param_bytes"]
        and 0 <= held["grad_bytes"] - want["grad_bytes"] <= precision.grad_bytes * padding
        and 0
        <= held["optimizer_bytes"] - want["optimizer_bytes"]
        <= precision.optimizer_bytes * padding + 4 * 4
    )


def test_zero2_holds_the_papers_split_and_a_zero2_keeping_gradients_does_not(cluster2):
    assert all(holds_zero2_split(m, 2) for m in cluster2.run(_zero2_memory, False))
    assert not any(holds_zero2_split(m, 2) for m in cluster2.run(_zero2_memory, True))


def test_a_wrong_zero2_formula_fails_the_measured_bytes(cluster2):
    """ZeRO-3's collectives (a second all-gather a unit) are not what zero2 measured."""
    result = train(cluster2, strategy="zero2", steps=2)
    wrong = _unit_comm(result.config, Layout(dp=2), ZERO3_OPS, _padded_unit(Layout(dp=2)))
    measured = measured_per_step(result)
    assert all(m == totals(result.expected_comm) for m in measured)
    assert all(m != totals(wrong) for m in measured)
