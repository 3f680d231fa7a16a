"""pdlab.cost.footprint and pdlab.cost.planner against published figures and hand arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pandas as pd
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
    only = ["--only", "precision=mixed", "--only", "zero=0", "--only", "recompute=none"]
    args = ["plan", "--model", "gpt2-small", "--world-size", "2", "--global-batch", "4"]
    assert main([*args, *only, "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "step s" in out and "GB/GPU" in out and "MFU %" in out
    assert "dp×pp" not in out and "pp-1f1b" in out and "e+" not in out  # 2 GPUs: no 3-way grids
    assert main([*args, "--only", "tp=3"]) == 2
    assert "no layout splits" in capsys.readouterr().err
    assert main([*args, "--only", "tensor=2"]) == 2
    assert "only= names ['tensor']: use Layout's fields" in capsys.readouterr().err
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
    assert layer_activation_bytes(s, b, h, a, t, recompute="full") == 2 * 25_165_824
    assert layer_activation_bytes(s, b, h, a, flash_attention=True) == 25_165_824 * 34
    # Table 2, selective recompute: TP sbh(10 + 24/t); TP + SP 34sbh/t
    assert layer_activation_bytes(s, b, h, a, t, recompute="selective") == 25_165_824 * 13
    selective_sp = layer_activation_bytes(s, b, h, a, t, sequence_parallel=True, recompute="selective")  # fmt: skip
    assert selective_sp == 25_165_824 * 34 / 8
    with pytest.raises(ValueError, match="recompute is one of none, selective, full, got True"):
        layer_activation_bytes(s, b, h, a, recompute=True)


def test_planner_activations_for_one_layout_by_hand():
    # GPT-2 small, s = 1024, b = 1: s·b·h = 786,432; 5·a·s/h = 5·12·1024/768 = 80 -> a layer
    # keeps 786,432 · 114 = 89,653,248 bytes; the fp32 logits 4 · 1024 · 50257 = 205,852,672.
    rows = plan("gpt2-small", "2 h100-sxm nvlink4", 4, 1024, "mixed", only={"zero": 0})
    rows = rows.set_index(["strategy", "recompute"])
    assert rows.loc[("dp", "none"), "activation_bytes"] == 12 * 89_653_248 + 205_852_672
    # pp = 2, m = 4 micro-batches: the first stage holds min(2, 4) = 2 micro-batches of its 6
    # layers (2 · 6 · 89,653,248 = 1,075,838,976), more than the last (6 layers + logits).
    assert rows.loc[("pp-1f1b", "none"), "activation_bytes"] == 2 * 6 * 89_653_248
    assert rows.loc[("pp-zb", "none"), "activation_bytes"] == 2 * 6 * 89_653_248  # 1F1B's
    # interleaved: 1F1B's × (1 + (p-1)/(p·v)), 1.25 for v = 2, 1.125 for v = 4 (Narayanan
    # et al. 2021; Megatron's theoretical_memory_usage.py)
    interleaved = rows.loc[("pp-interleaved", "none")].set_index("v").activation_bytes
    assert interleaved.to_dict() == {2: 1.25 * 2 * 6 * 89_653_248, 4: 1.125 * 2 * 6 * 89_653_248}
    # full recompute: 12 layer inputs of 2 · 786,432 + one layer's working set + logits
    assert rows.loc[("dp", "full"), "activation_bytes"] == (
        12 * 2 * 786_432 + 89_653_248 + 205_852_672
    )
    # selective: the scores (80 of 114) recomputed: 12 · 786,432 · 34 + logits
    assert rows.loc[("dp", "selective"), "activation_bytes"] == 12 * 786_432 * 34 + 205_852_672


def test_step_time_of_one_row_by_hand():
    # 7.5e9 parameters, dp over 64 H100s (8 a node, NDR 400 between), 64 sequences of 2048.
    row = plan(7.5e9, world_size=64, precision="mixed").set_index("strategy").loc["dp"]
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
    only = {"recompute": "none", "pp": 1, "cp": 1, "zero": 0, "sp": True}
    plain = plan(spec, "2x8 nvlink4 ib-ndr400", 16, 2048, "mixed", only=only).set_index("tp")
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


@pytest.mark.parametrize("name", ["gpt", "moe"])
def test_the_labs_models_are_counted_like_the_models_themselves(name):
    from pdlab.training.models import build_model

    model = build_model(name)
    assert model_spec(name).params == sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert model_spec(name).expert_params == experts


def test_best_layout_or_why_none_fits():
    rows = pdlab.plan("llama3-8b", "8xH100", global_batch=64, seq_len=4096)
    top = best(rows)
    assert top.fits and top.step_time == rows[rows.fits].step_time.min()
    assert rows.fits.iloc[: rows.fits.sum()].all()  # every fitting row before any other
    too_big = plan("llama3-70b", "8xH100", global_batch=8, seq_len=8192, precision="mixed")
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


# ---- the five dimensions and the schedules, each formula against hand arithmetic -------------


def test_bubble_p2p_and_memory_of_each_pipeline_schedule():
    # gpt2-small, 4 GPUs: dp = 1, pp = 4, m = 8 micro-batches. Bubble over the ideal 8 slots:
    # 1F1B 3/8, interleaved v = 2: 3/16, ZB-H1: 3/24 (each slot is the same compute + comm).
    rows = plan("gpt2-small", "4 h100-sxm nvlink4", 8, 1024, "mixed", only={"pp": 4, "recompute": "none"})  # fmt: skip
    by = {(r.schedule, r.v): r for r in rows.itertuples()}
    for (schedule, v), fraction in {("1f1b", 1): 3 / 8, ("interleaved", 2): 3 / 16, ("zb-h1", 1): 3 / 24}.items():  # fmt: skip
        r = by[(schedule, v)]
        slots = r.compute_time + r.tp_time + r.pp_time + r.cp_time + r.ep_time
        assert r.bubble_time == pytest.approx(fraction * slots), schedule
    # p2p: interleaved sends ×v (same payload); ZB-H1 sends what 1F1B sends
    assert by[("interleaved", 2)].pp_time == pytest.approx(2 * by[("1f1b", 1)].pp_time)
    assert by[("zb-h1", 1)].pp_time == by[("1f1b", 1)].pp_time
    # interleaved with m not a multiple of p is not offered (Megatron's rule): m = 6 here
    odd = plan("gpt2-small", "4 h100-sxm nvlink4", 6, 1024, "mixed", only={"pp": 4})
    assert "interleaved" not in set(odd.schedule)


def test_a_wrong_bubble_formula_fails_the_hand_check():
    """Interleaved at 1F1B's (p-1)/m would miss the (p-1)/(v·m) above."""
    rows = plan("gpt2-small", "4 h100-sxm nvlink4", 8, 1024, "mixed", only={"pp": 4, "v": 2})
    r = rows.iloc[0]
    slots = r.compute_time + r.tp_time + r.pp_time
    assert r.bubble_time != pytest.approx(3 / 8 * slots)


