"""One config, one registry: ``TrainConfig`` drives ``train``, the CLI and the dashboard; a
strategy registered with one line shows up everywhere; private torch APIs stay in compat."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

import pdlab
from pdlab.lab.cli import main, parser
from pdlab.training import registry
from pdlab.training.config import TrainConfig
from pdlab.training.layout import Layout
from pdlab.training.loop import train, validate
from pdlab.training.parallel.single import Single

TINY = {"model": "article", "steps": 2, "batch_size": 8}

# ---- train(cluster, config, **overrides) ---------------------------------------------------


def test_keywords_override_the_config():
    assert pdlab.TrainConfig is TrainConfig
    config = TrainConfig(model="article", steps=5, batch_size=8, lr=0.5)
    result = train(config=config, steps=2, optimizer="sgd")
    assert (result.config.steps, result.config.optimizer) == (2, "sgd")
    assert (result.config.model, result.config.lr) == ("article", 0.5)  # kept from config
    assert result.steps.step.tolist() == [0, 1]
    assert config.steps == 5  # the caller's config is left as it was


def test_an_unknown_keyword_names_the_fields_and_the_closest():
    with pytest.raises(TypeError, match=r"unknown keyword 'stpes' \(did you mean 'steps'\?\)"):
        train(stpes=2)
    with pytest.raises(TypeError, match="the keywords are TrainConfig's fields, strategy, impl"):
        train(colour="blue")


def test_world_size_comes_from_the_cluster(cluster2):
    with pytest.raises(TypeError, match="world_size comes from the cluster"):
        train(cluster2, strategy="dp", world_size=4)
    result = train(cluster2, TrainConfig(strategy="dp", world_size=4, **TINY))
    assert result.config.world_size == 2 and set(result.ranks["rank"]) == {0, 1}
    assert train(cluster2, strategy="single", **TINY).config.world_size == 1


def test_a_config_given_first_or_of_another_type_is_refused():
    with pytest.raises(TypeError, match=r"the config comes second: train\(cluster, config\)"):
        train(TrainConfig())
    with pytest.raises(TypeError, match="config must be a pdlab.TrainConfig, got dict"):
        train(config={"steps": 2})


def test_the_signature_lists_every_field_with_its_default():
    params = inspect.signature(pdlab.train).parameters
    for f in fields(TrainConfig):
        if f.name == "world_size":
            assert f.name not in params  # the cluster's
            continue
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == f.default, f.name
    assert list(params)[:2] == ["cluster", "config"]
    assert {"full_state", "timeout"} <= set(params)
    assert "batch_size: int = 32" in str(inspect.signature(pdlab.train))


# ---- the CLI -------------------------------------------------------------------------------


def test_every_field_is_a_flag_with_the_configs_default(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--help"])
    shown = capsys.readouterr().out
    args = parser().parse_args(["run"])
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in shown, f.name
        if f.name != "world_size":  # a shell run starts a cluster: 2 ranks unless told
            assert getattr(args, f.name) == f.default, f.name
    assert args.world_size == 2
    assert "global batch, over all data-parallel ranks (default: 32)" in " ".join(shown.split())


def test_flags_take_the_fields_types_and_choices(capsys):
    args = parser().parse_args(["run", "--lr", "0.5", "--checkpoint-dir", "ckpt", "--resume"])
    assert (args.lr, args.checkpoint_dir, args.resume) == (0.5, "ckpt", True)
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--optimizer", "lion"])
    assert "invalid choice: 'lion'" in capsys.readouterr().err


def test_cli_checks_the_config_before_starting_ranks(capsys):
    assert main(["run", "--strategy", "dp", "--resume"]) == 2
    assert "resume need a checkpoint_dir" in capsys.readouterr().err


# ---- the registry --------------------------------------------------------------------------


class Toy(Single):
    """A strategy written in a test: one process, like ``single``."""


@pytest.fixture
def toy():
    strategy = registry.register(
        registry.Strategy(
            "toy",
            "a toy",
            __name__,
            {"scratch": "Toy"},
            layout=lambda n: Layout(),
            min_world_size=1,
        )
    )
    yield strategy
    registry.unregister("toy")


def test_one_registration_reaches_cli_validate_dashboard_and_train(toy, capsys):
    assert parser().parse_args(["run", "--strategy", "toy"]).strategy == "toy"
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--help"])
    assert "toy" in capsys.readouterr().out.split("--strategy")[1].split("}")[0]
    validate(TrainConfig(strategy="toy"))
    with pytest.raises(NotImplementedError, match="'toy' with impl 'torch' is not implemented"):
        validate(TrainConfig(strategy="toy", impl="torch"))
    dashboard = pdlab.Dashboard()
    assert ("a toy", "toy") in dashboard.controls["strategy"].options
    dashboard.controls["strategy"].value = "toy"
    assert dashboard.config().strategy == "toy"
    dashboard.close()
    ours, single = train(strategy="toy", **TINY), train(strategy="single", **TINY)
    assert ours.steps.loss.tolist() == single.steps.loss.tolist()


def test_unregistered_is_gone_everywhere(toy):
    registry.unregister("toy")
    with pytest.raises(ValueError, match="unknown strategy 'toy': choose one of single, dp"):
        validate(TrainConfig(strategy="toy"))
    assert "toy" not in pdlab.Dashboard().menu
    registry.register(toy)  # for the fixture to remove


def test_world_size_rules_and_refused_impls_name_the_fix():
    grid = registry.Strategy("grid", "g", __name__, {}, min_world_size=4, world_size_multiple=2)
    grid.check_world_size(6)
    with pytest.raises(
        ValueError, match=r"'grid' needs an even world_size >= 4, got 5: .*Cluster\(6\)"
    ):
        grid.check_world_size(5)
    triple = registry.Strategy("t", "t", __name__, {}, world_size_multiple=3)
    with pytest.raises(ValueError, match=r"a multiple of 3, >= 2, got 4: use pdlab.Cluster\(6\)"):
        triple.check_world_size(4)
    with pytest.raises(ValueError, match="no torch toy: use impl='scratch'"):
        registry.Strategy(
            "x", "x", __name__, {}, refused={"torch": "no torch toy: use impl='scratch'"}
        ).implementation("torch")


def test_a_name_registers_once(toy):
    with pytest.raises(ValueError, match="'toy' is registered already"):
        registry.register(toy)


def test_fsdp_is_a_menu_alias_not_a_strategy():
    assert registry.menu()["fsdp"] == registry.MenuEntry("FSDP (= ZeRO-3 torch)", "zero3", "torch")
    assert "fsdp" not in registry.names()
    assert list(registry.menu())[:3] == ["single", "dp", "ps"]


def test_the_registry_imports_no_strategy_module():
    heavy = [
        "torch.distributed.tensor",
        "torch.distributed.pipelining",
        "torch.distributed.fsdp",
        "pdlab.training.parallel.pipeline",
        "pdlab.training.parallel.tensor",
        "pdlab.training.parallel.hybrid",
    ]
    code = f"import sys, pdlab.training.registry; print([m for m in {heavy} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- private torch APIs live in pdlab/compat.py ---------------------------------------------

PRIVATE = {"_schema", "_world", "_initialize_stage", "_get_sequence_number_for_group"}
TORCH_NAMES = {"torch", "dist", "c10d"}


def private_torch_uses(source: str) -> list[str]:
    """Private torch names ``source`` touches: a private module imported, a private attribute
    reached from torch/dist/c10d, or one of the known private attributes on anything."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom | ast.Import):
            modules = (
                [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            )
            found += [m for m in modules if m and m.startswith("torch") and "._" in m]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if node.attr in PRIVATE or (isinstance(root, ast.Name) and root.id in TORCH_NAMES):
                found.append(ast.unparse(node))
    return found


def test_the_checker_finds_private_torch_uses():
    assert private_torch_uses("schedule._initialize_stage((), {})") == [
        "schedule._initialize_stage"
    ]
    assert private_torch_uses("from torch.utils._pytree import tree_flatten") == [
        "torch.utils._pytree"
    ]
    assert private_torch_uses("x = dist.distributed_c10d._resolve_process_group(n)")
    assert private_torch_uses("self._schedule.step()\nimport torch.distributed") == []


def test_only_compat_touches_private_torch_apis():
    package = Path(pdlab.__file__).parent
    uses = {
        str(path.relative_to(package)): found
        for path in package.rglob("*.py")
        if path.name != "compat.py" and (found := private_torch_uses(path.read_text()))
    }
    assert uses == {}
