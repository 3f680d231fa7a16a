"""The moe model and expert parallelism (ep, dp-ep): parity with one process, each step's
all-to-all bytes from its routing, the wire, the experts' memory split, the dispatch check."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

import pdlab
from pdlab.lab import plots
from pdlab.measure.comm import CommEvent, totals
from pdlab.training.loop import train, validate
from pdlab.training.models import build_model
from pdlab.training.parallel import expert
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_parity, measured_per_step
from tests.test_traffic import assert_bytes_on_the_wire, framing

# SGD: see tests/test_tensor.py for why parity is checked with it.
PARITY = {"model": "moe", "steps": 3, "optimizer": "sgd", "lr": 0.1, "full_state": True}


@pytest.fixture(scope="module")
def baseline():
    return train(strategy="single", **PARITY)


@pytest.fixture(scope="module")
def ep(cluster2):
    return train(cluster2, strategy="ep", **PARITY)


@pytest.fixture(scope="module")
def dp_ep(cluster4):
    return train(cluster4, strategy="dp-ep", **PARITY)


def tokens(result):
    """Tokens per expert a step and layer, summed over the ranks."""
    return result.routing.groupby(["step", "layer", "expert"]).tokens.sum()


@pytest.mark.parametrize("run", ["ep", "dp_ep"])
def test_expert_parallel_matches_one_process(request, baseline, run):
    result = request.getfixturevalue(run)
    assert_parity(result, baseline)
    # The ranks' routing, the formula's input, is one process's on the whole batch.
    assert tokens(result).equals(tokens(baseline))
    assert tokens(baseline).groupby("step").sum().eq(32 * 32 * 2 * 4).all()  # B·T·k·layers


def test_moe_trains_under_data_parallelism(cluster2, baseline):
    assert_parity(train(cluster2, strategy="dp", **PARITY), baseline)


@pytest.mark.parametrize("run", ["ep", "dp_ep"])
def test_bytes_are_each_steps_routing_formula_and_on_the_wire(request, run):
    result = request.getfixturevalue(run)
    for step, measured in enumerate(measured_per_step(result)):
        assert measured == totals(result.expected_by_step[step]), step
    assert_bytes_on_the_wire(result)  # sent and received by rank and step, and the sockets
    sent = result.steps.expected_sent_bytes
    assert sent.nunique() > 1  # the routing changed the bytes between steps


def sent_by_rank(events: list[CommEvent]) -> dict[int, float]:
    out: dict[int, float] = {}
    for e in events:
        out[e.rank] = out.get(e.rank, 0.0) + e.sent_bytes
    return out


def test_a_wrong_routing_formula_fails(ep):
    measured = ep.ranks[ep.ranks.step == 0].set_index("rank").sent_bytes.to_dict()
    layout = expert.Layout(ep=2)
    routing = {
        rank: [list(map(int, c)) for c in g.groupby("layer").tokens.apply(list)]
        for rank, g in ep.routing[ep.routing.step == 0].groupby("rank")
    }
    right = ep.expected_comm + expert.routed_comm(ep.config, layout, routing)
    assert sent_by_rank(right) == measured
    # Experts dealt round robin (expert e on rank e mod P) instead of in contiguous blocks.
    dealt = {r: [c[0::2] + c[1::2] for c in layers] for r, layers in routing.items()}
    assert sent_by_rank(ep.expected_comm + expert.routed_comm(ep.config, layout, dealt)) != measured
    # A static formula: every all-to-all sends (P-1)/P of its buffer (uniform routing).
    ring = [replace(e, sent_bytes=e.bus_bytes) if e.op == "all_to_all" else e for e in right]
    assert sent_by_rank(ring) != measured
    assert measured_per_step(ep)[0] != totals(ep.expected_comm)  # without the routed part


def test_the_wire_rejects_a_uniform_all_to_all(ep):
    """gloo's sockets saw each rank's routed bytes: the uniform (P-1)/P of every buffer is
    outside the framing bound on some rank and step."""
    ring = ep.comm.assign(sent=ep.comm.bus_bytes).groupby(["step", "rank"]).sent.sum()
    extra = ep.comm.group_size.map(framing).groupby([ep.comm.step, ep.comm["rank"]]).sum()
    wire_sent = ep.ranks.set_index(["step", "rank"]).wire_sent_bytes
    outside = ~((wire_sent - ring >= 0) & (wire_sent - ring <= extra))
    assert outside.any()


def test_the_balance_loss_of_shards_averages_to_the_batchs():
    """Sequence-wise (DeepSeek-V3): the mean of two halves' losses is the whole batch's, so
    data-parallel gradients average to one process's. Switch's batch-wide f and P are not."""
    layer = build_model("moe")[1].mlp
    probs = torch.randn(4, 8, 4).softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    halves = (
        layer.balance_loss(probs[:2], chosen[:2]) + layer.balance_loss(probs[2:], chosen[2:])
    ) / 2
    torch.testing.assert_close(halves, layer.balance_loss(probs, chosen))

    def batch_wide(p, c):  # the wrong answer: f and P over all the batch's tokens
        return layer.balance_loss(p.reshape(1, -1, 4), c.reshape(1, -1, 2))

    halves = (batch_wide(probs[:2], chosen[:2]) + batch_wide(probs[2:], chosen[2:])) / 2
    assert not torch.allclose(halves, batch_wide(probs, chosen))


@pytest.mark.parametrize("ranks", [2, 4])
def test_uniform_routing_sends_the_textbook_bytes(ranks):
    """≈ 2·k·h·bytes·(P-1)/P a token a MoE layer forward, the same backward, exactly when
    every rank routes as many tokens to every expert."""
    config = TrainConfig(strategy="ep", model="moe", world_size=ranks, batch_size=ranks)
    tokens, k, h = 32, 2, 64  # a sequence a rank
    routing = {r: [[tokens * k // 4] * 4] * 4 for r in range(ranks)}
    events = expert.routed_comm(config, expert.Layout(ep=ranks), routing)
    per_token_layer = sum(e.sent_bytes for e in events) / (ranks * tokens * 4)
    assert per_token_layer == 2 * (2 * k * h * 4 * (ranks - 1) / ranks)  # forward + backward


def test_predict_replays_an_expert_parallel_run(ep):
    table = pdlab.predict(ep, "8xH100")
    assert table.step.tolist() == [0, 1, 2]
    assert (table.step_time > 0).all() and (table.mfu > 0).all()


def test_experts_split_over_ranks_in_memory(ep, dp_ep, baseline):
    named = dict(build_model("moe").named_parameters())
    experts = sum(p.numel() * 4 for name, p in named.items() if expert.is_expert(name))
    replicated = sum(p.numel() * 4 for name, p in named.items() if not expert.is_expert(name))
    assert replicated + experts == baseline.memory.param_bytes[0]
    for result in (ep, dp_ep):
        assert (result.memory.param_bytes == replicated + experts // 2).all()
        assert (result.memory.param_bytes != baseline.memory.param_bytes[0]).all()  # unsplit


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strategy": "ep", "model": "gpt"}, r"use model='moe'"),
        ({"strategy": "ep", "world_size": 3}, r"world_size of 2 or 4"),
        ({"strategy": "ep", "world_size": 4, "batch_size": 6}, r"multiple of 4, e.g. 8"),
        ({"strategy": "tp"}, r"train model 'moe' with one of single, dp"),
        ({"strategy": "ep", "impl": "torch"}, r"no expert-parallel API"),
        ({"strategy": "dp", "recompute": "full"}, r"route the moe model's tokens twice"),
    ],
)
def test_bad_runs_name_the_fix(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**{"model": "moe", "world_size": 2, **changes}))


def _all_to_all_list_form(uneven: bool) -> str:
    rank = dist.get_rank()
    sizes = [1 + (rank + 2 * j if uneven else 0) for j in range(2)]  # to each rank
    inputs = [torch.full((n,), float(rank)) for n in sizes]
    outputs = [torch.empty(1 + (j + 2 * rank if uneven else 0)) for j in range(2)]
    try:
        dist.all_to_all(outputs, inputs)
    except RuntimeError as error:
        return str(error)
    return "ok"


def test_gloo_runs_the_list_all_to_all_only_with_equal_sizes(cluster2):
    """Why dispatch uses all_to_all_single (torch 2.13; pytorch issue 88245 had no list form)."""
    assert cluster2.run(_all_to_all_list_form, False) == ["ok", "ok"]
    for message in cluster2.run(_all_to_all_list_form, True):
        assert "ProcessGroupGloo::alltoall: invalid tensor size" in message


# ---- the dispatch check (lab 08's exercise) ------------------------------------------------


def _no_exchange(routed, counts, group):
    """A learner's dispatch that takes its own counts for the ones it receives."""
    received, _ = expert.dispatch(routed, counts, group)
    return received, counts.view(group.size(), -1)


