"""Sequence parallelism (tp-sp) and the vocabulary-parallel embedding and loss (tp, tp-sp):
parity with one process, exact bytes every step and on the wire, memory against the
formulas, and each comparison failing on a wrong formula."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pdlab.cost.footprint import layer_activation_bytes
from pdlab.lab import cli
from pdlab.measure.comm import totals
from pdlab.training.config import TrainConfig
from pdlab.training.loop import expected_comm, train, validate
from pdlab.training.models import GPTConfig
from pdlab.training.parallel import sequence
from pdlab.training.registry import layout_for
from tests.helpers import assert_parity, measured_per_step
from tests.test_traffic import assert_bytes_on_the_wire

CFG = GPTConfig()
S, H, A, L = CFG.block_size, CFG.n_embd, CFG.n_head, CFG.n_layer
B, T = 8, 2  # the batch every rank computes (tp splits no samples) and the tp ranks
V = 52  # the shipped text's alphabet
SBH = S * B * H
FP32 = 4
# SGD for parity (see test_tensor.py: Adam turns rounding noise into full-size steps).
PARITY = {"model": "gpt", "steps": 3, "batch_size": B, "optimizer": "sgd", "lr": 0.1}
RUNS = [  # (strategy, impl, vocab_parallel)
    ("tp-sp", "scratch", True), ("tp-sp", "torch", True), ("tp-sp", "scratch", False),
    ("tp-sp", "torch", False), ("tp", "scratch", True), ("tp", "torch", True),
]  # fmt: skip


@pytest.fixture(scope="module")
def runs(cluster2):
    """Each of RUNS trained once on 2 ranks, and one process: (strategy, impl, vocab) -> result."""
    done = {
        run: train(
            cluster2, strategy=run[0], impl=run[1], vocab_parallel=run[2], full_state=True, **PARITY
        )
        for run in RUNS
    }
    return done | {"single": train(strategy="single", full_state=True, **PARITY)}


@pytest.mark.parametrize("run", RUNS, ids=lambda r: f"{r[0]}-{r[1]}-{'vocab' if r[2] else 'head'}")
def test_parity_exact_bytes_and_the_wire(runs, run):
    result = runs[run]
    assert_parity(result, runs["single"])
    assert all(measured == totals(result.expected_comm) for measured in measured_per_step(result))
    assert_bytes_on_the_wire(result)


@pytest.mark.parametrize("impl", ["scratch", "torch"])
def test_the_other_impls_formula_fails(runs, impl):
    """scratch all-gathers each region's input again in backward and all-reduces the rows'
    biases; DTensor does neither: each formula fails on the other's bytes."""
    result = runs["tp-sp", impl, True]
    other = sequence.expected_comm(result.config, layout_for("tp-sp", 2), dtensor=impl == "scratch")
    assert all(measured != totals(other) for measured in measured_per_step(result))


def test_the_mlp_splits_its_samples(cluster2):
    """In the MLPs a sample is a token: the first region's exit splits the batch."""
    mlp = {**PARITY, "model": "mlp", "batch_size": 32, "full_state": True}
    baseline = train(strategy="single", **mlp)
    for impl in ("scratch", "torch"):
        result = train(cluster2, strategy="tp-sp", impl=impl, **mlp)
        assert_parity(result, baseline)
        assert all(m == totals(result.expected_comm) for m in measured_per_step(result))


def test_formula_by_hand():
    """tp-sp's bytes a rank, for the gpt on 2 ranks (8 samples of 32 tokens, float32): an
    all-reduce of TP becomes a reduce-scatter and an all-gather of the same tensor."""
    x = SBH * FP32  # one [b, s, h] activation
    config = TrainConfig(strategy="tp-sp", model="gpt", batch_size=B, world_size=T)
    norms, biases = (2 * L + 1) * 2 * H * FP32, 2 * L * H * FP32  # LayerNorms; rows' biases
    # 2L regions: forward all-gather + reduce-scatter; backward reduce-scatter + all-gather
    # + all-gather again; the embedding's split (all-gather backward); the head's gather.
    want = {
        ("all_gather", "tp"): (T * (2 * L * 3 + 2) * x, T * (2 * L * 3 + 2) * x / 2),
        ("reduce_scatter", "tp"): (T * 2 * L * 2 * x, T * 2 * L * 2 * x / 2),
        ("all_reduce", "tp"): (T * (norms + biases), T * (norms + biases)),
    }
    assert totals(expected_comm(config)) == want
    # Without the all-gather again and the partial gradients, the bus bytes are tp's.
    tp = totals(expected_comm(replace(config, strategy="tp")))
    gathered_again = T * 2 * L * x / 2
    bus = sum(b for (op, _), (_, b) in want.items() if op != "all_reduce") - gathered_again
    assert bus - T * x / 2 * 2 == tp["all_reduce", "tp"][1]  # less the embedding and head


