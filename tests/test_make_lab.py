"""The README's first command, run the way a user runs it: ``make lab`` serves the labs.

As whoever runs the tests — root in containers and CI, where JupyterLab refuses to start
without ``--allow-root`` — the server is found through its runtime file, asked for
``00_start_here.ipynb`` over its REST API, and stopped with everything it started. For a
normal user, the same Makefile must not pass ``--allow-root``: checked by ``make -n lab`` as
an unprivileged user (a full run as that user needs a Python it may execute, and on the lab
machines the interpreter lives under /root).
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import descendants

ROOT = Path(__file__).resolve().parent.parent
UNPRIVILEGED = "nobody"


def served(runtime: Path, server: subprocess.Popen, log: Path) -> dict:
    """JupyterLab's runtime record (url, token) once it answers, within a minute."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert server.poll() is None, f"make lab exited {server.returncode}:\n{log.read_text()}"
        for info_file in runtime.glob("jpserver-*.json"):
            info = json.loads(info_file.read_text())
            try:
                urllib.request.urlopen(f"{info['url']}api/status?token={info['token']}", timeout=2)
                return info
            except OSError:
                pass
        time.sleep(0.3)
    raise AssertionError(f"JupyterLab did not serve within 90 s:\n{log.read_text()}")


def test_make_lab_serves_the_labs_and_stops_cleanly(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISPLAY", "WAYLAND_DISPLAY", "JUPYTER_TOKEN")
    }
    env.update(
        HOME=str(home),
        JUPYTER_CONFIG_DIR=str(home / ".jupyter"),
        JUPYTER_DATA_DIR=str(home / ".local/share/jupyter"),
        JUPYTER_RUNTIME_DIR=str(home / "runtime"),
        IPYTHONDIR=str(home / ".ipython"),
    )
    command = ["make", "lab"]
    log = tmp_path / "make-lab.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    started: list[int] = []
    try:
        info = served(home / "runtime", server, log)
        started = descendants(server.pid)
        base, token = info["url"], info["token"]
        with urllib.request.urlopen(f"{base}api/contents?token={token}", timeout=10) as r:
            listing = {item["name"] for item in json.load(r)["content"]}
        with urllib.request.urlopen(
            f"{base}api/contents/00_start_here.ipynb?content=0&token={token}", timeout=10
        ) as r:
            notebook = json.load(r)
        cmdlines = [command_line(pid) for pid in started]
        jupyter = next(c for c in cmdlines if b"jupyter" in c and b"lab" in c)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    assert "00_start_here.ipynb" in listing and "05_strategy_explorer.ipynb" in listing
    assert notebook["type"] == "notebook"
    assert (b"--allow-root" in jupyter) == (os.geteuid() == 0)
    assert b"--no-browser" in jupyter  # no display here
    deadline = time.monotonic() + 20
    while (left := [p for p in started if Path(f"/proc/{p}").exists()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not left, f"make lab left processes behind: {left}"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run make as another user")
def test_make_lab_as_a_normal_user_does_not_allow_root(tmp_path):
    user = pwd.getpwnam(UNPRIVILEGED)
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()  # newer than the files it depends on
    for path in [tmp_path, *tmp_path.rglob("*")]:
        os.chown(path, user.pw_uid, user.pw_gid)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    dry_run = subprocess.run(
        ["runuser", "-u", UNPRIVILEGED, "--", "make", "-n", "lab"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    [command] = [line for line in dry_run.stdout.splitlines() if "jupyter lab" in line]
    assert "--allow-root" not in command and "--no-browser" in command, command


def command_line(pid: int) -> bytes:
    """``pid``'s command line; empty for a process gone since it was listed (make's shells)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return b""
