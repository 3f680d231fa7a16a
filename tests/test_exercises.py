"""Each exercise's checker passes the reference solution and fails a plausible mistake, with a hint."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from pdlab import exercises, solutions


def sum_not_mean(params, group):
    for p in params:
        dist.all_reduce(p.grad, group=group)


def no_sync(params, group):
    pass


def not_written(params, group):
    raise NotImplementedError("write this")


def whole_output(x, linear, rank, world_size):
    return linear(x)


def one_micro_batch_at_a_time(stage, xs, ys, link):
    for x, y in zip(xs, ys, strict=True):
        solutions.gpipe_step(stage, [x], [y], link)


def zero1_sum(z):
    grads = torch.nn.functional.pad(torch.cat([p.grad.flatten() for p in z.params]), (0, z.padding))
    dist.reduce_scatter_tensor(z.owned.grad, grads, op=dist.ReduceOp.SUM, group=z.group)
    z.optimizer.step()
    dist.all_gather_into_tensor(z.flat_param, z.owned.detach(), group=z.group)


def zero1_no_gather(z):
    grads = torch.nn.functional.pad(torch.cat([p.grad.flatten() for p in z.params]), (0, z.padding))
    dist.reduce_scatter_tensor(z.owned.grad, grads, group=z.group)
    z.owned.grad /= z.group.size()
    z.optimizer.step()


CASES = [
    (exercises.check_gradient_allreduce, solutions.allreduce_gradients, sum_not_mean, "2 times too big"),
    (exercises.check_gradient_allreduce, solutions.allreduce_gradients, no_sync, "its own 10 samples"),
    (exercises.check_gradient_allreduce, solutions.allreduce_gradients, not_written, "not written yet"),
    (exercises.check_column_parallel, solutions.column_parallel_forward, whole_output, "whole output"),
    (exercises.check_gpipe, solutions.gpipe_step, one_micro_batch_at_a_time, "every backward"),
    (exercises.check_zero1, solutions.zero1_update, zero1_sum, "2 times too big"),
    (exercises.check_zero1, solutions.zero1_update, zero1_no_gather, "all-gather"),
]  # fmt: skip


@pytest.mark.parametrize(("check", "solution", "wrong", "hint"), CASES)
def test_checker_passes_the_solution_and_fails_a_mistake(
    cluster2, capsys, check, solution, wrong, hint
):
    assert check(cluster2, solution)
    assert "PASS" in capsys.readouterr().out
    assert not check(cluster2, wrong)
    out = capsys.readouterr().out
    assert "FAIL" in out and "hint:" in out and hint in out, out
