"""Every lab runs top to bottom under papermill, small, and shows what it teaches."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest

LABS = Path(__file__).resolve().parent.parent / "labs"

# Small parameters for each notebook, and text its outputs must contain.
RUNS = {
    "00_start_here": (
        {"world_size": 2},
        [
            "all 2 ranks agree: sum = 9",
            "[rank 1] after all_reduce: [3.0, 3.0, 3.0]",
            "[rank 1] epoch 2 loss",
            "snapshot.pt",
            "hidden 32",
            "rerun took",
        ],
    ),
    "05_strategy_explorer": (
        {"world_size": 2, "steps": 5},
        [
            "3 strategies, largest loss difference",
            "predicted ms",
            "not started: the batch",
            "status: stopped",
        ],
    ),
    "01_data_parallel": (
        {"world_size": 2, "steps": 10, "use_solutions": True, "article_epochs": 2},
        [
            "PASS gradient all-reduce",
            "worked example matches one process: True",
            "DDP: parity with one process (within 1e-5): True",
            "DDP: measured bytes == predicted: True",
            "ranks end with identical weights: True",
            "ps and ring: measured bytes == predicted: True",
            "of its all-reduce time ran behind the backward",
        ],
    ),
    "02_tensor_parallel": (
        {"world_size": 2, "steps": 5, "use_solutions": True},
        [
            "PASS column-parallel linear",
            "scratch TP: parity with one process (within 1e-5): True",
            "scratch TP: measured bytes == predicted: True",
            "DTensor TP: parity with one process (within 1e-5): True",
            "DTensor TP: measured bytes == predicted: True",
        ],
    ),
    "03_pipeline_parallel": (
        {"world_size": 2, "steps": 2, "micro_batches": 4, "use_solutions": True},
        [
            "PASS GPipe step",
            *(
                f"{s}: parity with one process (within 1e-5): True"
                for s in ("naive", "GPipe", "1F1B", "interleaved", "ZB-H1")
            ),
            *(
                f"{s}: measured bytes == predicted: True"
                for s in ("naive", "GPipe", "1F1B", "interleaved", "ZB-H1")
            ),
            "micro-batches held (peak)",
            "(p-1)/(v·m)",
            "(p-1)/(3m)",
        ],
    ),
    "04_sharded": (
        {"world_size": 2, "steps": 3, "use_solutions": True},
        [
            "PASS ZeRO-1 update",
            *(
                f"{s}: parity with one process (within 1e-5): True"
                for s in (
                    "DP",
                    "ZeRO-1",
                    "ZeRO-1 (ZeroRedundancyOptimizer)",
                    "ZeRO-2",
                    "ZeRO-3",
                    "FSDP2",
                )
            ),
            "ZeRO-2 in bf16, rank 0's model state: 1,878,936 bytes measured, 1,878,912",
            "PASS make it fit: strategy='zero2'",
            "measured bytes == predicted: True",
            "FSDP2: ",
            "of its communication overlapped compute",
        ],
    ),
    "07_what_if": (
        {"world_size": 2, "steps": 4, "strategies": ["dp", "tp"], "use_solutions": True},
        [
            "median error of the predictions:",
            *(f"{s} @ 100Mbit/s: rank 0 sends" for s in ("dp", "tp")),
            "fastest layout that fits on 8xH100:",
            "fastest layout that fits on 2x8xH100-ib-ndr400:",
            "PASS all-reduce time",
            "emulated all-reduce: measured",
        ],
    ),
    "06_hybrid_and_beyond": (
        {"world_size": 4, "steps": 5},
        [
            "measured bytes == predicted: True",
            "(within 1e-5: True)",
            "rank 1 (torchrun node 1)",
            "torchrun exit codes: [0, 0]",
        ],
    ),
    "08_long_context_and_experts": (
        {
            "world_size": 2,
            "seq_lens": [32, 64, 128],
            "budget_mb": 5.0,
            "moe_steps": 3,
            "use_solutions": True,
        },
        [
            "sequences of 64 tokens and more don't fit",
            "tp-sp fits in 5.0 MB a rank up to 64 tokens",
            "cp fits in 5.0 MB a rank up to 128 tokens",
            "all-to-all bytes == routing's formula: True",
            "PASS ring-attention step",
            "PASS MoE dispatch",
        ],
    ),
}


QUIET = {"07_what_if"}  # labs that warned on a busy machine before they said it in prose


def outputs_text(nb: nbformat.NotebookNode) -> str:
    """Every output's text, one a line, as a reader sees them: a stream's consecutive outputs
    run together (under load, one print came as two: "measured bytes == predicted:", " True")."""
    parts = []
    for cell in nb.cells:
        stream = None  # the stream the previous output wrote to, if it was one
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == stream:
                parts[-1] += out.get("text", "")
                continue
            stream = out.get("name") if out.get("output_type") == "stream" else None
            parts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_outputs_text_joins_a_streams_pieces_and_nothing_else():
    cell = nbformat.v4.new_code_cell()
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="exact:"),
        nbformat.v4.new_output("stream", name="stdout", text=" True\n"),
        nbformat.v4.new_output("stream", name="stderr", text="warned"),
        nbformat.v4.new_output("execute_result", data={"text/plain": "42"}, execution_count=1),
    ]
    assert outputs_text(nbformat.v4.new_notebook(cells=[cell])) == "exact: True\n\nwarned\n42"


def test_every_lab_has_a_papermill_run():
    assert {p.stem for p in LABS.glob("*.ipynb")} == set(RUNS)


def test_labs_are_committed_without_outputs():
    for path in LABS.glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        executed = [i for i, c in enumerate(nb.cells) if c.get("outputs")]
        assert not executed, f"{path.name}: cells {executed} have outputs; clear them"
        tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_lab_runs_under_papermill(name, tmp_path):
    parameters, expected = RUNS[name]
    out = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(
        LABS / f"{name}.ipynb", out, parameters=parameters, cwd=LABS, progress_bar=False
    )
    executed = nbformat.read(out, as_version=4)
    text = outputs_text(executed)
    missing = [e for e in expected if e not in text]
    assert not missing, f"{name}: outputs lack {missing}"
    if name in QUIET:  # what a lab has to say, it says in its outputs: no warnings
        stderr = [o.text for c in executed.cells for o in c.get("outputs", []) if o.get("name") == "stderr"]  # fmt: skip
        assert not stderr, f"{name} wrote to stderr: {stderr}"