def _reversed_rows(routed, counts, group):
    """A learner's dispatch whose rows arrive reversed within each rank's split."""
    received, received_counts = expert.dispatch(routed, counts, group)
    pieces = received.split(received_counts.sum(1).tolist())
    return torch.cat([p.flip(0) for p in pieces]), received_counts


DISPATCHES = {
    "right": expert.dispatch,
    "no_exchange": _no_exchange,
    "reversed_rows": _reversed_rows,
}


def _check_dispatch(name: str, n_expert: int = 4) -> list[str]:
    group, rank = dist.group.WORLD, dist.get_rank()
    counts = expert.example_counts(rank, n_expert)
    received, received_counts = DISPATCHES[name](expert.example_rows(rank, n_expert), counts, group)
    return expert.dispatch_problems(received, received_counts, rank, n_expert, group.size())


@pytest.mark.parametrize(
    ("name", "hint"),
    [("right", None), ("no_exchange", "exchange the [E] counts"), ("reversed_rows", "in order")],
)
def test_the_dispatch_check_names_the_mistake(cluster2, name, hint):
    problems = cluster2.run(_check_dispatch, name)
    if hint is None:
        assert problems == [[], []]
    else:
        assert any(hint in message for p in problems for message in p), problems


def test_the_plots_show_tokens_per_expert_and_each_steps_formula(ep):
    fig = plots.experts(ep, layer=1)
    *lines, balanced = fig.data
    routed = ep.routing[ep.routing.layer == 1].groupby(["expert", "step"]).tokens.sum()
    assert [list(line.y) for line in lines] == [routed[e].tolist() for e in range(4)]
    assert list(balanced.y) == [32 * 32 * 2 / 4] * 3  # B·T·k over E
    table = plots.traffic(ep)
    assert table.expected_sent_bytes.tolist() == pytest.approx(table.sent_bytes.tolist())


def test_the_dashboard_offers_ep_and_plots_tokens_per_expert_live(cluster2):
    d = pdlab.Dashboard(cluster2, refresh_s=0.05)
    try:
        menu = dict(d.controls["strategy"].options)
        assert menu["expert (MoE)"] == "ep" and menu["hybrid DP×EP"] == "dp-ep"
        d.start(strategy="ep", model="moe", steps=2, batch_size=4)
        result = d.wait(timeout=120)
        panel = {t.name: list(t.y) for t in d.figure.data if t.xaxis == "x5"}  # row 3
        assert list(panel) == ["expert 0", "expert 1", "expert 2", "expert 3", "balanced"]
        routed = result.routing.groupby(["expert", "step"]).tokens.sum()
        assert [panel[f"expert {e}"] for e in range(4)] == [routed[e].tolist() for e in range(4)]
    finally:
        d.close()