# A small shape to count bytes by hand: 2 layers, h = 64, 4 heads of 16, 2 KV heads (32 wide).
SMALL = ModelSpec("small", 2, 64, 4, 2, 256, 1000, 512, bias=False, learned_positions=False)
SMALL_MOE = replace(SMALL, name="small-moe", experts=4, top_k=2)


def test_context_parallel_divides_activations_and_passes_kv_around_the_ring():
    # 2 GPUs, 2 sequences of 512 tokens, mixed precision: cp = 2 runs both sequences (m = 2
    # micro-batches of 1), half of each; dp = 2 one sequence each (m = 1).
    rows = plan(SMALL, "2 h100-sxm nvlink4", 2, 512, "mixed", only={"zero": 0, "recompute": "none"})  # fmt: skip
    cp, dp = rows.set_index("cp").loc[2], rows.set_index("dp").loc[2]
    assert (cp.micro_batches, dp.micro_batches) == (2, 1)
    # a cp rank holds half a sequence's activations (1F1B-free: one micro-batch at a time)
    assert cp.activation_bytes == pytest.approx(dp.activation_bytes / 2)
    # ring: (cp-1) steps of K and V, 2 · b · s/cp · h_kv · 2 bytes = 2 · 256 · 32 · 2 = 32,768
    # forward, twice that backward (K, V and dK, dV): 98,304 a layer a micro-batch; 2 layers,
    # 2 micro-batches: 393,216; gradients all-reduced over dp · cp = 2: 2 · 1/2 · params · 2.
    grads = SMALL.params * 2
    assert cp.intra_bytes == pytest.approx(4 * 98_304 + grads)
    assert dp.intra_bytes == pytest.approx(grads)


