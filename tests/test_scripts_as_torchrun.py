"""Scripts exactly as torchrun runs them (issue 20): each case runs under ``run_script`` and
under a real torchrun (or, for ``mp.spawn``, plain ``python``) and the outputs are compared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pdlab
from pdlab.control.launcher import free_loopback_port
from tests.helpers import rank_lines, torchrun_lines, torchrun_log, wait_for_warm_up

# A script run from a sibling folder (``cd caller; torchrun ../reload/probe.py data.txt``)
# that prints what a new process would see: its argv, working directory and sys.path, a file
# relative to the working directory, its helpers' values, torch's defaults, a subgroup's sum,
# then its environment; it raises a UserWarning every run.
PROBE = """\
import json, os, signal, sys, warnings
import torch, torch.distributed as dist
import helper_a, pkg.sub

dist.init_process_group("gloo")
here = os.path.dirname(os.path.abspath(__file__))
print("argv", sys.argv, "cwd", os.path.basename(os.getcwd()), "path0 is here", sys.path[0] == here)
print("read", open(sys.argv[1]).read().strip())
print("helpers", helper_a.VALUE, pkg.sub.VALUE)
print("defaults", torch.zeros(1).dtype, torch.is_grad_enabled(),
      torch.are_deterministic_algorithms_enabled(), torch.is_anomaly_enabled(),
      torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark, torch.tensor([1 / 3]),
      signal.getsignal(signal.SIGUSR1), os.environ.get("CHANGED"))
