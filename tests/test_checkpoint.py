"""Checkpoints: save under one sharding and resume under another; survive a killed rank."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import pdlab
from pdlab.training.checkpoint import DamagedCheckpoint
from pdlab.training.loop import train
from pdlab.training.parallel.base import TrainConfig
from tests.helpers import assert_float32_close

STEPS, EVERY = 20, 10


def losses_from(result, step: int):
    return result.steps.loss[result.steps.step >= step].values


def run_and_die_at(config, step: int):
    """``run_on_rank``, except that rank 1 is SIGKILLed as it reports ``step`` (an OOM kill)."""
    import os
    import signal

    from pdlab.control import runtime
    from pdlab.training.loop import run_on_rank

    report = runtime.log

    def report_or_die(**record):
        if record.get("step") == step and runtime.rank() == 1:  # not a "phase" record
            os.kill(os.getpid(), signal.SIGKILL)
        report(**record)

    runtime.log = report_or_die
    try:
        return run_on_rank(config)
    finally:
        runtime.log = report


@pytest.mark.parametrize(
    ("strategy", "impl"), [("tp", "torch"), ("zero3", "torch"), ("zero1", "torch")]
)
def test_dp_checkpoint_resumes_under_another_sharding(cluster2, tmp_path, strategy, impl):
    """DDP saves replicated tensors; DTensor TP and FSDP2 load just their shards of them, and
    ZeroRedundancyOptimizer's local optimizer the moments of its own partition."""
    uninterrupted = train(cluster2, strategy="dp", impl="torch", steps=STEPS)
    train(cluster2, strategy="dp", impl="torch", steps=EVERY, checkpoint_dir=str(tmp_path), checkpoint_every=EVERY)  # fmt: skip
    resumed = train(cluster2, strategy=strategy, impl=impl, steps=STEPS, checkpoint_dir=str(tmp_path), resume=True)  # fmt: skip
    assert resumed.steps.step.tolist() == list(range(EVERY, STEPS))
    # Model *and* Adam moments moved: the next ten losses are the uninterrupted run's.
    assert_float32_close(losses_from(resumed, EVERY), losses_from(uninterrupted, EVERY))


@pytest.mark.parametrize(("saved", "resumed_as"), [("tp-sp", "tp"), ("tp", "tp-sp")])
def test_a_checkpoint_resumes_under_other_optimizer_groups(cluster2, tmp_path, saved, resumed_as):
    """tp torch puts its DTensors and its plain tensors in two optimizer groups, tp-sp torch
    (whose norms are DTensors too) all in one: loading the saved groups left a group without
    Adam's "betas", and the resumed run's first step raised KeyError."""
    kw = {"impl": "torch", "model": "gpt", "checkpoint_dir": str(tmp_path)}
    uninterrupted = train(cluster2, strategy=saved, impl="torch", model="gpt", steps=4)
    train(cluster2, strategy=saved, steps=2, checkpoint_every=2, **kw)
    resumed = train(cluster2, strategy=resumed_as, steps=4, resume=True, **kw)
    assert resumed.steps.step.tolist() == [2, 3]
    assert_float32_close(losses_from(resumed, 2), losses_from(uninterrupted, 2))


