"""Expert parallelism (``ep``): each MoE layer's experts spread over ranks, tokens sent to them.

GShard (Lepikhin et al. 2020, arXiv 2006.16668) and Switch Transformer (Fedus et al. 2021):
with P expert-parallel ranks and E experts, rank q holds experts ``q·E/P ... (q+1)·E/P - 1``
of every MoE layer (``ExpertShard``); everything else (attention, router, embeddings) is
replicated, as in data parallelism, and every rank reads its own slice of the batch. In each
MoE layer a rank routes its tokens, then (torchtitan's ``token_dispatcher.py`` does the same):

1. ``exchange_counts``: an all-to-all of its E assignment counts (E/P int64 to each rank),
   so every rank learns how many rows it will receive from each rank for each of its experts.
2. ``dispatch``: ``all_to_all_single`` with uneven splits sends each rank the rows (token
   vectors, one per assignment) for its experts. gloo runs it (``alltoall_base``, uneven
   splits included). The list form ``all_to_all``, which gloo lacked (pytorch issue 88245),
   runs on gloo in torch 2.13 but only with tensors of one size: uneven ones raise
   "ProcessGroupGloo::alltoall: invalid tensor size" (``tests/test_expert.py``).
3. the local experts run on what arrived, then ``combine`` sends the outputs back the same
   way reversed. Backward runs the two all-to-alls again, reversed (``AllToAll``).

After backward, the replicated parameters' gradients are averaged over the ``ep`` ranks
(``data.allreduce_gradients``); an expert's gradient already holds every rank's tokens,
summed over the ranks' losses, so it is divided by P (the loss is the mean of the ranks').

Bytes a step, k experts a token, T tokens a rank, h the width (``routed_comm``): a rank
sends the rows it routes to other ranks' experts, k·T·(P-1)/P rows when routing is
uniform, in dispatch and again as gradients in backward, and receives as many back in
combine and in its backward: ≈ 2·k·h·bytes·(P-1)/P a token a MoE layer forward, the same
backward. What routing really does decides the exact bytes, so the formula takes each step's
tokens per expert (``models.routing``, logged by every rank) and computes each rank's
payload, sent and received bytes from them; the count exchange, E·8 bytes a rank a layer,
and the gradient all-reduce are static (``expected_comm``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from pdlab.measure import comm
from pdlab.measure.comm import CommEvent
from pdlab.training.layout import Layout
from pdlab.training.models import MoE, MoEConfig
from pdlab.training.parallel.base import DTYPES, Mesh, TrainConfig, meta_model
from pdlab.training.parallel.data import allreduce_comm, allreduce_gradients
from pdlab.training.parallel.single import Single

COUNT_BYTES = torch.empty((), dtype=torch.long).element_size()  # the counts are int64


# --- the exchange (a lab 08 exercise: write ``dispatch``) ---------------------------------


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with uneven splits; its gradient goes back reversed."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _all_to_all(grad, in_splits, out_splits, ctx.group), None, None, None


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group):
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def exchange_counts(counts: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``[P, E/P]``: how many rows each rank sends for each of this rank's experts, from
    every rank's ``counts`` (its assignments per expert, ``[E]``): E/P counts to each rank."""
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    return received.view(group.size(), -1)