warnings.warn("probe warning")
sub = dist.new_group([0, 1])
total = torch.ones(1)
dist.all_reduce(total, group=sub)
print("subgroup sum", total.item())
print("threads", torch.get_num_threads())
print("env", json.dumps(dict(os.environ)))
dist.destroy_process_group()
"""
# What a script may change in its process; under torchrun the next run never sees it.
CHANGER = """\
import os, signal, sys, warnings, torch
torch.set_default_dtype(torch.float64)
torch.set_grad_enabled(False)
torch.use_deterministic_algorithms(True)
torch.set_anomaly_enabled(True)
torch.set_float32_matmul_precision("medium")
torch.set_printoptions(precision=8)
torch.set_num_threads(3)
torch.backends.cudnn.benchmark = True
sys.stdout = open(os.devnull, "w")
os.environ["CHANGED"] = "1"
os.environ["MASTER_PORT"] = "12355"
signal.signal(signal.SIGUSR1, lambda *_: None)
warnings.simplefilter("ignore")
sys.argv.append("more")
sys.path.insert(0, "/nowhere")
torch.distributed.new_group([0, 1])  # and never destroyed
"""
HELPERS = {  # as torchrun reads them; test_edited_helpers starts from other values
    "helper_a.py": "from helper_b import VALUE as B\nVALUE = 'a' + B\n",
    "helper_b.py": "VALUE = 'b-edited'\n",
    "pkg/__init__.py": "",
    "pkg/sub.py": "VALUE = 'sub-edited'\n",
}
# Only pdlab's ranks have these (README, "your own scripts"): gloo kept on loopback, and what
# torch sets when its compiler is imported (warm ranks did that ahead; a script importing it
# under torchrun gets it too). torchrun's that pdlab sets to values of its own: a run id, a
# port, an error file in its temp dir, threads per rank.
PDLAB_ONLY = {"GLOO_SOCKET_IFNAME", "TORCHINDUCTOR_CACHE_DIR"}
PDLAB_VALUES = {"MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE", "OMP_NUM_THREADS"}
# pytest's, set anew for each test phase: the ranks have it from when the cluster started.
PDLAB_VALUES.add("PYTEST_CURRENT_TEST")


def write(folder: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> tuple[Path, Path]:
    """The probe's folders (the caller's working directory, the script's folder) and the log
    folder of its run under torchrun."""
    root = tmp_path_factory.mktemp("probe")
    caller, folder = root / "caller", root / "reload"
    write(caller, {"data.txt": "caller's data\n"})
    write(folder, {"probe.py": PROBE, "changer.py": CHANGER, **HELPERS})
    torchrun_lines("../reload/probe.py", ["data.txt"], root / "logs", cwd=caller)
    return caller, root / "logs"


def run_probe(cluster, capfd) -> tuple[dict[int, list[str]], str]:
    """The probe's lines by rank under ``run_script`` (from the caller's folder), and stderr."""
    capfd.readouterr()
    cluster.run_script("../reload/probe.py", "data.txt")
    out, err = capfd.readouterr()
    return {rank: rank_lines(out, rank) for rank in (0, 1)}, err


def env_of(lines: list[str]) -> dict[str, str]:
    """The environment the probe printed."""
    [env] = [json.loads(line[4:]) for line in lines if line.startswith("env ")]
    return env


def compared(lines: list[str]) -> list[str]:
    """The lines that must be equal (threads and the environment are compared on their own)."""
    return [line for line in lines if not line.startswith(("threads ", "env "))]


def test_cwd_argv_and_helpers_are_torchruns(cluster2, probe, capfd, monkeypatch):
    caller, logs = probe
    monkeypatch.chdir(caller)
    ours, _ = run_probe(cluster2, capfd)
    for rank in (0, 1):
        assert compared(ours[rank]) == compared(torchrun_log(logs, rank))
    assert ours[1][:2] == [
        "argv ['../reload/probe.py', 'data.txt'] cwd caller path0 is here True",
        "read caller's data",
    ]


def test_edited_helpers_and_packages_are_read_afresh(cluster2, probe, capfd, monkeypatch):
    caller, logs = probe
    folder = caller.parent / "reload"
    monkeypatch.chdir(caller)
    write(folder, {"helper_b.py": "VALUE = 'b'\n", "pkg/sub.py": "VALUE = 'sub'\n"})
    assert "helpers ab sub" in run_probe(cluster2, capfd)[0][0]
    write(folder, HELPERS)  # helper_b and pkg.sub change; helper_a, which imports b, doesn't
    ours, _ = run_probe(cluster2, capfd)
    assert "helpers ab-edited sub-edited" in ours[0]
    assert compared(ours[0]) == compared(torchrun_log(logs, 0))


def test_nothing_a_script_changes_reaches_the_next_run(cluster2, probe, capfd, monkeypatch):
    caller, logs = probe
    monkeypatch.chdir(caller)
    wait_for_warm_up(cluster2)  # its imports change the environment too, not the script's
    before, _ = run_probe(cluster2, capfd)
    cluster2.run_script("../reload/changer.py")
    assert cluster2.run(lambda: len(pdlab.compat.process_groups())) == [1, 1]
    after, err = run_probe(cluster2, capfd)
    for rank in (0, 1):
        assert compared(after[rank]) == compared(torchrun_log(logs, rank))
        assert after[rank][:-1] == before[rank][:-1]  # threads too
        assert env_of(after[rank]) == env_of(before[rank])
        # A new process shows a warning every run: here too, though this one was shown before.
        assert any(
            f"[rank {rank}] " in line and "UserWarning: probe warning" in line
            for line in err.splitlines()
        )
        assert any(
            "UserWarning: probe warning" in line for line in torchrun_log(logs, rank, "stderr")
        )


def test_the_environment_is_torchruns_but_for_pdlabs_own_variables(
    cluster2, probe, capfd, monkeypatch
):
    caller, logs = probe
    monkeypatch.chdir(caller)
    ours, _ = run_probe(cluster2, capfd)
    for rank in (0, 1):
        mine, theirs = env_of(ours[rank]), env_of(torchrun_log(logs, rank))
        assert set(theirs) - set(mine) == set()
        assert set(mine) - set(theirs) <= PDLAB_ONLY
        differ = {k for k in set(mine) & set(theirs) if mine[k] != theirs[k]}
        assert differ <= PDLAB_VALUES, {k: (mine[k], theirs[k]) for k in differ - PDLAB_VALUES}
        assert "PYTHONPATH" not in mine or mine["PYTHONPATH"] == os.environ.get("PYTHONPATH")
        assert mine["TORCHELASTIC_RUN_ID"] != "pdlab"


def test_subgroups_a_script_makes_are_gone_after_50_runs(cluster2, probe, capfd, monkeypatch):
    caller, _ = probe
    monkeypatch.chdir(caller)

    def fds_and_threads() -> tuple[int, int]:
        return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))

    run_probe(cluster2, capfd)  # what the first run imports or starts once
    before = cluster2.run(fds_and_threads)
    for _ in range(50):
        cluster2.run_script("../reload/probe.py", "data.txt")
    capfd.readouterr()
    assert cluster2.run(fds_and_threads) == before
    assert cluster2.run(lambda: len(pdlab.compat.process_groups())) == [1, 1]  # the cluster's


# "Getting started with DDP": main() spawns world_size processes, each sets up the group on
# the port the tutorial fixes and tears it down.
SPAWNING = """\
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def demo(rank, world_size, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", port
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    total = torch.tensor([rank + 1.0])
    dist.all_reduce(total)
    print(f"rank {rank} of {dist.get_world_size()}: sum {total.item()}")
    dist.destroy_process_group()

if __name__ == "__main__":
    world_size, port = int(sys.argv[1]), sys.argv[2]
    mp.spawn(demo, args=(world_size, port), nprocs=world_size, join=True)
"""


def test_an_mp_spawn_script_runs_in_place_unchanged(cluster2, tmp_path, capfd, monkeypatch):
    (tmp_path / "spawning.py").write_text(SPAWNING)
    monkeypatch.chdir(tmp_path)
    args = ["2", str(free_loopback_port())]
    # Block-buffered: each child's lines reach the shared pipe in one write, none glued.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    alone = subprocess.run(
        [sys.executable, "spawning.py", *args], capture_output=True, text=True, timeout=120, env=env
    )
    assert alone.returncode == 0, alone.stderr
    ports = cluster2.run(lambda: os.environ["MASTER_PORT"])
    capfd.readouterr()
    cluster2.run_script("spawning.py", *args)
    out = capfd.readouterr().out
    ours = [line for rank in (0, 1) for line in rank_lines(out, rank)]
    assert sorted(ours) == sorted(alone.stdout.splitlines())
    assert ours == ["rank 0 of 2: sum 3.0", "rank 1 of 2: sum 3.0"]
    assert cluster2.run(lambda: os.environ["MASTER_PORT"]) == ports  # the script's put back
    with pytest.raises(pdlab.RankError, match=r"nprocs=3.*start pdlab.Cluster\(3\).*nprocs=2"):
        cluster2.run_script("spawning.py", "3", "12355")
    with pytest.raises(pdlab.RankError, match=r"nprocs=3.*start pdlab.Cluster\(3\)"):
        cluster2.run(lambda: torch.multiprocessing.start_processes(print, nprocs=3))
    assert "broken" not in str(cluster2.status())
