"""Every strategy, registered with one line: the CLI's choices, ``loop.validate``, the
rank grid of each strategy and the dashboard's menu are all read from here.

A registration names its classes instead of importing them (``module`` plus a class name
per impl): ``import pdlab.training.registry`` loads no strategy module, so neither
torch.distributed.pipelining nor FSDP nor DTensor's parallel styles; a class is imported
the first time a run uses it. Adding a strategy is writing its file (a class per impl, see
README.md beside this file) and one ``register(Strategy(...))`` line at the bottom.

Every process that trains reads this file, ranks included: a strategy registered from a
notebook exists in that kernel only (its menus and checks), not on the ranks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pdlab.control import warmup
from pdlab.training.layout import Layout


def data_parallel(world_size: int) -> Layout:
    """Every rank a data-parallel replica: the grid of dp, ps and the ZeRO family."""
    return Layout(dp=world_size)


@dataclass(frozen=True)
class Strategy:
    """A strategy as the registry knows it: its name, where its classes live, its grid."""

    name: str  # the value of ``strategy=`` and ``--strategy``
    label: str  # its entry in the dashboard's menu
    module: str  # the module holding its classes, imported on first use
    impls: dict[str, str]  # impl -> the class in ``module`` built on every rank
    layout: Callable[[int], Layout] = data_parallel  # its rank grid on ``world_size`` ranks
    min_world_size: int = 2
    world_size_multiple: int = 1  # world_size must be a multiple of this
    micro_batched: bool = False  # splits each rank's batch into ``micro_batches`` (pipelines)
    # Model chunks a rank holds (``virtual_stages``): the least, which is also the default,
    # and the most (None: no limit). One for all but the pipelines that loop over their ranks.
    chunks: tuple[int, int | None] = (1, 1)
    refused: dict[str, str] = field(default_factory=dict)  # impl -> why it can't be, and the fix
    # Impls whose schedule posts a recv long before the stage that needs it (torch's looped
    # pipeline runtime): a run times their recvs to completion (a thread waits on each) and
    # pdlab.predict has a rank wait where they completed, not where they were posted.
    receives_ahead: tuple[str, ...] = ()

    def fits(self, world_size: int) -> bool:
        """Whether it runs on ``world_size`` ranks."""
        return world_size >= self.min_world_size and world_size % self.world_size_multiple == 0

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError, naming a cluster size that works, if ``world_size`` doesn't."""
        low, k = self.min_world_size, self.world_size_multiple
        if self.fits(world_size):
            return
        if k == 1:
            raise ValueError(
                f"strategy {self.name!r} needs at least {low} ranks, got world_size "
                f"{world_size}: run it on a pdlab.Cluster({low}) or bigger"
            )
        rule = "an even world_size" if k == 2 else f"a world_size that is a multiple of {k},"
        fits = max(low, -(-world_size // k) * k)
        raise ValueError(
            f"strategy {self.name!r} needs {rule} >= {low}, got {world_size}: "
            f"use pdlab.Cluster({fits})"
        )

    def chunks_per_rank(self, virtual_stages: int | None) -> int:
        """The model chunks a rank holds with ``virtual_stages`` (None: what this strategy's
        schedule needs); ValueError, saying what to pass, if it can't run them."""
        least, most = self.chunks
        if virtual_stages is None:
            return least
        if least <= virtual_stages <= (most or virtual_stages):
            return virtual_stages
        if most is None:
            runs, fix = f"{least} or more", ", or use pp-1f1b for one chunk a rank"
        else:
            runs, fix = str(least), " (pp-interleaved runs several)" if least == 1 else ""
        raise ValueError(
            f"virtual_stages={virtual_stages} with strategy {self.name!r}: it runs {runs} "
            f"model chunk{'s' if least > 1 else ''} a rank: leave virtual_stages out "
            f"(None: {least}){fix}"
        )

    def implementation(self, impl: str) -> type:
        """The class for ``impl``, imported now. ValueError (with the fix) for an impl that
        can't exist, NotImplementedError for one not written yet."""
        if impl in self.refused:
            raise ValueError(self.refused[impl])
        if impl not in self.impls:
            done = ", ".join(f"{s.name}/{i}" for s in _strategies.values() for i in s.impls)
            raise NotImplementedError(
                f"strategy {self.name!r} with impl {impl!r} is not implemented yet "
                f"(available: {done})"
            )
        return getattr(importlib.import_module(self.module), self.impls[impl])


@dataclass(frozen=True)
class MenuEntry:
    """One line of the dashboard's strategy menu; ``impl`` set when the entry fixes it."""

    label: str
    strategy: str
    impl: str | None = None


_strategies: dict[str, Strategy] = {}
_menu: dict[str, MenuEntry] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the registry (and to the dashboard's menu, under its name)."""
    if strategy.name in _strategies:
        raise ValueError(f"strategy {strategy.name!r} is registered already")
    _strategies[strategy.name] = strategy
    _menu[strategy.name] = MenuEntry(strategy.label, strategy.name)
    return strategy


def alias(key: str, label: str, strategy: str, impl: str) -> None:
    """A menu entry that runs a registered ``strategy`` with a fixed ``impl`` (not a strategy)."""
    _menu[key] = MenuEntry(label, strategy, impl)


def unregister(name: str) -> None:
    """Remove strategy ``name`` and every menu entry that runs it."""
    del _strategies[name]
    for key in [k for k, entry in _menu.items() if entry.strategy == name]:
        del _menu[key]


def get(name: str) -> Strategy:
    """The registered strategy ``name`` (KeyError if there is none)."""
    return _strategies[name]


def names() -> tuple[str, ...]:
    """Every registered strategy, in registration order."""
    return tuple(_strategies)


def impls() -> tuple[str, ...]:
    """Every impl some strategy has or refuses, in registration order (scratch, torch)."""
    return tuple(dict.fromkeys(i for s in _strategies.values() for i in [*s.impls, *s.refused]))


def menu() -> dict[str, MenuEntry]:
    """The dashboard's strategy menu: key -> entry, strategies and aliases in registration order."""
    return dict(_menu)


def micro_batched() -> tuple[str, ...]:
    """The strategies that split each rank's batch into ``micro_batches``."""
    return tuple(name for name, s in _strategies.items() if s.micro_batched)


def layout_for(strategy: str, world_size: int) -> Layout:
    """The rank grid ``strategy`` uses on ``world_size`` ranks."""
    return get(strategy).layout(world_size)


PIPELINES = {"scratch": "PipelineScratch", "torch": "PipelineTorch"}

# fmt: off
register(Strategy("single", "single process (baseline)", "pdlab.training.parallel.single", {"scratch": "Single", "torch": "Single"}, layout=lambda n: Layout(), min_world_size=1))
register(Strategy("dp", "data", "pdlab.training.parallel.data", {"scratch": "DataParallel", "torch": "DDP"}))
register(Strategy("ps", "parameter server", "pdlab.training.parallel.data", {"scratch": "ParameterServer"}, refused={"torch": "PyTorch has no parameter-server API: use impl='scratch' for 'ps' (DDP is strategy='dp', impl='torch')"}))
register(Strategy("tp", "tensor", "pdlab.training.parallel.tensor", {"scratch": "TensorParallel", "torch": "DTensorParallel"}, layout=lambda n: Layout(tp=n)))
register(Strategy("tp-sp", "tensor + sequence (Megatron SP)", "pdlab.training.parallel.sequence", {"scratch": "SequenceParallelScratch", "torch": "SequenceParallelTorch"}, layout=lambda n: Layout(tp=n)))
register(Strategy("pp-gpipe", "pipeline GPipe", "pdlab.training.parallel.pipeline", PIPELINES, layout=lambda n: Layout(pp=n), micro_batched=True))
register(Strategy("pp-1f1b", "pipeline 1F1B", "pdlab.training.parallel.pipeline", PIPELINES, layout=lambda n: Layout(pp=n), micro_batched=True))
register(Strategy("pp-zb", "pipeline zero bubble (ZB-H1)", "pdlab.training.parallel.pipeline", PIPELINES, layout=lambda n: Layout(pp=n), micro_batched=True, receives_ahead=("torch",)))
register(Strategy("pp-interleaved", "pipeline interleaved 1F1B", "pdlab.training.parallel.pipeline", PIPELINES, layout=lambda n: Layout(pp=n), micro_batched=True, chunks=(2, None), receives_ahead=("torch",)))
register(Strategy("pp-zbv", "pipeline zero bubble V (ZBV, torch)", "pdlab.training.parallel.pipeline", {"torch": "PipelineTorch"}, layout=lambda n: Layout(pp=n), micro_batched=True, chunks=(2, 2), refused={"scratch": "pdlab has no scratch ZBV: its V schedule is torch's (ScheduleZBVZeroBubble); use impl='torch', or pp-zb for a zero-bubble schedule written in plain autograd"}, receives_ahead=("torch",)))
register(Strategy("zero1", "ZeRO-1", "pdlab.training.parallel.sharded", {"scratch": "Zero1", "torch": "Zero1Torch"}))
register(Strategy("zero2", "ZeRO-2", "pdlab.training.parallel.sharded", {"scratch": "Zero2", "torch": "Zero2Torch"}))
register(Strategy("zero3", "ZeRO-3", "pdlab.training.parallel.sharded", {"scratch": "Zero3", "torch": "Zero3Torch"}))
alias("fsdp", "FSDP (= ZeRO-3 torch)", "zero3", "torch")
register(Strategy("dp-tp", "hybrid DP×TP", "pdlab.training.parallel.hybrid", {"scratch": "DataTensorParallel", "torch": "DataDTensorParallel"}, layout=lambda n: Layout(dp=2, tp=n // 2), min_world_size=4, world_size_multiple=2))
register(Strategy("dp-pp", "hybrid DP×PP", "pdlab.training.parallel.hybrid", {"scratch": "DataPipelineParallel", "torch": "DataPipelineTorch"}, layout=lambda n: Layout(dp=2, pp=n // 2), min_world_size=4, world_size_multiple=2, micro_batched=True))
CP_TORCH = (
    "torch's context_parallel (torch.distributed.tensor.experimental) shards only the CUDA "
    "kernels of scaled_dot_product_attention (flash, efficient, cuDNN); on the CPU it fails "
    "(no sharding rule for aten._scaled_dot_product_flash_attention_for_cpu, torch 2.13), and "
    "pdlab's GPT writes its attention out: use impl='scratch' (ring attention on isend/irecv)"
)
register(Strategy("cp", "context (ring attention)", "pdlab.training.parallel.context", {"scratch": "ContextParallel"}, layout=lambda n: Layout(cp=n), refused={"torch": CP_TORCH}))
register(Strategy("dp-cp", "hybrid DP×CP", "pdlab.training.parallel.hybrid", {"scratch": "DataContextParallel"}, layout=lambda n: Layout(dp=2, cp=n // 2), min_world_size=4, world_size_multiple=2, refused={"torch": CP_TORCH}))
# fmt: on

# Idle ranks import each strategy's module (its torch machinery) ahead of a first run.
warmup.preload(*dict.fromkeys(get(name).module for name in names()))

# fmt: off
register(Strategy("ep", "expert (MoE)", "pdlab.training.parallel.expert", {"scratch": "ExpertParallel"}, layout=lambda n: Layout(ep=n), refused={"torch": "PyTorch has no expert-parallel API in torch.distributed (torchtitan builds its own on all_to_all_single, as pdlab's scratch does): use impl='scratch'"}))
register(Strategy("dp-ep", "hybrid DP×EP", "pdlab.training.parallel.hybrid", {"scratch": "DataExpertParallel"}, layout=lambda n: Layout(dp=2, ep=n // 2), min_world_size=4, world_size_multiple=2, refused={"torch": "PyTorch has no expert-parallel API in torch.distributed: use impl='scratch'"}))
# fmt: on

# The strategies that train model 'moe' (its experts, router and load-balance loss): the
# data-parallel ones, which take any model, and expert parallelism.
MOE_STRATEGIES = ("single", "dp", "ps", "zero1", "zero2", "zero3", "ep", "dp-ep")