def test_the_vocabulary_loss_is_three_all_reduces_of_a_float_a_token():
    plain = TrainConfig(strategy="tp", model="gpt", batch_size=B, world_size=T)
    split = totals(expected_comm(replace(plain, vocab_parallel=True)))["all_reduce", "tp"][0]
    # The embedding's all-reduce of [b, s, h], the head's f backward, three of [b, s] floats.
    assert split - totals(expected_comm(plain))["all_reduce", "tp"][0] == T * (
        2 * SBH * FP32 + 3 * S * B * 4
    )


def test_the_vocabulary_is_split(runs):
    """Each rank holds 1/t of the embedding's and the head's v·h weights."""
    split, whole = runs["tp-sp", "scratch", True], runs["tp-sp", "scratch", False]
    saved = whole.memory.param_bytes - split.memory.param_bytes
    assert (saved == 2 * V * H * FP32 * (1 - 1 / T)).all()


def formula(t: int, sequence_parallel: bool, recompute: str) -> float:
    """One layer's bytes in float32, pdlab's GPT having no dropout (test_activations.py)."""
    return 2 * layer_activation_bytes(
        S, B, H, A, t, sequence_parallel=sequence_parallel, recompute=recompute, dropout=False
    )


def test_activations_per_layer_are_the_papers(cluster2):
    """What full recompute saves on each rank is L layers of Korthikanti et al.'s tp+sp
    formula, sbh(34/t + 5as/(ht)) (no dropout: 32/t + 2as/(ht)), plus LayerNorm's mean and
    1/σ on this rank's tokens; tp's formula (sbh(10 + 24/t + ...)) fails. DTensor's
    colwise linears keep the gathered input: 2 of them a layer, (1 - 1/t)·sbh each more."""
    run = {"model": "gpt", "steps": 1, "batch_size": B}
    kept = {
        (impl, mode): train(
            cluster2, strategy="tp-sp", impl=impl, recompute=mode, **run
        ).memory.activation_bytes.tolist()
        for impl, mode in [("scratch", "none"), ("scratch", "full"), ("torch", "none")]
    }
    norm_stats = 2 * 2 * (S // T) * B * FP32  # two norms a layer, on s/t tokens
    for rank in range(T):
        saved = kept["scratch", "none"][rank] - kept["scratch", "full"][rank]
        for sp, ok in ((True, True), (False, False)):
            want = L * (formula(T, sp, "none") - formula(T, sp, "full") + norm_stats)
            assert (saved == want) is ok, (saved, want)
        torch_more = kept["torch", "none"][rank] - kept["scratch", "none"][rank]
        assert torch_more == L * 2 * (SBH - SBH // T) * FP32


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (TrainConfig(strategy="dp", model="gpt", vocab_parallel=True, world_size=2),
         "strategy 'dp' has none: use strategy 'tp' or 'tp-sp'"),
        (TrainConfig(strategy="tp", vocab_parallel=True, world_size=2),
         "model 'mlp' has none: use model='gpt'"),
        (TrainConfig(strategy="dp-tp", model="gpt", vocab_parallel=True, world_size=4),
         "strategy 'dp-tp' doesn't split the vocabulary"),
        (TrainConfig(strategy="tp-sp", batch_size=30, world_size=4),
         "batch_size 30 doesn't split; use a multiple of 4"),
    ],
)  # fmt: skip
def test_bad_input_names_the_fix(config, message):
    with pytest.raises(ValueError, match=message):
        validate(config)


def test_the_cli_has_the_flag():
    args = cli.parser().parse_args(["run", "--strategy", "tp-sp", "--vocab-parallel"])
    assert args.vocab_parallel and args.strategy == "tp-sp"
