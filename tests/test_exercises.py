"""Each exercise's checker passes the reference solution and fails the mistakes a learner
makes, each with a hint that names that mistake (written below as a learner would write them)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from pdlab.lab import exercises, solutions
from pdlab.training.models import loss_fn
from pdlab.training.parallel import context, expert
from tests.test_context import diagonal_mask, no_rescale
from tests.test_expert import _no_exchange, _reversed_rows

# ---- lab 01: allreduce_gradients(params, group) ------------------------------------------


def sum_not_mean(params, group):
    for p in params:
        dist.all_reduce(p.grad, group=group)


def no_sync(params, group):
    pass


def not_written(params, group):
    raise NotImplementedError("write this")


def reduced_a_copy(params, group):
    for p in params:
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)
        grad /= group.size()


def first_parameter_only(params, group):
    dist.all_reduce(params[0].grad, group=group)
    params[0].grad /= group.size()


def reduce_to_rank_0(params, group):
    for p in params:
        dist.reduce(p.grad, dst=0, group=group)
        p.grad /= group.size()


def only_rank_0_syncs(params, group):
    if dist.get_rank() == 0:
        for p in params:
            dist.all_reduce(p.grad, group=group)
            p.grad /= group.size()


# ---- lab 02: column_parallel_forward(x, linear, rank, world_size) -------------------------


def whole_output(x, linear, rank, world_size):
    return linear(x)


def whole_output_then_my_block(x, linear, rank, world_size):
    return linear(x).chunk(world_size, dim=1)[rank]


def columns_of_the_weight(x, linear, rank, world_size):
    k = linear.out_features // world_size
    return (
        x @ linear.weight[:, rank * k : (rank + 1) * k].T + linear.bias[rank * k : (rank + 1) * k]
    )


def no_bias(x, linear, rank, world_size):
    k = linear.out_features // world_size
    return x @ linear.weight[rank * k : (rank + 1) * k].T


def the_next_ranks_block(x, linear, rank, world_size):
    k = linear.out_features // world_size
    r = (rank + 1) % world_size
    return F.linear(x, linear.weight[r * k : (r + 1) * k], linear.bias[r * k : (r + 1) * k])


# ---- lab 03: gpipe_step(stage, xs, ys, link) ---------------------------------------------


def one_micro_batch_at_a_time(stage, xs, ys, link):
    for x, y in zip(xs, ys, strict=True):
        solutions.gpipe_step(stage, [x], [y], link)


def gpipe(stage, xs, ys, link, scale=True, send_back=lambda h: h.grad):
    """GPipe as a learner writes it, with a switch for each mistake below."""
    inputs, outputs = [], []
    for x, y in zip(xs, ys, strict=True):
        h = x if link.is_first else link.recv_forward()
        out = stage(h)
        if link.is_last:
            out = loss_fn(out, y) / (len(xs) if scale else 1)
        else:
            link.send_forward(out)
        inputs.append(h)
        outputs.append(out)
    for h, out in zip(inputs, outputs, strict=True):
        out.backward(None if link.is_last else link.recv_backward())
        if not link.is_first and send_back is not None:
            link.send_backward(send_back(h))


def loss_not_divided_by_m(stage, xs, ys, link):
    gpipe(stage, xs, ys, link, scale=False)


def sends_the_activation_back(stage, xs, ys, link):
    gpipe(stage, xs, ys, link, send_back=lambda h: h.detach())


def never_sends_back(stage, xs, ys, link):
    gpipe(stage, xs, ys, link, send_back=None)


# ---- lab 04: zero1_update(z) ----------------------------------------------------------------


def _flat_grad(z, pad=True):
    grads = torch.cat([p.grad.flatten() for p in z.params])
    return F.pad(grads, (0, z.padding)) if pad else grads


def zero1_sum(z):
    dist.reduce_scatter_tensor(z.owned.grad, _flat_grad(z), group=z.group)
    z.optimizer.step()
    dist.all_gather_into_tensor(z.flat_param, z.owned.detach(), group=z.group)


def zero1_no_gather(z):
    dist.reduce_scatter_tensor(z.owned.grad, _flat_grad(z), group=z.group)
    z.owned.grad /= z.group.size()
    z.optimizer.step()


def plain_data_parallel(z):
    for p in z.params:
        dist.all_reduce(p.grad, group=z.group)
        p.grad /= z.group.size()
    if not hasattr(z, "adam"):
        z.adam = torch.optim.Adam(z.params, lr=z.optimizer.param_groups[0]["lr"])
    z.adam.step()


def all_reduce_then_my_shard(z):
    grads = _flat_grad(z)
    dist.all_reduce(grads, group=z.group)
    k, r = len(z.owned), z.group.rank()
    z.owned.grad.copy_(grads[r * k : (r + 1) * k] / z.group.size())
    z.optimizer.step()
    dist.all_gather_into_tensor(z.flat_param, z.owned.detach(), group=z.group)


def no_padding(z):
    dist.reduce_scatter_tensor(z.owned.grad, _flat_grad(z, pad=False), group=z.group)
    z.owned.grad /= z.group.size()
    z.optimizer.step()
    dist.all_gather_into_tensor(z.flat_param, z.owned.detach(), group=z.group)


# ---- lab 08: ring_step(state, q, k, v, q_pos, k_pos, scale) ----------------------------------


def forgot_the_rescale(state, q, k, v, q_pos, k_pos, scale):
    s = q @ k.transpose(-2, -1) * scale + context.causal_mask(q_pos, k_pos, q.dtype)
    m = s.amax(-1, keepdim=True)
    if state is not None:
        m = torch.maximum(state.m, m)
    p = torch.exp(s - m)
    if state is None:
        return context.Partial(p @ v, m, p.sum(-1, keepdim=True))
    return context.Partial(state.o + p @ v, m, state.l + p.sum(-1, keepdim=True))


def ring_not_written(state, q, k, v, q_pos, k_pos, scale):
    raise NotImplementedError("write ring_step")


def calls_attend_block(state, q, k, v, q_pos, k_pos, scale):
    return context.attend_block(state, q, k, v, q_pos, k_pos, scale)


def returns_the_output(state, q, k, v, q_pos, k_pos, scale):
    return context.attend_block(state, q, k, v, q_pos, k_pos, scale).result()[0]


# ---- lab 08: dispatch(routed, counts, group) ------------------------------------------------


def splits_per_expert(routed, counts, group):
    received_counts = expert.exchange_counts(counts, group)
    out = routed.new_empty(int(received_counts.sum()), routed.shape[1])
    dist.all_to_all_single(out, routed, received_counts.flatten().tolist(), counts.tolist(), group=group)  # fmt: skip
    return out, received_counts


def splits_swapped(routed, counts, group):
    received_counts = expert.exchange_counts(counts, group)
    to_ranks = counts.view(group.size(), -1).sum(1).tolist()
    out = routed.new_empty(sum(to_ranks), routed.shape[1])
    dist.all_to_all_single(out, routed, to_ranks, received_counts.sum(1).tolist(), group=group)
    return out, received_counts


# ---- lab 04, make it fit: a choice of strategy, recompute and precision -----------------------


def fit(strategy, recompute, precision):
    return {"strategy": strategy, "recompute": recompute, "precision": precision}


CHECKS = {
    "lab 01": (exercises.check_gradient_allreduce, solutions.allreduce_gradients),
    "lab 02": (exercises.check_column_parallel, solutions.column_parallel_forward),
    "lab 03": (exercises.check_gpipe, solutions.gpipe_step),
    "lab 04": (exercises.check_zero1, solutions.zero1_update),
    "lab 04 fit": (exercises.check_fit, solutions.fit_choice),
    "lab 08": (exercises.check_ring_step, solutions.ring_step),
    "lab 08 dispatch": (exercises.check_dispatch, solutions.dispatch),
}
MISTAKES = [
    ("lab 01", sum_not_mean, "2 times too big: all_reduce sums"),
    ("lab 01", no_sync, "issued no collective"),
    ("lab 01", not_written, "not written yet"),
    ("lab 01", reduced_a_copy, "a copy (.clone()"),
    ("lab 01", first_parameter_only, "only some parameters were averaged: 0.bias, 2.weight, 2.bias"),
    ("lab 01", reduce_to_rank_0, "dist.reduce leaves the sum on one rank"),
    ("lab 01", only_rank_0_syncs, "call it on every rank"),
    ("lab 02", whole_output, "that is the whole output"),
    ("lab 02", whole_output_then_my_block, "you multiplied by all 8 columns and kept your 4: 2x the work"),
    ("lab 02", columns_of_the_weight, "a block of A's columns is a block of weight's *rows*"),
    ("lab 02", no_bias, "the bias is missing"),
    ("lab 02", the_next_ranks_block, "another rank's block"),
    ("lab 03", one_micro_batch_at_a_time, "then every backward"),
    ("lab 03", loss_not_divided_by_m, "m = 4 times too big"),
    ("lab 03", sends_the_activation_back, "sent back something other than the gradient of its input"),
    ("lab 03", never_sends_back, "the next stage's link.send_backward(h.grad)"),
    ("lab 04", zero1_sum, "2 times the mean gradient"),
    ("lab 04", zero1_no_gather, "only this rank's shard changed"),
    ("lab 04", plain_data_parallel, "that is plain data parallelism"),
    ("lab 04", all_reduce_then_my_shard, "you all-reduced the gradient"),
    ("lab 04", no_padding, "pad the torch.cat of the gradients with z.padding zeros"),
    # Each one lever short of the reference (it fits with that lever pulled), and plain dp
    # with every other lever pulled: the budget is measured between them.
    ("lab 04 fit", fit("zero2", "none", "bf16"), "activations are 2.49 MB of your 4.37 MB, 2.12 MB over budget: try recompute='full'"),
    ("lab 04 fit", fit("zero2", "selective", "bf16"), "selective recomputes attention's core only; try recompute='full'"),
    ("lab 04 fit", fit("zero1", "full", "bf16"), "gradients are 0.63 MB of your 2.55 MB, 0.30 MB over budget: zero1 keeps every full gradient"),
    ("lab 04 fit", fit("zero2", "full", "fp32"), "all in fp32: try precision='bf16'"),
    ("lab 04 fit", fit("dp", "full", "bf16"), "plain data parallelism keeps the whole model state on every rank"),
    ("lab 04 fit", fit("zero3", "full", "bf16"), "zero3/scratch recomputes every unit already"),
    ("lab 04 fit", fit("tp", "full", "bf16"), "choose zero1, zero2 or zero3"),
    ("lab 08", forgot_the_rescale, "multiply both by exp(m_old - m_new)"),
    ("lab 08", diagonal_mask, "rank 0's queries at positions 0, 1 saw rank 1's keys at 2..5"),
    ("lab 08", no_rescale, "exp(-inf - (-inf)) is NaN"),
    ("lab 08", ring_not_written, "not written yet"),
    ("lab 08", returns_the_output, "return context.Partial(o, m, l)"),
    ("lab 08", calls_attend_block, "a step that calls it recurses"),
    ("lab 08 dispatch", splits_per_expert, "one split per rank of the group, not per expert"),
    ("lab 08 dispatch", splits_swapped, "wrong split sizes"),
    ("lab 08 dispatch", _no_exchange, "exchange the [E] counts"),
    ("lab 08 dispatch", _reversed_rows, "not in order (source rank, then expert)"),
    ("lab 04 fit", {"strategy": "zero2"}, "write choice = dict(strategy=..., recompute=..., precision=...)"),
]  # fmt: skip


def name(wrong) -> str:
    """A mistake's test id: the function's name, or the choice's values."""
    return wrong.__name__ if callable(wrong) else "-".join(wrong.values())


