"""pdlab.cost.footprint and pdlab.cost.planner against published figures and hand arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

import pdlab
from pdlab.cost.footprint import ModelSpec, layer_activation_bytes, model_spec
from pdlab.cost.planner import Assumptions, best, plan
from pdlab.lab.cli import main

# ZeRO (Rajbhandari et al. 2020, arXiv 1910.02054), Table 1 (Figure 1 rounds the last to 1.9):
# model states per GPU of a 7.5B-parameter model on N_d = 64 data-parallel GPUs, K = 12, in GB.
ZERO_PAPER_GB = {"dp": 120, "zero1": 31.4, "zero2": 16.6, "zero3": 1.88}


def check_zero_paper(rows) -> None:
    for strategy, gigabytes in ZERO_PAPER_GB.items():
        (row,) = [r for r in rows if r["strategy"] == strategy]
        states = row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
        assert states / 1e9 == pytest.approx(gigabytes, rel=0.01), strategy


def test_model_states_reproduce_the_zero_paper():
    rows = plan(7.5e9, world_size=64, precision="mixed").to_dict("records")
    check_zero_paper(rows)
    assert {r["note"] for r in rows} == {"model states only: a bare parameter count has no shape, so activations, tp and pp are not computed"}  # fmt: skip


@pytest.mark.parametrize("wrong", ["fp32", "bf16"])
def test_the_zero_check_fails_other_precisions(wrong):
    """fp32 Adam (4 + 4 + 8 bytes) has the paper's 120 GB baseline but not its shards; bf16
    moments (K = 4) miss it everywhere."""
    with pytest.raises(AssertionError):
        check_zero_paper(plan(7.5e9, world_size=64, precision=wrong).to_dict("records"))


def test_cli_json_rows_match_the_zero_paper():
    command = ["plan", "--params", "7.5e9", "--world-size", "64", "--precision", "mixed", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "pdlab", *command], capture_output=True, text=True, check=True
    ).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert sorted(r["strategy"] for r in rows) == ["dp", "zero1", "zero2", "zero3"]
    check_zero_paper(rows)
    by_name = {r["strategy"]: r for r in rows}
    assert by_name["dp"]["fits"] is False and by_name["dp"]["over_bytes"] == pytest.approx(40e9)
    assert by_name["zero3"]["activation_bytes"] is None  # a bare count has no activations
    assert rows[0]["fits"] and rows[-1]["strategy"] == "dp"  # fitting rows first


def test_every_data_parallel_row_names_a_strategy_pdlab_runs():
    from pdlab.training import registry

    rows = plan(7.5e9, world_size=4)
    assert set(rows.strategy) == {"dp", "zero1", "zero2", "zero3"} <= set(registry.names())


def test_cli_table_best_and_errors(capsys):
    assert main(["plan", "--model", "llama3-8b", "--topology", "8xH100", "--best", "--json"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["fits"] is True
    assert main(["plan", "--model", "gpt2-small", "--world-size", "2", "--global-batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "step ms" in out and "dp×pp" not in out and "pp" in out  # 2 GPUs: no 3-way grids
    assert main(["plan", "--params", "1e9", "--topology", "8xH200"]) == 2
    assert "can't read topology '8xH200'" in capsys.readouterr().err


def test_korthikanti_activation_bytes_by_hand():
    # GPT-3 175B as in the paper: s = 2048, b = 1, h = 12288, a = 96, t = 8.
    # s·b·h = 2048 · 12288 = 25,165,824; 5·a·s/h = 5 · 96 · 2048 / 12288 = 80
    s, b, h, a, t = 2048, 1, 12288, 96, 8
    assert layer_activation_bytes(s, b, h, a) == 25_165_824 * (34 + 80)  # Eq. 1: 2,868,903,936
    assert layer_activation_bytes(s, b, h, a, t) == 25_165_824 * (10 + 3 + 10)  # Eq. 2: 578,813,952
    sp = layer_activation_bytes(s, b, h, a, t, sequence_parallel=True)
    assert sp == 25_165_824 / 8 * 114  # Table 2, tensor + sequence parallel: 358,612,992
    assert layer_activation_bytes(s, b, h, a, t, recompute=True) == 2 * 25_165_824
    assert layer_activation_bytes(s, b, h, a, flash_attention=True) == 25_165_824 * 34


def test_planner_activations_for_one_layout_by_hand():
    # GPT-2 small, s = 1024, b = 1: s·b·h = 786,432; 5·a·s/h = 5·12·1024/768 = 80 -> a layer
    # keeps 786,432 · 114 = 89,653,248 bytes; the fp32 logits 4 · 1024 · 50257 = 205,852,672.
    rows = plan("gpt2-small", "2 h100-sxm nvlink4", global_batch=4, seq_len=1024)
    rows = rows.set_index(["strategy", "recompute"])
    assert rows.loc[("dp", False), "activation_bytes"] == 12 * 89_653_248 + 205_852_672
    # pp = 2, m = 4 micro-batches: the first stage holds min(2, 4) = 2 micro-batches of its 6
    # layers (2 · 6 · 89,653,248 = 1,075,838,976), more than the last (6 layers + logits).
    assert rows.loc[("pp", False), "activation_bytes"] == 2 * 6 * 89_653_248
    # full recompute: 12 layer inputs of 2 · 786,432 + one layer's working set + logits
    assert rows.loc[("dp", True), "activation_bytes"] == (
        12 * 2 * 786_432 + 89_653_248 + 205_852_672
    )


def test_step_time_of_one_row_by_hand():
    # 7.5e9 parameters, dp over 64 H100s (8 a node, NDR 400 between), 64 sequences of 2048.
    row = plan(7.5e9, world_size=64).set_index("strategy").loc["dp"]
    # compute: 6 · 7.5e9 FLOPs a token · 64 · 2048 tokens / 64 GPUs / (989.5e12 · 0.5)
    compute = 6 * 7.5e9 * 64 * 2048 / 64 / (989.5e12 * 0.5)  # 0.18628 s
    backward = compute * 2 / 3
    # bf16 gradients, 15e9 bytes, all-reduced over 64 ranks on 8 nodes: NCCL's ring, Simple
    # protocol (pdlab.cost.nccl), at the speed NCCL gives an NDR NIC (48 GB/s); its latency
    # 8.4 µs + 112 NVLink steps of 3.4 µs + 14 network steps of 14 µs, times 1.4 across nodes
    all_reduce = 1.4 * (8.4 + 112 * 3.4 + 14 * 14) * 1e-6 + 2 * 63 / 64 * 15e9 / 48e9  # 0.6160 s
    assert row.compute_time == pytest.approx(compute)
    assert row.dp_exposed_time == pytest.approx(all_reduce - backward)
    assert row.step_time == pytest.approx(compute + all_reduce - backward)
    assert row.mfu == pytest.approx(6 * 7.5e9 * 64 * 2048 / row.step_time / (64 * 989.5e12))
    assert row.inter_bytes == pytest.approx(2 * 63 / 64 * 15e9) and row.intra_bytes == 0


def test_tensor_parallelism_stays_in_a_node_unless_it_cannot():
    spec = ModelSpec("wide", 16, 2048, 16, 16, 8192, 32000, 2048)
    rows = plan(spec, "2x8 nvlink4 ib-ndr400", global_batch=16, seq_len=2048)
    plain = rows[rows.recompute.eq(False) & rows.pp.eq(1) & rows.zero.eq(0)].set_index("tp")
    assert plain.loc[16, "intra_bytes"] == 0 and plain.loc[16, "inter_bytes"] > 0
    assert plain.loc[8, "intra_bytes"] > 0  # TP over NVLink; only DP crosses nodes
    assert plain.loc[8, "inter_bytes"] == pytest.approx(2 * 1 / 2 * spec.params / 8 * 2)
    assert plain.loc[16, "tp_time"] > 5 * plain.loc[8, "tp_time"]


def test_published_parameter_counts():
    # Llama 3 model cards: 8.03B and 70.6B (GQA: 8 KV heads; SwiGLU: three FFN matrices)
    assert model_spec("llama3-8b").params == pytest.approx(8.03e9, rel=1e-3)
    assert model_spec("llama3-70b").params == pytest.approx(70.6e9, rel=1e-3)
    # ...which a count without GQA misses
    mha = replace(model_spec("llama3-8b"), n_kv_head=32)
    assert mha.params != pytest.approx(8.03e9, rel=1e-3)
    assert model_spec("gpt2-small").params == 124_439_808  # Hugging Face gpt2
    assert model_spec("gpt2-xl").params == 1_557_611_200  # Hugging Face gpt2-xl


def test_the_labs_gpt_is_counted_like_the_model_itself():
    from pdlab.training.models import build_model

    model = build_model("gpt")
    assert model_spec("gpt").params == sum(p.numel() for p in model.parameters())


def test_best_layout_or_why_none_fits():
    rows = pdlab.plan("llama3-8b", "8xH100", global_batch=64, seq_len=4096)
    top = best(rows)
    assert top.fits and top.step_time == rows[rows.fits].step_time.min()
    assert rows.fits.iloc[: rows.fits.sum()].all()  # every fitting row before any other
    too_big = plan("llama3-70b", "8xH100", global_batch=8, seq_len=8192)
    assert not too_big.fits.any()
    with pytest.raises(ValueError, match=r"no layout fits: the closest, .* needs [\d.]+ GB more"):
        best(too_big)


def test_assumptions_change_the_rows_they_name():
    base = plan("llama3-8b", "8xH100", global_batch=16, seq_len=4096)
    flash = plan("llama3-8b", "8xH100", 16, 4096, assumptions=Assumptions(flash_attention=True))
    assert (flash.activation_bytes.sum()) < base.activation_bytes.sum()
    slow = plan("llama3-8b", "8xH100", 16, 4096, assumptions=Assumptions(efficiency=0.25))
    assert slow.compute_time.min() == pytest.approx(2 * base.compute_time.min())


def test_bad_requests_say_what_to_change():
    with pytest.raises(ValueError, match="world_size 16 disagrees with topology '8xH100'"):
        plan("gpt", "8xH100", world_size=16)
    with pytest.raises(ValueError, match="no layout splits a global batch of 3"):
        plan(1e9, world_size=64, global_batch=3)
    with pytest.raises(ValueError, match="unknown model 'llama'.*llama3-8b.*--params"):
        plan("llama", world_size=8)
    with pytest.raises(ValueError, match="learned positions for 1024 tokens"):
        plan("gpt2-small", world_size=8, seq_len=2048)
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        plan("gpt", world_size=2, precision="fp8")
    with pytest.raises(ValueError, match="not a multiple of 8"):
        plan("gpt", world_size=12)
