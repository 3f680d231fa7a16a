"""``TrainConfig``: one training run as plain values, the only place a run's defaults live.

Everything that starts a run reads it: ``pdlab.train(cluster, config, **overrides)`` takes its
fields as keywords (the signature lists them, with their defaults), ``python -m pdlab run``
makes a flag of each field (type, default, choices and help from here), and the dashboard
builds one from its controls.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from pdlab.training.data import BLOCK_SIZE

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16")  # pdlab.training.parallel.base.model_for, MasterWeights


def _strategies() -> tuple[str, ...]:
    from pdlab.training import registry  # the registry names the strategy classes it loads

    return registry.names()


def _impls() -> tuple[str, ...]:
    from pdlab.training import registry

    return registry.impls()


def _models() -> tuple[str, ...]:
    from pdlab.training.models import MODELS

    return MODELS


def _recompute() -> tuple[str, ...]:
    from pdlab.training.models import RECOMPUTE

    return RECOMPUTE


def _field(default: Any, help: str, choices: Callable[[], tuple[str, ...]] | None = None) -> Any:
    """A field with its help text and, where it has them, a callable giving its choices
    (called when asked: the strategies are whatever the registry holds by then)."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class TrainConfig:
    """One training run: what ``pdlab.train`` takes, and the ``python -m pdlab run`` flags."""

    strategy: str = _field("single", "how the ranks share the work", _strategies)
    impl: str = _field("scratch", "scratch: raw collectives; torch: PyTorch's API", _impls)
    model: str = _field("mlp", "the model and its data set", _models)
    steps: int = _field(20, "optimizer steps")
    batch_size: int = _field(32, "global batch, over all data-parallel ranks")
    seq_len: int = _field(
        BLOCK_SIZE,
        "tokens in a gpt or moe sample (its context, the text's window); other models have none",
    )
    micro_batches: int = _field(1, "pipelines split each rank's batch into these")
    virtual_stages: int | None = _field(
        None,
        "model chunks a pipeline rank holds (Megatron's v); None: what the schedule needs, "
        "2 for pp-interleaved (which takes 2 or more) and pp-zbv, 1 for the rest",
    )
    lr: float = _field(0.01, "learning rate")
    optimizer: str = _field(
        "adam", "optimizer (plain: no momentum, no weight decay)", lambda: OPTIMIZERS
    )
    recompute: str = _field(
        "none",
        "activation recomputation on the gpt's blocks: none, selective (attention's core) "
        "or full (all but each block's input)",
        _recompute,
    )
    precision: str = _field(
        "fp32",
        "bf16: parameters, activations and gradients (so the bytes communicated) in bfloat16, "
        "fp32 master weights and Adam state in the optimizer (ZeRO's mixed precision)",
        lambda: PRECISIONS,
    )
    vocab_parallel: bool = _field(
        False,
        "tp, tp-sp on the gpt: split the embedding and the head by vocabulary and compute the "
        "loss without gathering the logits (Megatron's vocab-parallel cross-entropy)",
    )
    seed: int = _field(0, "seed of the model's weights and the data")
    world_size: int = _field(1, "ranks (single uses 1)")
    checkpoint_dir: str | None = _field(None, "where checkpoints are saved and resumed (all ranks)")
    checkpoint_every: int = _field(0, "save after every this many steps (0: never)")
    resume: bool | str = _field(
        False,
        "start from the newest complete checkpoint in checkpoint_dir (refused if it is "
        "damaged); 'latest-valid': from the newest complete and undamaged one",
    )
    link: str | None = _field(
        None,
        "emulate this link on the ranks: a preset (nvlink4, eth25, ...) or a rate with an "
        "optional latency ('100Mbit/s', '25Gbit/s@5us'); ':shared' for one medium all ranks "
        "share (pdlab.cost.emulation)",
    )

    @property
    def label(self) -> str:
        """A short name for the run: ``dp/scratch gpt w2``; on an emulated link
        ``dp/scratch gpt w2 @100Mbit/s``."""
        link = f" @{self.link}" if self.link else ""
        return f"{self.strategy}/{self.impl} {self.model} w{self.world_size}{link}"


def choices(f: Field) -> tuple[str, ...] | None:
    """The values field ``f`` may take, or None when any value of its type will do."""
    given = f.metadata.get("choices")
    return None if given is None else given()


def field_types() -> dict[str, type]:
    """Each field's type, resolved (``str | None`` for ``checkpoint_dir``)."""
    return typing.get_type_hints(TrainConfig)


def keywords(leave_out: Mapping[str, str] | None = None) -> list[inspect.Parameter]:
    """The fields (but those in ``leave_out``) as keyword-only parameters with their defaults,
    for a function's ``__signature__``: ``help()`` and Jupyter's tooltip show them."""
    hints, leave_out = field_types(), leave_out or {}
    return [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in fields(TrainConfig)
        if f.name not in leave_out
    ]


def with_overrides(
    config: TrainConfig, overrides: Mapping[str, Any], leave_out: Mapping[str, str] | None = None
) -> TrainConfig:
    """``config`` with the fields in ``overrides`` replaced.

    An unknown name raises TypeError listing the fields (and the closest one); a name in
    ``leave_out`` raises TypeError with its reason there (``world_size`` comes from a cluster).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a pdlab.TrainConfig, got {type(config).__name__}")
    leave_out = leave_out or {}
    names = [f.name for f in fields(TrainConfig) if f.name not in leave_out]
    for key in overrides:
        if key in leave_out:
            raise TypeError(f"{key} {leave_out[key]}")
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TypeError(
                f"unknown keyword {key!r}{hint}: the keywords are TrainConfig's fields, "
                f"{', '.join(names)}"
            )
    return replace(config, **overrides)