HANG = (only_rank_0_syncs, never_sends_back)  # a peer waits forever: the check times out


@pytest.mark.parametrize("lab", sorted(CHECKS))
def test_the_reference_passes(cluster2, capsys, lab):
    check, solution = CHECKS[lab]
    assert check(cluster2, solution)
    out = capsys.readouterr().out
    assert out.startswith("PASS") and "FAIL" not in out, out


@pytest.mark.parametrize(
    ("lab", "wrong", "hint"),
    MISTAKES,
    ids=[f"{lab}-{name(wrong)}" for lab, wrong, _ in MISTAKES],
)
def test_a_mistake_fails_with_a_hint_naming_it(cluster2, capsys, monkeypatch, lab, wrong, hint):
    if wrong in HANG:
        monkeypatch.setattr(exercises, "TIMEOUT_S", 5.0)  # fail sooner (the ranks are warm)
    check, _ = CHECKS[lab]
    assert not check(cluster2, wrong)
    out = capsys.readouterr().out
    assert out.startswith("FAIL") and "hint:" in out and hint in out, out


def test_the_references_pass_at_4_ranks(cluster4, capsys):
    for check, solution in CHECKS.values():
        assert check(cluster4, solution), capsys.readouterr().out
    assert capsys.readouterr().out.count("PASS") == len(CHECKS)
