"""binder/ builds the same lab as requirements.txt, with torch's CPU build (Binder has no GPU)."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"


def pins(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line (comments and pip options skipped)."""
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return dict(line.split("==") for line in lines if "==" in line)


def test_binder_pins_match_requirements():
    binder, lab = pins(BINDER / "requirements.txt"), pins(ROOT / "requirements.txt")
    assert binder["torch"] == lab["torch"] + "+cpu"
    assert {**binder, "torch": lab["torch"]} == lab


def test_binder_takes_torch_from_the_cpu_index():
    assert CPU_INDEX in (BINDER / "requirements.txt").read_text().splitlines()


def test_post_build_installs_pdlab():
    post_build = BINDER / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable"
    assert "pip install --no-deps -e ." in post_build.read_text()


def test_binder_python_is_one_pdlab_supports():
    wanted = re.search(r'requires-python = ">=(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    minimum = tuple(map(int, wanted.groups()))
    runtime = re.fullmatch(r"python-(\d+)\.(\d+)", (BINDER / "runtime.txt").read_text().strip())
    assert runtime and tuple(map(int, runtime.groups())) >= minimum
