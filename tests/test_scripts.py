"""Bring your own code (issue 11): torchrun scripts, notebook modules and tutorials, unchanged."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import pdlab
from tests.helpers import rank_lines, torchrun_lines

SCRIPT = Path(__file__).resolve().parent.parent / "labs" / "scripts" / "ddp_toy"


@pytest.fixture
def script_dir(tmp_path, monkeypatch) -> Path:
    """A private copy of the toy DDP script and its model (the tests edit them), the working
    directory, as its tutorial runs it (``torchrun ... train.py``)."""
    folder = Path(shutil.copytree(SCRIPT, tmp_path / "ddp_toy"))
    monkeypatch.chdir(folder)
    return folder


def test_a_torchrun_script_runs_unchanged_and_prints_what_torchrun_prints(
    cluster2, script_dir, tmp_path, capfd
):
    pids = cluster2.run(os.getpid)
    capfd.readouterr()
    cluster2.run_script("train.py", "3", "--batch-size", "20")
    ours = capfd.readouterr().out
    snapshot = torch.load(script_dir / "snapshot.pt")
    (script_dir / "snapshot.pt").unlink()
    logs = tmp_path / "logs"
    theirs = torchrun_lines(script_dir / "train.py", ["3", "--batch-size", "20"], logs)
    for rank in (0, 1):
        assert rank_lines(ours, rank) == theirs[rank]
    assert "epoch 2 loss" in rank_lines(ours, 1)[-1]
    # The file lands in the working directory, and holds what torchrun's run saved.
    torch.testing.assert_close(torch.load(script_dir / "snapshot.pt"), snapshot)
    # destroy_process_group left the cluster's group: same ranks, still in one group.
    assert cluster2.run(os.getpid) == pids
    assert cluster2.run(lambda: torch.distributed.get_world_size()) == [2, 2]
    assert "broken" not in str(cluster2.status())


def test_an_edited_module_beside_the_script_is_read_again(cluster2, script_dir, capfd):
    cluster2.run_script(script_dir / "train.py", "1")
    assert "hidden 10" in rank_lines(capfd.readouterr().out, 0)[0]
    model = script_dir / "model.py"
    model.write_text(model.read_text().replace("HIDDEN = 10", "HIDDEN = 12"))
    cluster2.run_script(script_dir / "train.py", "1")
    assert "hidden 12" in rank_lines(capfd.readouterr().out, 0)[0]


def test_a_script_exit_code_names_the_rank_and_argparse_errors_show(cluster2, script_dir):
    pids = cluster2.run(os.getpid)
    with pytest.raises(pdlab.RankError) as info:
        cluster2.run_script(script_dir / "train.py", "1", "--exit-code", "3")
    assert info.value.rank == 1 and "exited with code 3" in str(info.value)
    with pytest.raises(pdlab.RankError, match="exited with code 2"):
        cluster2.run_script(script_dir / "train.py")  # the required epochs missing
    assert cluster2.run(os.getpid) == pids


def test_an_incompatible_backend_request_says_what_to_change(cluster2):
    with pytest.raises(pdlab.RankError, match="uses 'gloo'.*Ask for 'gloo'"):
        cluster2.run(lambda: torch.distributed.init_process_group("nccl"))
    assert cluster2.run(lambda: torch.distributed.init_process_group("gloo")) == [None, None]


def test_torchrun_variables_are_set_from_the_start(cluster2):
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    got = cluster2.run(lambda: {k: os.environ.get(k) for k in names})
    for rank, env in enumerate(got):
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"
        assert env["MASTER_ADDR"] == "localhost"


def test_a_pasted_script_runs_its_main_block(cluster2, capfd):
    source = (SCRIPT / "model.py").read_text() + (
        "\nif __name__ == '__main__':\n    print('main block ran', ToyModel().net1.out_features)\n"
    )
    cluster2.exec(source)
    assert "[rank 1] main block ran 10" in capfd.readouterr().out


def test_destroying_the_group_is_noticed_and_the_next_call_restarts(cluster2):
    def destroy_and_init_again() -> int:
        torch.distributed.destroy_process_group()
        # torchrun's TORCHELASTIC_USE_AGENT_STORE is set, but no agent hosts a store here
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=20))
        return torch.distributed.get_world_size()

    pids = cluster2.run(os.getpid)
    assert cluster2.run(destroy_and_init_again, timeout=60) == [2, 2]
    assert "replaced" in str(cluster2.status())
    pids = cluster2.run(os.getpid)
    cluster2.run(torch.distributed.destroy_process_group)
    assert "destroyed" in str(cluster2.status())
    assert cluster2.run(lambda: torch.distributed.get_world_size()) == [2, 2]
    assert not set(cluster2.run(os.getpid)) & set(pids)


def test_modules_beside_the_notebook_and_relative_paths_work_on_the_ranks(
    cluster2, tmp_path, monkeypatch
):
    (tmp_path / "mymodel.py").write_text("def width():\n    return 7\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    def use_it():
        import mymodel

        Path(f"out{pdlab.rank()}.txt").write_text("here")
        return mymodel.width()

    assert cluster2.run(use_it) == [7, 7]
    assert (tmp_path / "out0.txt").exists() and (tmp_path / "out1.txt").exists()


def test_a_module_the_ranks_cannot_import_is_named_with_the_kernels_copy(cluster2, tmp_path):
    (tmp_path / "onlyhere.py").write_text("VALUE = 3\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import onlyhere
    finally:
        sys.path.remove(str(tmp_path))  # the kernel keeps the module, the ranks can't find it
    try:
        with pytest.raises(pdlab.RankError) as info:
            cluster2.run(lambda: onlyhere.VALUE)
    finally:
        del sys.modules["onlyhere"]
    assert "No module named 'onlyhere'" in str(info.value)
    assert f"The kernel imports 'onlyhere' from {tmp_path / 'onlyhere.py'}" in str(info.value)


def test_spawn_calls_fn_with_the_rank(cluster2):
    assert cluster2.spawn(lambda rank, scale: rank * scale, 10) == [0, 10]


def test_a_spawned_tutorial_function_sets_up_and_tears_down_as_written(cluster2):
    # "Getting started with DDP": setup() inits the group, cleanup() destroys it.
    def demo_basic(rank, world_size):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", "12355"
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(10, 5))
        model(torch.randn(20, 10)).sum().backward()
        torch.distributed.destroy_process_group()
        return rank

    pids, ports = cluster2.run(os.getpid), cluster2.run(os.environ.get, "MASTER_PORT")
    assert cluster2.spawn(demo_basic, 2) == [0, 1]
    assert "broken" not in str(cluster2.status())
    assert cluster2.run(os.getpid) == pids
    assert cluster2.run(os.environ.get, "MASTER_PORT") == ports != ["12355"] * 2  # put back


def test_ranks_cell_timeout_and_the_cells_own_line_numbers(cluster2):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "pdlab")
    with pytest.raises(pdlab.CallTimeout):  # a collective on a subset of ranks: it would hang
        ip.run_cell_magic("ranks", "0 --timeout 2", "dist.all_reduce(torch.ones(1))")
    with pytest.raises(pdlab.RankError) as info:
        ip.run_cell_magic("ranks", "", "x = 1\ny = 2\nraise ValueError('on line 4')")
    # The cell as the notebook shows it: %%ranks is line 1, the raise is line 4.
    assert "line 4" in info.value.remote_traceback
    assert "raise ValueError('on line 4')" in info.value.remote_traceback


def test_lines_are_shown_in_the_order_the_ranks_printed_them(capsys):
    from pdlab.control.output import RankOutput

    out = RankOutput()
    t = time.time()
    out.write(1, "stdout", "second\n", t + 0.010)  # arrives first, printed later
    out.write(0, "stdout", "first\nthi", t + 0.005)
    out.write(0, "stdout", "rd\n", t + 0.020)
    out.flush()
    assert capsys.readouterr().out.splitlines() == [
        "[rank 0] first",
        "[rank 1] second",
        "[rank 0] third",
    ]


RAISES_MID_RUN = """\
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

dist.init_process_group("gloo")
model = DDP(torch.nn.Linear(4, 4))
for step in range(4):
    model(torch.randn(2, 4)).sum().backward()  # DDP's reducer all-reduces from C++
    if step == 2 and dist.get_rank() == 1:
        raise ValueError("mid-run")
"""


def test_the_error_counts_the_ops_a_script_issued_from_its_start(cluster2, tmp_path):
    def three_all_reduces() -> int:
        for _ in range(3):
            torch.distributed.all_reduce(torch.ones(1))
        return pdlab.compat.sequence_number(torch.distributed.group.WORLD)

    last = cluster2.run(three_all_reduces)[1]  # the last op recorded before the script
    (tmp_path / "raises.py").write_text(RAISES_MID_RUN)
    with pytest.raises(pdlab.RankError) as info:
        cluster2.run_script(tmp_path / "raises.py")
    said = re.search(
        r"rank 1 raised ValueError after op #(\d+) \((\d+) in this call\)", str(info.value)
    )
    assert said, str(info.value)
    # Not the cell's all_reduce from before: three backward steps all-reduced gradients.
    assert f"all_reduce #{last}" not in str(info.value)
    assert int(said[1]) == last + int(said[2]) and int(said[2]) >= 3