def dispatch(
    routed: torch.Tensor, counts: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send each rank the rows of ``routed`` (sorted by expert, ``counts[e]`` for expert e)
    for its experts. Returns the rows received, ordered by source rank then local expert,
    and their counts ``[P, E/P]``. A rank's split is the sum of its experts' counts."""
    received_counts = exchange_counts(counts, group)
    to_ranks = counts.view(group.size(), -1).sum(1).tolist()
    from_ranks = received_counts.sum(1).tolist()
    return AllToAll.apply(routed, from_ranks, to_ranks, group), received_counts


def combine(
    out: torch.Tensor, received_counts: torch.Tensor, counts: torch.Tensor, group
) -> torch.Tensor:
    """``dispatch`` reversed: the experts' outputs back to the ranks their rows came from."""
    to_ranks = received_counts.sum(1).tolist()
    from_ranks = counts.view(group.size(), -1).sum(1).tolist()
    return AllToAll.apply(out, from_ranks, to_ranks, group)


def dispatch_problems(
    received: torch.Tensor, received_counts: torch.Tensor, rank: int, n_expert: int, ranks: int
) -> list[str]:
    """What is wrong with a rank's dispatch of ``example_rows`` (empty: nothing). Every row
    says where it comes from, so a row in the wrong place names the mistake."""
    local = n_expert // ranks
    want = torch.stack([example_counts(src, n_expert)[rank * local : (rank + 1) * local]
                        for src in range(ranks)])  # fmt: skip
    if received_counts.shape != want.shape or not torch.equal(received_counts, want):
        return [
            f"rank {rank} expected counts {want.tolist()} (from each rank, for each of its "
            f"experts) but got {received_counts.tolist()}: exchange the [E] counts with an "
            "all-to-all of E/P counts to each rank before sending rows"
        ]
    expected = torch.cat([example_rows(src, n_expert)[_rows_for(src, rank, local, n_expert)]
                          for src in range(ranks)])  # fmt: skip
    if received.shape != expected.shape:
        return [
            f"rank {rank} received {received.shape[0]} rows, expected {expected.shape[0]}: "
            "a rank's split is the sum of the counts of the experts it holds (input splits "
            "from your counts, output splits from the counts you received)"
        ]
    if not torch.equal(received, expected):
        got = sorted({int(v) for v in received[:, 0]})
        return [
            f"rank {rank} received rows from ranks {got}, not in order (source rank, then "
            "expert): send rows sorted by expert, in one all_to_all_single"
        ]
    return []


def example_counts(rank: int, n_expert: int) -> torch.Tensor:
    """A rank's assignments per expert in the dispatch check: uneven, some zero."""
    return (torch.arange(n_expert) * (rank + 1) + rank) % 4


def example_rows(rank: int, n_expert: int) -> torch.Tensor:
    """Rows sorted by expert: [source rank, expert, index within that expert]."""
    counts = example_counts(rank, n_expert)
    rows = [[rank, e, i] for e in range(n_expert) for i in range(int(counts[e]))]
    return torch.tensor(rows, dtype=torch.float32).view(-1, 3)


def _rows_for(src: int, dst: int, local: int, n_expert: int) -> torch.Tensor:
    rows = example_rows(src, n_expert)
    return (rows[:, 1] >= dst * local) & (rows[:, 1] < (dst + 1) * local)


# --- the strategy -------------------------------------------------------------------------


class ExpertShard(nn.ModuleDict):
    """This rank's experts of one MoE layer, under their global indices (so a parameter's
    name is the single process's), run on the rows every rank sends them."""

    def __init__(self, experts: nn.ModuleList, group: dist.ProcessGroup):
        per = len(experts) // group.size()
        first = group.rank() * per
        super().__init__({str(e): experts[e] for e in range(first, first + per)})
        self.group = group

    def forward(self, routed: torch.Tensor, counts: list[int]) -> torch.Tensor:
        counts_t = torch.tensor(counts, device=routed.device)  # NCCL sends device tensors
        received, received_counts = dispatch(routed, counts_t, self.group)
        # The rows arrive by source rank, then expert: each (rank, expert) piece runs
        # through its expert as it lies (torchtitan permutes them into one batch an expert
        # for a grouped GEMM; here the rows stay put, and each expert runs P times).
        experts = list(self.values())
        pieces = received.split(received_counts.flatten().tolist())
        out = torch.cat([experts[i % len(experts)](piece) for i, piece in enumerate(pieces)])
        return combine(out, received_counts, counts_t, self.group)


def expert_index(name: str) -> int | None:
    """The expert parameter ``name`` belongs to (``3.mlp.experts.2.fc.weight``: 2), None
    for a replicated parameter."""
    _, found, rest = name.partition(".experts.")
    return int(rest.split(".")[0]) if found else None


def is_expert(name: str) -> bool:
    """Whether parameter ``name`` belongs to an expert (not replicated under ``ep``)."""
    return expert_index(name) is not None


def experts_per_rank(layout: Layout) -> int:
    return MoEConfig.n_expert // layout.ep


def held_experts(ep_rank: int, per: int) -> set[int | None]:
    """The experts ep rank ``ep_rank`` holds, and None: the replicated parameters."""
    return {None, *range(ep_rank * per, (ep_rank + 1) * per)}


def check(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, naming the fix, where expert parallelism can't split the run."""
    if config.model != "moe":
        raise ValueError(
            f"expert parallelism splits the experts of model 'moe'; model {config.model!r} "
            "has none: use model='moe'"
        )
    experts = MoEConfig.n_expert
    if experts % layout.ep:
        fits = [n * layout.dp for n in range(2, experts + 1) if experts % n == 0]
        raise ValueError(
            f"the moe model's {experts} experts don't split over ep={layout.ep} ranks: use "
            f"a world_size of {' or '.join(map(str, fits))}"
        )
    if config.batch_size % layout.data_shards:
        n = layout.data_shards
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {n} ranks reading different "
            f"samples (dp×ep): use a multiple of {n}, e.g. {-(-config.batch_size // n) * n}"
        )


def routed_comm(
    config: TrainConfig, layout: Layout, routing: dict[int, list[list[int]]]
) -> list[CommEvent]:
    """Every rank's dispatch and combine all-to-alls in one step, forward and backward, from
    every rank's tokens per expert in each MoE layer (``routing[rank][layer][expert]``, as
    ``models.routing`` logs them).

    ``sends[i][j]``: the rows ep rank i sends ep rank j in a layer's dispatch, the sum of
    i's counts for j's experts. Dispatch and combine's backward move ``sends``, combine and
    dispatch's backward its transpose; a rank's rows for its own experts stay put (payload,
    not sent)."""
    row = MoEConfig.n_embd * DTYPES[config.precision].itemsize
    per = MoEConfig.n_expert // layout.ep
    events = []
    for rank in range(layout.world_size):
        group = layout.group_ranks(rank, "ep")
        i = group.index(rank)
        for layer in range(len(routing[rank])):
            sends = [[sum(routing[src][layer][j * per : (j + 1) * per]) for j in range(len(group))]
                     for src in group]  # fmt: skip
            out_rows, in_rows = sum(sends[i]), sum(s[i] for s in sends)
            mine = sends[i][i]
            for rows, back in ((out_rows, in_rows), (in_rows, out_rows)) * 2:
                e = comm.event("all_to_all", rows * row, "ep", layout.ep, rank)
                e.sent_bytes, e.received_bytes = (rows - mine) * row, (back - mine) * row
                events.append(e)
    return events


class ExpertParallel(Single):
    """``ep`` from scratch: experts split over the ``ep`` group, tokens sent by all-to-all,
    the replicated parameters' gradients averaged over ``ep``."""

    check = staticmethod(check)
    routed_comm = staticmethod(routed_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        self.group = mesh.group("ep")
        for layer in model.modules():
            if isinstance(layer, MoE):
                layer.experts = ExpertShard(layer.experts, self.group)
        super().__init__(model, config, mesh)
        named = list(self.model.named_parameters())
        self.experts = [p for name, p in named if is_expert(name)]
        self.replicated = [p for name, p in named if not is_expert(name)]

    def update(self) -> None:
        allreduce_gradients(self.replicated, self.group)
        for p in self.experts:  # the sum of the ep ranks' losses' gradients: their mean
            p.grad /= self.group.size()
        self.optimizer.step()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        shards = [None] * self.group.size()
        dist.all_gather_object(shards, super().full_state_dict(), group=self.group)
        return {k: v for shard in shards for k, v in shard.items()}  # experts from each rank

    @staticmethod
    def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
        """The static part of a step: each layer's count exchange (forward only: backward
        reuses the splits), and the all-reduce of the replicated gradients over ``ep``."""
        model = meta_model(config)
        replicated = [p for name, p in model.named_parameters() if not is_expert(name)]
        layers = sum(isinstance(m, MoE) for m in model.modules())
        exchange = comm.event("all_to_all", MoEConfig.n_expert * COUNT_BYTES, "ep", layout.ep)
        return comm.on_ranks([exchange] * layers, range(layout.world_size)) + allreduce_comm(
            layout, lambda rank: replicated, dim="ep"
        )
