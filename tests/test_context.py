"""Context parallelism (ring attention): the blockwise math against torch's attention, parity
with ``single``, exact ring bytes every step and on the wire, activations split by cp,
refusals; each check also shown failing on a deliberately wrong answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pdlab.cost import predictor
from pdlab.cost.footprint import layer_activation_bytes
from pdlab.cost.predictor import predict
from pdlab.lab import exercises
from pdlab.measure.comm import totals
from pdlab.training import registry
from pdlab.training.loop import expected_comm, train, validate
from pdlab.training.models import GPTConfig
from pdlab.training.parallel import context
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_float32_close, assert_parity, measured_per_step
from tests.test_traffic import assert_bytes_on_the_wire

CFG = GPTConfig()
S, H, A, L = CFG.block_size, CFG.n_embd, CFG.n_head, CFG.n_layer
# SGD for parity: see tests/test_tensor.py. Few steps: the ring is exact from the first.
PARITY = {"model": "gpt", "steps": 6, "optimizer": "sgd", "lr": 0.1, "full_state": True}


def kv_block(b: int, cp: int) -> int:
    """Bytes of one rank's K and V: 2·b·(s/cp)·h float32."""
    return 2 * b * (S // cp) * H * 4


# ---- the math, in one process (lab 08's checker runs a learner's step the same way) -------


# The wrong steps take the right one as a default, bound now: a test swaps it on the ranks.
def no_rescale(state, q, k, v, q_pos, k_pos, scale, attend=context.attend_block):
    """A learner's slip: a new, larger max without rescaling the earlier blocks' sums."""
    new = attend(None, q, k, v, q_pos, k_pos, scale)
    if state is None:
        return new
    m = torch.maximum(state.m, new.m)
    return context.Partial(state.o + new.o, m, state.l + new.l)


def diagonal_mask(state, q, k, v, q_pos, k_pos, scale, attend=context.attend_block):
    """Another: every block masked as if it were the diagonal one (local positions)."""
    local = torch.arange(len(q_pos))
    return attend(state, q, k, v, local, local[: len(k_pos)], scale)


def heads(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, A, S, H // A, generator=g) for _ in range(3)]


@pytest.mark.parametrize("cp", [1, 2, 4, 8])
def test_the_ring_computes_causal_attention(cp):
    q, k, v = heads()
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(context.simulate_ring(q, k, v, cp), want)  # float32's tolerance
    if cp > 1:  # with one block there is nothing to rescale, and the mask is the diagonal's
        for wrong in (no_rescale, diagonal_mask):
            with pytest.raises(AssertionError):
                torch.testing.assert_close(context.simulate_ring(q, k, v, cp, wrong), want)


def test_each_rank_holds_an_early_and_a_late_chunk():
    assert [context.positions(r, 2, 8).tolist() for r in range(2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    # Equal work: as many (query, visible key) pairs on every rank.
    for cp in (2, 4):
        pairs = {(context.positions(r, cp, S) + 1).sum().item() for r in range(cp)}
        assert len(pairs) == 1


# ---- on ranks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def baseline():
    return train(strategy="single", **PARITY)


@pytest.fixture(scope="module")
def selective_activations() -> int:
    """What one process keeps for backward when it recomputes attention's core: no
    probabilities, as ring attention keeps none."""
    return int(
        train(
            strategy="single", model="gpt", steps=1, recompute="selective"
        ).memory.activation_bytes[0]
    )


def wrong_ring_bytes(expected: dict, layout_cp: int, ranks: int, b: int) -> dict:
    """The formula without dK, dV's last hop home (cp-1 sends, as for K, V)."""
    wrong = dict(expected)
    payload, bus = wrong["send", "cp"]
    less = ranks * L * kv_block(b, layout_cp)
    wrong["send", "cp"] = (payload - less, bus - less)
    return wrong


@pytest.mark.parametrize(("strategy", "world", "cp"), [("cp", 2, 2), ("cp", 4, 4), ("dp-cp", 4, 2)])
def test_parity_exact_bytes_the_wire_and_memory(
    request, monkeypatch, baseline, selective_activations, strategy, world, cp
):
    cluster = request.getfixturevalue(f"cluster{world}")
    result = train(cluster, strategy=strategy, **PARITY)
    assert_parity(result, baseline)
    expected = totals(result.expected_comm)
    groups = {"cp"} | ({"dp"} if strategy == "dp-cp" else set())
    assert {group for _, group in expected} == groups
    assert all(measured == expected for measured in measured_per_step(result))
    b = 32 // (world // cp)
    wrong = wrong_ring_bytes(expected, cp, world, b)
    assert all(measured != wrong for measured in measured_per_step(result))
    assert_bytes_on_the_wire(result)
    # Every rank keeps 1/world of one process's activations (each holds s/cp tokens of B/dp
    # samples), plus ring attention's O and log-sum-exp a layer, which selective recompute
    # doesn't keep. Two tensors don't split: the loss's 0-d total weight (4 B a rank), and the
    # positions each replica's embedding reads (int64, S a replica).
    ring = L * (4 * 32 * S * H + 4 * 32 * A * S)
    unsplit = 4 * (world - 1) + 8 * S * (world // cp - 1)
    for kept in result.memory.activation_bytes:
        assert world * kept == selective_activations + ring + unsplit
        assert world * kept != selective_activations + unsplit  # a formula without O, lse
    predicted = predict(result, "8xH100")  # the replay pairs every send with its recv
    assert (predicted.step_time > 0).all() and (predicted.comm > 0).all()
    # Replayed as blocking, every rank's send would wait for a recv its peer posts after its
    # own send: the ring's sends must be asynchronous there too.
    monkeypatch.setattr(predictor, "wait_rule", lambda *_, **__: predictor.BLOCKING)
    with pytest.raises(RuntimeError, match="deadlocked"):
        predict(result, "8xH100")


def test_ring_bytes_by_hand():
    """cp = 2, B = 32: a layer sends K, V once forward, once again and dK, dV twice backward."""
    events = expected_comm(TrainConfig(strategy="cp", model="gpt", world_size=2))
    sends = 2 * L * 4 * kv_block(32, 2)  # 2 ranks, 4 sends a layer each
    grads = 2 * 835072  # every rank all-reduces the gpt's whole gradient over cp
    assert totals(events) == {
        ("send", "cp"): (sends, sends),
        ("all_reduce", "cp"): (grads, grads * 2 * 1 / 2),
    }
    # At cp = 4 a rank sends K, V 3 times forward and 3 backward, dK, dV 4 times.
    events = expected_comm(TrainConfig(strategy="cp", model="gpt", world_size=4))
    assert totals(events)["send", "cp"][0] == 4 * L * 10 * kv_block(32, 4)


def _block_saves(cp: int) -> int:
    """On every rank of the world (the cp ring): the bytes one GPT block saves for backward
    on this rank's ``S/cp`` tokens of 4 samples, ring attention in its attention."""
    import torch.distributed as dist

    from pdlab.measure.memory import SavedTensors
    from pdlab.training.models import Block

    torch.manual_seed(0)
    block = Block(CFG)
    pos = [context.positions(r, cp, S) for r in range(cp)]
    block.attn.core = context._ring_core(context.Ring(dist.group.WORLD, torch.device("cpu")), pos)
    x = torch.randn(4, S // cp, H, requires_grad=True)
    with SavedTensors() as saved:
        y = block(x).sum()
    y.backward()  # the ring's backward runs too, so that no rank waits on another
    return saved.peak


def test_a_block_keeps_one_cp_th_of_the_activations(cluster2):
    """Per rank: Korthikanti et al.'s layer without the probabilities (ring attention keeps
    none, as FlashAttention) on s/cp tokens, plus what it keeps instead: O and the log-sum-exp."""
    b, cp = 4, 2
    s = S // cp
    kept = 2 * layer_activation_bytes(s, b, H, A, flash_attention=True, dropout=False)  # fp32
    ring = 4 * b * s * H + 4 * b * A * s  # O, lse
    norms = 2 * 2 * s * b * 4  # LayerNorm's mean and 1/σ, which the formula leaves out

    def within(measured: float, want: float) -> bool:
        return 0 <= measured - want <= norms

    for measured in cluster2.run(_block_saves, cp):
        assert within(measured, kept + ring), (measured, kept + ring)
        # Wrong formulas fail: the whole sequence on every rank, or the probabilities kept.
        whole = 2 * layer_activation_bytes(S, b, H, A, flash_attention=True, dropout=False)
        assert not within(measured, whole + cp * ring)
        scores = 2 * layer_activation_bytes(s, b, H, A, dropout=False)
        assert not within(measured, scores + ring)


def test_a_wrong_mask_on_the_ranks_breaks_parity(cluster2, baseline):
    """The parity check catches the exercise's mistakes on real ranks, not only in the simulation."""

    # Not swapped back by sending context.attend_block: it pickles by name, and on the ranks
    # that name is diagonal_mask by then (the session's later cp runs would all be wrong).
    cluster2.run(exercises._use_ring_step, diagonal_mask)
    try:
        result = train(cluster2, strategy="cp", **{**PARITY, "steps": 2})
    finally:
        cluster2.run(exercises._use_ring_step, None)
    assert cluster2.run(_step_name) == ["attend_block"] * 2
    with pytest.raises(AssertionError):
        assert_float32_close(result.steps.loss, baseline.steps.loss[:2])


def _step_name() -> str:
    return context.attend_block.__name__


def _torch_context_parallel() -> str:
    """torch's ``context_parallel`` around CPU SDPA on this rank: the error it raises."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    q, k, v = heads()
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    except NotImplementedError as e:
        return str(e)
    return "ran"


def test_torch_context_parallel_does_not_run_on_cpu(cluster2):
    """Why ``cp`` refuses impl='torch': if a torch runs it on the CPU, this fails (add it then)."""
    for found in cluster2.run(_torch_context_parallel):
        assert "_scaled_dot_product_flash_attention_for_cpu" in found, found
    with pytest.raises(ValueError, match="use impl='scratch'"):
        registry.get("cp").implementation("torch")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model": "mlp"}, r"model 'mlp' has none: use model='gpt'"),
        ({"world_size": 3}, r"2·cp = 6 chunks: use a cp that divides 16"),
        ({"recompute": "selective"}, r"would run the ring again; use recompute='none'"),
        ({"strategy": "dp-cp", "world_size": 2}, r"needs an even world_size >= 4"),
        ({"strategy": "dp-cp", "model": "article", "world_size": 4}, r"use model='gpt'"),
    ],
)
def test_what_cp_cannot_split_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{"strategy": "cp", "model": "gpt", "world_size": 2, **changes}))


def test_the_dashboard_menu_offers_cp_and_names_the_model_it_needs():
    import pdlab

    d = pdlab.Dashboard()
    options = d.controls["strategy"].options
    assert {("context (ring attention)", "cp"), ("hybrid DP×CP", "dp-cp")} <= set(options)
    d.controls["strategy"].value = "cp"
    validate(d.config())  # its first model is the gpt
    d.controls["model"].value = "mlp"
    with pytest.raises(ValueError, match="use model='gpt'"):
        validate(d.config())  # the dashboard shows this error beside the controls