def test_moe_parameters_and_expert_parallel_all_to_all_by_hand():
    # Mixtral 8x7B (arXiv 2401.04088): 46.7B parameters, 12.9B used a token
    mixtral = model_spec("mixtral-8x7b")
    assert mixtral.params == pytest.approx(46.7e9, rel=1e-3)
    assert mixtral.matmul_params + mixtral.embedding_params == pytest.approx(12.9e9, rel=1e-2)
    # SMALL_MOE: an expert 2 · 64 · 256 = 32,768; a layer 4 of them + router 64 · 4 = 256
    assert SMALL_MOE.expert_params == 2 * 4 * 32_768
    assert SMALL_MOE.params - SMALL.params == 2 * (3 * 32_768 + 256)
    rows = plan(SMALL_MOE, "2 h100-sxm nvlink4", 2, 512, "mixed", only={"zero": 0, "recompute": "none"})  # fmt: skip
    ep = rows.set_index("ep").loc[2]
    dense = SMALL_MOE.params - SMALL_MOE.expert_params
    # experts split over ep = 2, the rest replicated: parameters 2 bytes each
    assert ep.param_bytes == (dense + SMALL_MOE.expert_params / 2) * 2
    # all-to-all: 512 tokens · 2 · k=2 · h=64 · 2 bytes · (ep-1)/ep = 131,072 bytes a layer
    # forward, the same backward: 2 layers · 2 · 131,072 = 524,288; plus the dense
    # gradients all-reduced over dp · ep = 2 (experts' over dp = 1: none).
    assert ep.intra_bytes == pytest.approx(524_288 + dense * 2)


def test_tensor_parallel_with_and_without_sequence_parallel():
    rows = plan("gpt2-small", "2 h100-sxm nvlink4", 2, 1024, "mixed", only={"tp": 2, "recompute": "none", "zero": 0})  # fmt: skip
    sp, plain = rows.set_index("sp").loc[True], rows.set_index("sp").loc[False]
    # a layer: Eq. 2 sbh(10 + 24/2 + 80/2) = 62 sbh against Table 2's sbh(34/2 + 80/2) = 57 sbh
    sbh = 1024 * 768
    logits = 4 * 1024 * 50257 / 2
    assert plain.activation_bytes == pytest.approx(12 * 62 * sbh + logits)
    assert sp.activation_bytes == pytest.approx(12 * 57 * sbh + logits)
    assert sp.intra_bytes == pytest.approx(plain.intra_bytes)  # same bytes on a ring


# ---- against published configurations --------------------------------------------------------

# Llama 3 405B pre-training (Llama Team, arXiv 2407.21783, Table 4): GPUs, TP, CP, PP, DP,
# sequence length, sequences a step (batch size/DP x DP), BF16 MFU. H100 SXM, 8 a node.
LLAMA3_TABLE_4 = [
    (8192, 8, 1, 16, 64, 8192, 2048, 0.43),
    (16384, 8, 1, 16, 128, 8192, 2048, 0.41),
    (16384, 8, 16, 16, 8, 131072, 128, 0.38),
]


def llama3_mfu(gpus, tp, cp, pp, dp, seq, batch) -> float:
    """The planner's best MFU on Llama 3's grid, searching ZeRO, SP, schedule, recompute."""
    topology = f"{gpus // 8}x8 h100-sxm nvlink4 ib-ndr400"
    flash = Assumptions(flash_attention=True)  # FlashAttention stores no scores
    only = {"tp": tp, "cp": cp, "pp": pp, "dp": dp}
    return best(
        plan("llama3-405b", topology, batch, seq, "mixed", assumptions=flash, only=only)
    ).mfu


