"""Bad values refused at the API's edge, with an error that names the fix (issue 21, items
4-10): each test here failed on the code before, with a raw error, a hang, a silent
misreading or a broken cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import pdlab
from pdlab import checks
from pdlab.cost import emulation
from pdlab.lab import magics
from pdlab.training.loop import train

from .conftest import worker_pids

BAD_TIMEOUTS = [float("inf"), float("nan"), -1, 0, "5", True, 1e12]


def test_one_timeout_checker_names_what_to_pass():
    assert checks.timeout(2) == 2.0 and checks.timeout(None) is None
    for bad in BAD_TIMEOUTS:
        with pytest.raises(ValueError, match=r"timeout must be a finite number of seconds > 0"):
            checks.timeout(bad)
    with pytest.raises(ValueError, match="None for no limit"):
        checks.timeout(-1)


@pytest.mark.parametrize("bad", [*BAD_TIMEOUTS, None])
def test_a_cluster_timeout_is_refused_before_any_rank_starts(bad):
    # Before: inf started ranks that died with OverflowError; nan was ignored; "5" a TypeError.
    before = worker_pids(os.getpid())
    with pytest.raises(ValueError, match="timeout must be a finite number of seconds"):
        pdlab.Cluster(2, timeout=bad)
    assert worker_pids(os.getpid()) == before


@pytest.mark.parametrize("bad", BAD_TIMEOUTS)
def test_a_call_timeout_is_refused_and_the_cluster_kept(cluster2, bad):
    # Before: run(timeout=-1) and 0 timed out at once and stopped the ranks; train's restarted
    # the cluster.
    cluster2.run(pdlab.rank)  # restarted, if an earlier test left it broken
    pids = [r.pid for r in cluster2.status().ranks]
    for call in (
        lambda: cluster2.run(pdlab.rank, timeout=bad),
        lambda: cluster2.exec("1", timeout=bad),
        lambda: train(cluster2, model="mlp", steps=1, timeout=bad),
    ):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            call()
    assert cluster2.run(pdlab.rank) == [0, 1]
    assert [r.pid for r in cluster2.status().ranks] == pids  # not restarted


@pytest.mark.parametrize("word", ["-1", "0", "inf", "nan", "soon"])
def test_the_magics_take_the_same_timeouts(word):
    # Before: %%ranks --timeout 0 meant none (run(timeout=0): at once); -1 and -5 were taken.
    with pytest.raises(ValueError, match="--timeout"):
        magics.parse_cell_line(f"0 --timeout {word}")
    with pytest.raises(ValueError, match="%pdlab timeout"):
        magics.PdlabMagics(shell=None)._set_timeout([word])
    assert magics.parse_cell_line("--timeout off", timeout=5.0)[1] is None
    assert magics.parse_cell_line("1", timeout=5.0) == ([1], 5.0, False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "100Mbit/s@1e999s",
            r"latency of link .* must be a finite number of seconds >= 0 .*got inf",
        ),
        (
            "100Mbit/s@-5us",
            r"latency of link .* must be a finite number of seconds >= 0 .*got -5e-06$",
        ),
        ("100Mbit/s@1e9s", r"latency of link .* must be .* <= 31,536,000, got 1e\+09$"),
        ("1e999Gbit/s", r"bandwidth of link .* must be a finite number of bytes/s > 0, got inf$"),
    ],
)
def test_links_with_infinite_or_negative_values_are_refused(spec, message):
    # Before: @1e999s hung the ranks (OverflowError: timestamp out of range on rank 0),
    # @-5us said the latency "needs a unit".
    with pytest.raises(ValueError, match=message):
        emulation.parse(spec)
    from pdlab.training.config import TrainConfig
    from pdlab.training.loop import validate

    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(strategy="dp", world_size=2, link=spec))


def test_predictions_refuse_infinite_inputs():
    # Before: rows of inf and NaN.
    from pdlab.cost.planner import plan
    from pdlab.cost.predictor import Assumptions, predict

    with pytest.raises(ValueError, match="a parameter count must be a finite number > 0"):
        plan(float("inf"), world_size=8)
    with pytest.raises(ValueError, match="op_overhead must be a finite number"):
        Assumptions(op_overhead=float("inf"))
    with pytest.raises(TypeError, match=r"predict takes a run's result, e\.g\. predict\(pdlab"):
        predict("x")


def test_the_planner_refuses_absurd_world_sizes_at_once():
    # Before: --world-size 1000000000 grew to 23 GB until the OOM killer ended it.
    from pdlab.cost.planner import MAX_WORLD, plan

    start = time.monotonic()
    with pytest.raises(ValueError, match=r"world_size must be a whole number >= 1 and <= "):
        plan("llama3-8b", world_size=10**9)
    with pytest.raises(ValueError, match=r"GPU count must be a whole number >= 1 and <= "):
        plan("llama3-8b", "131073x8 nvlink4 ib-ndr400")
    assert time.monotonic() - start < 1
    assert MAX_WORLD >= 200_000  # the largest clusters built can still be planned


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pdlab", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


def test_plan_on_this_machine_refuses_world_size_0():
    # Before: it measured a 2-rank cluster, silently.
    from pdlab.lab.cli import main

    before = worker_pids(os.getpid())
    assert (
        main(["plan", "--model", "gpt2-small", "--topology", "this-machine", "--world-size", "0"])
        == 2
    )
    assert worker_pids(os.getpid()) == before


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--trace", "/nonexistent/dir/run.json"], "there is no folder /nonexistent/dir"),
        (["--trace", "/tmp"], "--trace /tmp is a folder"),
        (["--checkpoint-dir", "/proc/1/nope", "--checkpoint-every", "1"], "can't be made a folder"),
        (["--world-size", "100000", "--batch-size", "100000"], "100000 ranks would need"),
    ],
)
def test_the_cli_checks_paths_and_sizes_before_training(flags, message, capsys):
    # Before: the whole run trained, then a traceback and no JSON (the memory check raised
    # outside the CLI's error handling).
    from pdlab.lab.cli import main

    before = worker_pids(os.getpid())
    assert main(["run", "--strategy", "dp", "--model", "mlp", "--steps", "1", *flags]) == 2
    assert message in capsys.readouterr().err
    assert worker_pids(os.getpid()) == before


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    from pdlab.training.config import TrainConfig
    from pdlab.training.loop import validate

    (tmp_path / "file").write_text("")
    for every in (0, 1):
        with pytest.raises(ValueError, match="checkpoint_dir .*file"):
            validate(TrainConfig(checkpoint_dir=str(tmp_path / "file"), checkpoint_every=every))
    with pytest.raises(ValueError, match="checkpoint_dir must be a folder's path, got 123"):
        validate(TrainConfig(checkpoint_dir=123))


def test_the_cli_prints_the_steps_and_an_error_line_when_the_end_fails(tmp_path):
    # Before: a failure after training lost the results in a traceback. The trace's folder
    # passes the check, then is made read-only, as a disk filling up would.
    trace = tmp_path / "out" / "run.json"
    trace.parent.mkdir()
    script = tmp_path / "cli.py"
    script.write_text(
        "import os, sys\n"
        "from pdlab.training import loop as training\n"
        "from pdlab.lab.cli import main\n"
        "def refuse(self, path):\n"
        "    raise OSError(28, 'No space left on device')\n"
        "training.TrainResult.trace = refuse\n"
        f"sys.exit(main(['run', '--strategy', 'single', '--model', 'mlp', '--steps', '2', "
        f"'--json', '--trace', {str(trace)!r}]))\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert [json.loads(line)["step"] for line in lines[:2]] == [0, 1]
    assert "summary" in json.loads(lines[2])
    assert out.stderr.strip().splitlines()[-1].startswith("error: the trace could not be written")


# ---- checkpoints --------------------------------------------------------------------------


def fake_checkpoint(directory, step: int, manifest: object) -> None:
    path = directory / f"step_{step:06d}"
    path.mkdir(parents=True)
    (path / ".metadata").write_bytes(b"")
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("manifest", [{"files": [1, 2]}, {"files": {"a": 1}}, [1]])
def test_a_manifest_of_the_wrong_shape_is_damage_not_a_crash(tmp_path, manifest, capfd):
    # Before: AttributeError/TypeError, even with resume="latest-valid".
    from pdlab.training.checkpoint import DamagedCheckpoint

    fake_checkpoint(tmp_path, 1, manifest)
    run = {"strategy": "single", "model": "mlp", "steps": 2, "checkpoint_dir": str(tmp_path)}
    with pytest.raises(DamagedCheckpoint, match=r"manifest\.json is unreadable.*latest-valid"):
        train(**run, resume=True)
    result = train(**run, resume="latest-valid")
    assert list(result.steps.step) == [0, 1]
    assert "starting from step 0; skipped step_000001 (damaged" in capfd.readouterr().err


def test_another_models_checkpoint_is_named_in_one_line(tmp_path):
    # Before: DCP's 3.9k-character traceback ending in "Missing key in checkpoint state_dict".
    run = {"strategy": "single", "checkpoint_dir": str(tmp_path)}
    train(**run, model="mlp", steps=1, checkpoint_every=1)
    with pytest.raises(ValueError, match="does not fit this model") as refused:
        train(**run, model="gpt", steps=2, resume=True)
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and len(message) < 400, message
    assert "another checkpoint_dir" in message


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a checkpoint does not fit (root only)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)])
    if made.returncode != 0:
        pytest.skip("can't mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_named_in_one_line(tiny_disk):
    # Before: "No space left on device" mid-traceback, or only "unexpected pos 704 vs 598".
    with pytest.raises(OSError, match=r"the disk holding .* is full .*Free some space") as full:
        train(
            strategy="single",
            model="mlp",
            steps=1,
            checkpoint_every=1,
            checkpoint_dir=str(tiny_disk),
        )
    assert len(str(full.value).splitlines()) == 1


# ---- metrics, ranks, messages --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a", -1, 0, 1.5])
def test_keep_metrics_is_checked_before_any_rank_starts(bad):
    # Before: "a" was taken, then the first pdlab.log reported both ranks dead; -1 kept
    # nothing and 0 everything.
    before = worker_pids(os.getpid())
    with pytest.raises(ValueError, match="keep_metrics must be a whole number >= 1"):
        pdlab.Cluster(2, keep_metrics=bad)
    assert worker_pids(os.getpid()) == before


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_failing_subscriber_is_reported_and_the_channel_lives(cluster2, capfd, error):
    # Before: a callback raising KeyboardInterrupt closed both ranks' connections.
    def broken(record):
        raise error("plot broke")

    unsubscribe = cluster2.subscribe(broken)
    try:
        cluster2.run(lambda: pdlab.log(x=1))
        assert cluster2.run(pdlab.rank) == [0, 1]
    finally:
        unsubscribe()
    assert f"metrics subscriber {broken!r} failed: {error.__name__}: plot broke" in (
        capfd.readouterr().err
    )
    assert all(r.alive for r in cluster2.status().ranks)


@pytest.mark.parametrize(
    ("spec", "message"),
    [("1-", "can't read ranks '1-'"), ("1-0", "ranks '1-0' name none"), ("a", "can't read")],
)
def test_rank_specs_that_name_nothing_are_refused(spec, message):
    # Before: "1-" ran on rank 1 only, "1-0" on none, saying nothing.
    with pytest.raises(ValueError, match=message):
        magics.parse_ranks(spec)
    assert magics.parse_ranks(" 0 - 2 ,3") == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("ranks", "message"), [([], "ranks is empty"), (5, "ranks must be a list of rank numbers")]
)
def test_run_refuses_empty_or_single_rank_numbers(cluster2, ranks, message):
    with pytest.raises(ValueError, match=message):
        cluster2.run(pdlab.rank, ranks=ranks)


def test_ranks_runs_on_the_older_cluster_once_the_newer_is_shut_down(cluster2):
    # Before: "no pdlab cluster is running" while the older ran.
    from pdlab.control.cluster import current

    cluster2.run(pdlab.rank)  # started (or restarted) before the newer one
    newer = pdlab.Cluster(1)
    assert current() is newer
    newer.shutdown()
    assert current().state == "running"


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda c: c.exec(123), TypeError, "exec runs Python source given as a string"),
        (
            lambda c: pdlab.Cluster(1, port="abc"),
            ValueError,
            r"port must be a whole number >= 0 and <= 65,535, got 'abc'",
        ),
        (
            lambda c: c.run_script(os.path.realpath(sys.executable)),
            ValueError,
            "is not a Python script",
        ),
        (
            lambda c: train(c, model="mlp", steps=1, checkpoint_dir=123),
            ValueError,
            "checkpoint_dir must be a folder's path",
        ),
        (lambda c: c.subscribe("plot"), TypeError, "subscribe takes a function"),
    ],
)
def test_raw_errors_now_name_the_fix(cluster2, make, error, message):
    with pytest.raises(error, match=message):
        make(cluster2)


def test_the_other_failures_end_in_their_last_words(cluster2):
    # Before: "The other failures of this call:\n  rank 0: " when a traceback ended blank.
    def both_fail():
        raise ValueError(f"rank {pdlab.rank()} failed\n")

    with pytest.raises(pdlab.RankError) as failed:
        cluster2.run(both_fail)
    assert "The other failures of this call:\n  rank " in str(failed.value)
    other = str(failed.value).split("The other failures of this call:\n  ")[1].splitlines()[0]
    assert other.endswith("ValueError: rank " + other[5] + " failed"), other
