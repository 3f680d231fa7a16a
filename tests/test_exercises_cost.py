"""Lab 07's exercise checker passes the reference answer and fails each plausible mistake."""

from __future__ import annotations

import pytest

from pdlab.cost.costmodel import link_op_time
from pdlab.cost.topology import parse_link
from pdlab.lab import exercises_cost, solutions


def whole_payload(s, n, bandwidth, latency):
    return 2 * (n - 1) * latency + s / bandwidth


def no_latency(s, n, bandwidth, latency):
    return 2 * (n - 1) / n * s / bandwidth


def bits(s, n, bandwidth, latency):
    return 2 * (n - 1) * latency + 2 * (n - 1) / n * 8 * s / bandwidth


def not_written(s, n, bandwidth, latency):
    raise NotImplementedError


def test_the_reference_answer_passes(capsys):
    assert exercises_cost.check_all_reduce_time(solutions.all_reduce_time)
    assert capsys.readouterr().out.startswith("PASS all-reduce time")


@pytest.mark.parametrize(
    ("answer", "hint"),
    [
        (whole_payload, "2(n-1)/n of the payload"),
        (no_latency, "pays the latency once"),
        (bits, "don't multiply by 8"),
        (not_written, "write all_reduce_time"),
    ],
)
def test_a_mistake_fails_with_its_hint(answer, hint, capsys):
    assert not exercises_cost.check_all_reduce_time(answer)
    out = capsys.readouterr().out
    assert out.startswith("FAIL all-reduce time")
    assert hint in out


def test_an_all_reduce_on_an_emulated_link_takes_at_least_its_modelled_time(cluster2):
    payload, link = 2**20, "1Gbit/s@50us"
    model = link_op_time("all_reduce", payload, 2, parse_link(link))  # 8.5 ms
    measured = exercises_cost.time_all_reduce(cluster2, payload, link)
    assert model <= measured < model + 1.0
