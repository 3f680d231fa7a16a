"""Activation recomputation: what the GPT keeps for backward, measured (``SavedTensors``)
against Korthikanti et al. 2022's formula (``footprint.layer_activation_bytes``)."""

from __future__ import annotations

import pytest
import torch

from pdlab.cost.footprint import layer_activation_bytes
from pdlab.measure.comm import totals
from pdlab.measure.memory import SavedTensors
from pdlab.training.config import TrainConfig
from pdlab.training.loop import train, validate
from pdlab.training.models import Block, GPTConfig, set_recompute
from tests.helpers import measured_per_step

CFG = GPTConfig()
S, H, A, L = CFG.block_size, CFG.n_embd, CFG.n_head, CFG.n_layer
B = 4  # a rank's batch below: 8 over 2 data-parallel ranks
FP32 = 2  # the formula counts 16-bit activations; pdlab trains in float32
# LayerNorm also saves its mean and 1/σ, s·b floats each, for each of a block's two norms:
# Korthikanti et al. leave them out (2/h of a norm's input). The tolerance is exactly these.
NORM_STATS = 2 * 2 * S * B * 4


def formula(mode: str, b: int = B, **kw) -> float:
    """One layer's bytes in float32 for recompute ``mode``, pdlab's GPT having no dropout."""
    return FP32 * layer_activation_bytes(S, b, H, A, recompute=mode, **kw)


def block_saves(mode: str) -> int:
    block = Block(CFG)
    set_recompute(block, mode)
    x = torch.randn(B, S, H, requires_grad=True)
    with SavedTensors() as saved:
        block(x).sum()  # a sum keeps nothing for its backward
    return saved.peak


def within(measured: int, want: float, mode: str) -> bool:
    return 0 <= measured - want <= (0 if mode == "full" else NORM_STATS)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_a_block_keeps_what_the_formula_says(mode):
    measured = block_saves(mode)
    assert within(measured, formula(mode, dropout=False), mode), (measured, formula(mode))
    if mode != "full":  # a wrong formula fails: the paper's dropout masks, or 16-bit bytes
        assert not within(measured, formula(mode, dropout=True), mode)
        assert not within(measured, formula(mode, dropout=False) / FP32, mode)


def test_the_gpt_keeps_less_the_more_it_recomputes(cluster2):
    """Per rank, on every strategy's grid that splits the batch (dp here): full < selective
    < none, and what recompute saves is L layers' worth of the formula's difference."""
    kept = {
        mode: train(
            cluster2, strategy="dp", model="gpt", steps=2, batch_size=8, recompute=mode
        ).memory.activation_bytes.tolist()
        for mode in ("none", "selective", "full")
    }
    for rank in range(2):
        none, selective, full = (kept[m][rank] for m in ("none", "selective", "full"))
        assert full < selective < none
        saved = L * (formula("none", dropout=False) - formula("full"))
        assert 0 <= (none - full) - saved <= L * NORM_STATS, (none - full, saved)
        saved = L * (formula("none", dropout=False) - formula("selective", dropout=False))
        assert none - selective == saved  # the probabilities, exactly: no norm in between


@pytest.mark.parametrize("impl", ["scratch", "torch"])
def test_full_recompute_repeats_one_tensor_parallel_all_reduce_a_layer(cluster2, impl):
    """Recomputing a block in backward runs its forward again only up to the last tensor
    backward needs (torch's checkpoint stops early): attention's all-reduce, not the MLP's."""
    run = {"strategy": "tp", "impl": impl, "model": "gpt", "steps": 2, "batch_size": 8}
    plain, full = (train(cluster2, **run, recompute=m) for m in ("none", "full"))
    all_reduce = 4 * 8 * S * H  # one [b, s, h] float32 activation
    for m in measured_per_step(full):
        assert m == totals(full.expected_comm)
        extra = m["all_reduce", "tp"][0] - totals(plain.expected_comm)["all_reduce", "tp"][0]
        assert extra == 2 * L * all_reduce  # on each of the 2 ranks; Megatron's count: twice
    assert full.steps.loss.tolist() == plain.steps.loss.tolist()


def test_recompute_is_refused_where_it_means_nothing():
    with pytest.raises(ValueError, match="use model='gpt', or recompute='none'"):
        validate(TrainConfig(strategy="dp", world_size=2, recompute="full"))
    with pytest.raises(ValueError, match="recomputes every unit already"):
        validate(TrainConfig(strategy="zero3", model="gpt", world_size=2, recompute="selective"))
    with pytest.raises(ValueError, match="unknown recompute 'some'"):
        validate(TrainConfig(model="gpt", recompute="some"))


def test_seq_len_sets_the_gpts_context_and_its_data():
    """Doubling ``seq_len`` doubles every activation but the attention probabilities, which
    grow 4x (Korthikanti et al.'s 5as/h term, 2as/h without dropout): what the sequence adds
    beyond linear is exactly that term, L layers of it (a run whose data kept 32 tokens adds 0)."""
    s = {n: train(strategy="single", model="gpt", steps=1, batch_size=B, seq_len=n) for n in (S, 2 * S)}  # fmt: skip
    kept = {n: int(r.memory.activation_bytes[0]) for n, r in s.items()}

    def probabilities(n: int) -> float:
        return FP32 * 2 * A * n * n * B  # 2as/h · sbh bytes, float32

    # One saved tensor doesn't grow with s: the loss's 0-d total weight (4 B), counted twice.
    unsplit = 4
    assert kept[2 * S] - 2 * kept[S] == L * (probabilities(2 * S) - 2 * probabilities(S)) - unsplit
    with pytest.raises(ValueError, match="use model='gpt', or leave seq_len at 32"):
        validate(TrainConfig(model="mlp", seq_len=64))


def test_a_longer_context_keeps_tp_sp_bytes_exact(cluster2):
    """tp's formula counts ``seq_len`` tokens a sample (it counted 32, whatever the run's):
    every step's measured bytes equal it at twice the context; a context tp-sp can't split
    is refused."""
    run = train(cluster2, strategy="tp-sp", model="gpt", steps=1, batch_size=B, seq_len=2 * S)
    assert all(m == totals(run.expected_comm) for m in measured_per_step(run))
    with pytest.raises(ValueError, match="use a seq_len that is a multiple of 2"):
        validate(TrainConfig(strategy="tp-sp", model="gpt", world_size=2, seq_len=S + 1))