def test_a_killed_rank_resumes_from_its_last_checkpoint(cluster2, tmp_path):
    kw = {"strategy": "zero3", "impl": "torch", "steps": STEPS, "checkpoint_dir": str(tmp_path)}
    uninterrupted = train(cluster2, strategy="zero3", impl="torch", steps=STEPS)
    config = TrainConfig(**kw, checkpoint_every=5, world_size=2)
    # Rank 0 fails too, in its next collective; which failure the cluster reports first races.
    with pytest.raises(pdlab.RankError):
        cluster2.run(run_and_die_at, config, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000005", "step_000010"]

    resumed = train(cluster2, **kw, checkpoint_every=5, resume=True)
    assert resumed.steps.step.tolist() == list(range(10, STEPS))
    # Nothing lost: the same losses, bit for bit, as if the rank had never died.
    assert losses_from(resumed, 10).tolist() == losses_from(uninterrupted, 10).tolist()


def test_plain_tensor_shards_are_refused_not_half_saved(cluster2, tmp_path):
    """ZeRO-3 from scratch keeps a different ``shard`` per rank under one name."""
    with pytest.raises(pdlab.RankError, match="DCP would save one rank's copy"):
        train(cluster2, strategy="zero3", steps=1, checkpoint_dir=str(tmp_path), checkpoint_every=1)
    assert list(tmp_path.iterdir()) == []


def test_plain_tensor_shards_are_refused_a_resume_naming_the_fix(cluster2, checkpoints):
    """tp from scratch resuming DP's checkpoint: DCP read a whole weight into its half, and
    the error said the checkpoint was saved by another model."""
    with pytest.raises(pdlab.RankError, match="these are shards.*torch impls\\) to resume"):
        train(cluster2, strategy="tp", steps=6, checkpoint_dir=str(checkpoints), resume=True)


# ---- damaged, incomplete and exhausted checkpoints ----------------------------------------

DP = {"strategy": "dp", "impl": "torch"}


@pytest.fixture(scope="module")
def saved(cluster2, tmp_path_factory):
    """Checkpoints after steps 2 and 4 of a DP run (copy before damaging them)."""
    directory = tmp_path_factory.mktemp("saved")
    train(cluster2, **DP, steps=4, checkpoint_dir=str(directory), checkpoint_every=2)
    return directory


@pytest.fixture
def checkpoints(saved, tmp_path):
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    return tmp_path


def flip_bytes_in_adam_state(path) -> str:
    """XOR four bytes in the middle of the largest ``exp_avg_sq`` tensor's data (the issue's
    damage: a small positive float becomes a negative one, and Adam's sqrt a NaN); the file."""
    from torch.distributed.checkpoint import FileSystemReader

    items = FileSystemReader(path).read_metadata().storage_data
    where = max((i for i in items.items() if "exp_avg_sq" in i[0].fqn), key=lambda i: i[1].length)
    info = where[1]
    with open(path / info.relative_path, "r+b") as f:
        f.seek(info.offset + info.length // 2)
        damaged = bytes(b ^ 0xFF for b in f.read(4))
        f.seek(-4, 1)
        f.write(damaged)
    return info.relative_path


def rank_pids(cluster) -> list[int]:
    return [r.pid for r in cluster.status().ranks]


def test_save_writes_a_manifest_of_every_ranks_files(checkpoints):
    for step in ("step_000002", "step_000004"):
        files = json.loads((checkpoints / step / "manifest.json").read_text())["files"]
        on_disk = {p.name for p in (checkpoints / step).glob("*.distcp")}
        assert set(files) == on_disk >= {"__0_0.distcp", "__1_0.distcp"}
        for name, saved in files.items():
            data = (checkpoints / step / name).read_bytes()
            assert saved == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_a_damaged_checkpoint_is_refused_on_every_rank_naming_the_file(cluster2, checkpoints):
    name = flip_bytes_in_adam_state(checkpoints / "step_000004")
    pids = rank_pids(cluster2)
    with pytest.raises(pdlab.RankError, match=f"step_000004 is damaged: {name} is not the file"):
        train(cluster2, **DP, steps=6, checkpoint_dir=str(checkpoints), resume=True)
    # Every rank raised at the same point: the cluster kept its ranks (one left waiting in a
    # collective would have made it stop them all).
    assert rank_pids(cluster2) == pids


def test_latest_valid_skips_a_damaged_checkpoint(cluster2, checkpoints, capfd):
    name = flip_bytes_in_adam_state(checkpoints / "step_000004")
    uninterrupted = train(cluster2, **DP, steps=6)
    capfd.readouterr()
    resumed = train(cluster2, **DP, steps=6, checkpoint_dir=str(checkpoints), resume="latest-valid")  # fmt: skip
    assert resumed.steps.step.tolist() == [2, 3, 4, 5]
    assert losses_from(resumed, 2).tolist() == losses_from(uninterrupted, 2).tolist()
    err = capfd.readouterr().err
    assert f"resuming from step 2; skipped step_000004 (damaged: {name}" in err


@pytest.mark.parametrize(("missing", "why"), [("manifest.json", "no manifest.json"), (".metadata", "no .metadata")])  # fmt: skip
def test_an_incomplete_checkpoint_is_skipped(cluster2, checkpoints, capfd, missing, why):
    """No manifest: saved before pdlab wrote them (unverifiable) or cut short; no .metadata:
    DCP's save did not finish. Either way the one before is used."""
    (checkpoints / "step_000004" / missing).unlink(missing_ok=True)  # older pdlab: none
    resumed = train(cluster2, **DP, steps=6, checkpoint_dir=str(checkpoints), resume=True)
    assert resumed.steps.step.tolist() == [2, 3, 4, 5]
    assert f"skipped step_000004 ({why}" in capfd.readouterr().err


def test_resuming_with_steps_not_past_the_checkpoint_says_what_to_use(cluster2, checkpoints):
    for steps in (2, 4):
        with pytest.raises(ValueError, match=f"at step 4; steps={steps} would train nothing: use steps > 4"):  # fmt: skip
            train(cluster2, **DP, steps=steps, checkpoint_dir=str(checkpoints), resume=True)
    # Which checkpoint latest-valid uses is known only once rank 0 has verified them.
    flip_bytes_in_adam_state(checkpoints / "step_000004")
    with pytest.raises(pdlab.RankError, match="at step 2; steps=2 would train nothing: use steps > 2"):  # fmt: skip
        train(cluster2, **DP, steps=2, checkpoint_dir=str(checkpoints), resume="latest-valid")


def test_resume_accepts_only_true_false_or_latest_valid(tmp_path):
    with pytest.raises(ValueError, match="resume must be True, False or 'latest-valid'"):
        train(strategy="single", steps=2, checkpoint_dir=str(tmp_path), resume="latest")


def test_one_process_saves_and_resumes_without_a_process_group(tmp_path):
    """``single`` with no cluster: DCP without collectives, and rank 0's choice made locally."""
    uninterrupted = train(strategy="single", steps=6)
    train(strategy="single", steps=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    flip_bytes_in_adam_state(tmp_path / "step_000004")
    with pytest.raises(DamagedCheckpoint, match="step_000004 is damaged"):
        train(strategy="single", steps=6, checkpoint_dir=str(tmp_path), resume=True)
    resumed = train(strategy="single", steps=6, checkpoint_dir=str(tmp_path), resume="latest-valid")  # fmt: skip
    assert losses_from(resumed, 2).tolist() == losses_from(uninterrupted, 2).tolist()