# Within 25%: 0.5 of peak is the planner's one free number, and NCCL's tuning model (no
# rail-optimised rings: a node's traffic at one NIC's pace) is conservative across nodes.
LLAMA3_TOLERANCE = 0.25


@pytest.mark.parametrize("row", LLAMA3_TABLE_4, ids=lambda r: f"{r[0]}gpus-cp{r[2]}")
def test_llama3_405b_mfu_within_25_percent_of_the_paper(row):
    """Predicted 34.1%, 32.6%, 35.3% against 43%, 41%, 38%: 21%, 20% and 7% low, at the
    default efficiency of 0.5 with NCCL's model of 8 H100s a node and NDR InfiniBand."""
    *layout, published = row
    assert llama3_mfu(*layout) == pytest.approx(published, rel=LLAMA3_TOLERANCE)


def test_a_wrong_bubble_formula_misses_llama3(monkeypatch):
    """Every schedule at 1F1B's bubble (p-1)/m: the 8,192-GPU row falls to 27.4% (36% low)."""
    from pdlab.cost import planner

    monkeypatch.setattr(planner, "bubble_fraction", lambda schedule, p, m, v=1: (p - 1) / m)
    assert llama3_mfu(*LLAMA3_TABLE_4[0][:-1]) != pytest.approx(0.43, rel=LLAMA3_TOLERANCE)


# torchtitan's benchmarks/llama3_h100_202412_torchtitan.md, Table 1, row "FSDP": Llama 3.1 8B
# on 8 H100s (96 GB HBM2e, 500 W), FSDP (ZeRO-3), local batch 2 (global 16) of 8,192 tokens
# (its llama3_8b.toml), selective activation checkpointing, bf16: 82.4 GiB, 5,762 tokens/s
# a GPU. The planner's row: 90.8 GiB (+10%), 7,950 tokens/s (+38%: torchtitan reaches 33.7%
# MFU, the planner assumes 50% of peak; its footnote says the GPUs' peak is below the SXM's).
TORCHTITAN = {"memory_gib": 82.4, "tokens_per_s_per_gpu": 5762}


def torchtitan_row(zero: int = 3, recompute: str = "selective", flash: bool = True) -> pd.Series:
    only = {"dp": 8, "zero": zero, "recompute": recompute}
    assume = Assumptions(flash_attention=flash)
    rows = plan("llama3-8b", "8xH100", 16, 8192, "mixed", micro_batch_size=2, assumptions=assume, only=only)  # fmt: skip
    return rows.iloc[0]


def within_torchtitan(row: pd.Series) -> bool:
    memory = row.total_bytes / 2**30 == pytest.approx(TORCHTITAN["memory_gib"], rel=0.15)
    speed = row.tokens_per_s / 8 == pytest.approx(TORCHTITAN["tokens_per_s_per_gpu"], rel=0.45)
    return memory and speed


def test_llama3_8b_fsdp_memory_within_15_and_throughput_within_45_percent_of_torchtitan():
    assert within_torchtitan(torchtitan_row())


@pytest.mark.parametrize(
    "wrong",
    [{"zero": 0}, {"recompute": "none", "flash": False}],
    ids=["states-unsharded", "scores-stored"],
)
def test_wrong_memory_formulas_miss_torchtitan(wrong):
    """Model states not sharded (128 GB), or attention scores kept (5as/h = 320 sbh a layer)."""
    assert not within_torchtitan(torchtitan_row(**wrong))


def test_flops_without_attention_miss_torchtitan(monkeypatch):
    """6 FLOPs a weight without attention's 12·L·h·s: 10,000 tokens/s a GPU (+74%)."""
    from pdlab.cost import planner

    monkeypatch.setattr(planner, "flops_per_token", lambda spec, s: 6 * spec.matmul_params)
    assert not within_torchtitan(torchtitan_row())


# ---- the CLI's numbers -------------------------------------------------------------------------


def test_three_significant_figures_and_no_exponents():
    from pdlab.cost.planner import three_figures

    assert three_figures(7.215213e10) == "72,200,000,000"
    assert three_figures(0.462860) == "0.463"
    assert three_figures(12) == "12.0"
    assert three_figures(0.0001234) == "0.000123"
    assert three_figures(0.0) == "0" and three_figures(float("nan")) == "-"
