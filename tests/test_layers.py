"""The layers hold, and each import-linter contract fails on the import it forbids.

``lint-imports`` (run by ``make lint``) checks pyproject.toml's contracts on pdlab. Here each
contract is shown failing: a copy of pdlab gets one forbidden import, and lint-imports must
name the broken contract (a contract that never fails checks nothing).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# (module file, the import added to it, the contract it breaks)
FORBIDDEN = [
    ("measure/comm.py", "from pdlab.cost import emulation", "Layers"),
    ("control/warmup.py", "from pdlab.training import registry", "Layers"),
    ("training/parallel/tensor.py", "from pdlab.training.parallel import sharded", "The tensor"),
    ("control/worker.py", "import pandas", "A rank's control plane"),
    ("training/data.py", "from pdlab.training import models", "No import circles"),
    ("cost/topology.py", "from pdlab.cost import calibration", "No import circles"),
]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_contracts_hold_on_pdlab():
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.mark.parametrize(("module", "line", "contract"), FORBIDDEN)
def test_a_forbidden_import_breaks_its_contract(tmp_path, module, line, contract):
    shutil.copytree(
        ROOT / "pdlab", tmp_path / "pdlab", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "pdlab" / module, "a") as f:
        f.write(f"\n{line}  # forbidden\n")
    done = lint_imports(tmp_path)
    assert done.returncode != 0, done.stdout
    broken = [row for row in done.stdout.splitlines() if row.rstrip().endswith("BROKEN")]
    assert any(row.startswith(contract) for row in broken), done.stdout


def test_a_layers_modules_are_its_attributes_on_first_use():
    """``pdlab.measure.trace.breakdown(r)`` in a notebook, as ``pdlab.trace`` was before the
    layers: a fresh process, nothing imported but pdlab (lab 03 failed in the browser)."""
    code = (
        "import pdlab\n"
        "assert callable(pdlab.lab.dashboard.live) and callable(pdlab.measure.trace.breakdown)\n"
        "assert pdlab.training.models.build_model and pdlab.control.cluster.current\n"
        "assert not hasattr(pdlab.cost, 'nope') and not hasattr(pdlab, 'nope')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
