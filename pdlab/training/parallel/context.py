"""Context parallelism: ring attention (Liu et al. 2023, "Ring Attention with Blockwise
Transformers", arXiv 2310.01889), as picotron's ``context_parallel/`` builds it.

The ``cp`` ranks of a group read the *same* samples and split each one's sequence: a rank
holds ``s/cp`` of the tokens, so every activation outside attention shrinks by ``cp``.
Attention is the one place where tokens meet. Each rank computes its queries ``Q_r``
against every rank's keys and values: the ``K, V`` blocks travel around the ring (rank
``r`` sends to ``r+1`` and receives from ``r-1``), and at step ``j`` a rank attends to the
block of rank ``r-j``. The next block is already on its way while a rank computes this one.

Online softmax (Milakov and Gimelshein 2018; FlashAttention): a row of ``softmax(QKᵀ/√d)V``
is ``Σ_j exp(S_j - m)·V_j / Σ_j exp(S_j - m)·1`` for any ``m``. A rank keeps per query row
the running max ``m``, the running sum ``l`` and the unnormalised output ``o``; a new block
with a larger max rescales the earlier ``o`` and ``l`` by ``exp(m_old - m_new)``
(``attend_block``). At the end ``O = o / l`` and ``lse = m + log l``, which backward needs.

Causal load balance: the sequence is cut into ``2·cp`` chunks and rank ``r`` holds chunks
``r`` and ``2cp-1-r`` (``positions``), so every rank has as many early queries (which see
few keys) as late ones: equal work per ring step. The mask of a block follows from the
global positions of its queries and keys (a key after a query is masked), whichever ranks
they come from.

Backward (``RingAttention.backward``) is written out rather than left to autograd over the
sends: c10d's ``isend``/``irecv`` have no derivative, and a backward that autograd builds
from the forward's blocks would keep every received ``K, V`` block (``cp`` times this rank's
``K, V``: the memory CP exists to save). As FlashAttention's
backward, it recomputes each block's probabilities from ``lse``: ``P = exp(QKᵀ/√d - lse)``,
``dV = PᵀdO``, ``dS = P∘(dO Vᵀ - D)`` with ``D = rowsum(dO∘O)``, ``dQ += dS K/√d``,
``dK = dSᵀQ/√d``. ``K, V`` go around the ring again, and with each block its gradient
``dK, dV``, accumulated by every rank it visits; one more hop brings it home.

Bytes, per rank and layer, ``b`` its samples, ``s`` the sequence, ``h`` the width of K (no
grouped-query attention here, ``h_kv = h``), a ``K, V`` block ``2·b·(s/cp)·h·bytes``:
forward ``cp-1`` sends of it; backward ``cp-1`` sends of ``K, V`` and ``cp`` of ``dK, dV``.
Each send counts once at its sender (``pdlab.measure.comm``); its recv receives the same.

Why send/recv and not an all-gather of ``K, V``: an all-gather moves the same
``(cp-1)/cp·s`` tokens' ``K, V`` per rank, but every rank then holds the whole sequence's
``K, V`` at once (``cp`` blocks), where the ring holds two (the one computed on and the one
in flight), and nothing is computed until the gather ends. The sends are ``isend``/``irecv``
(not ``batch_isend_irecv``, which hangs on gloo: PiPPy #989, pytorch #132644), and ``K, V``
and ``dK, dV`` use different tags, since both may be in flight to the same rank.

Every parameter's gradient is a sum over all tokens, and each cp rank saw ``1/cp`` of
them: after backward the ranks average the gradients over ``cp`` (``data.allreduce_gradients``,
counted as dp's buckets are, on the ``cp`` group). Each rank's loss is the mean over its
tokens, so the mean of the ranks' losses is the whole sequence's.

torch's ``context_parallel`` (``torch.distributed.tensor.experimental``) is not here: it
has ring versions of the CUDA kernels of ``scaled_dot_product_attention`` only (flash,
efficient, cuDNN); on the CPU, SDPA runs ``aten._scaled_dot_product_flash_attention_for_cpu``,
for which it has no sharding rule: NotImplementedError (torch 2.13; ``tests/test_context.py``
checks it on the installed torch). pdlab's GPT writes its attention out, besides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pdlab.measure.comm import CommEvent, event, on_ranks
from pdlab.training.layout import Layout
from pdlab.training.models import Attention, Block
from pdlab.training.parallel.base import Mesh, StepOutput, TrainConfig, meta_model, wire_device
from pdlab.training.parallel.data import allreduce_comm, allreduce_gradients, whole_model
from pdlab.training.parallel.single import Single

KV, GRAD = 0, 1  # the tags of the two kinds of message on the ring

# ---------------------------------------------------------------- one block (pure math)


def positions(rank: int, cp: int, seq_len: int) -> torch.Tensor:
    """The global positions rank ``rank`` holds: chunks ``rank`` and ``2cp-1-rank`` of ``2·cp``."""
    chunk = seq_len // (2 * cp)
    first, second = rank * chunk, (2 * cp - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[len(q_pos), len(k_pos)]``: 0 where a query may see a key, -inf where the key comes later."""
    later = k_pos[None, :] > q_pos[:, None]
    return torch.zeros(later.shape, dtype=dtype, device=later.device).masked_fill(
        later, float("-inf")
    )


def block_scores(
    q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float
) -> torch.Tensor:
    """``QKᵀ/√d`` of one block, -inf where a key comes after its query."""
    return q @ k.transpose(-2, -1) * scale + causal_mask(q_pos, k_pos, q.dtype)


@dataclass
class Partial:
    """Attention over the blocks seen so far, per query row: the running max of the scores
    ``m``, ``l = Σ exp(S - m)`` and ``o = Σ exp(S - m)·V`` (not yet divided by ``l``)."""

    o: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor  # noqa: E741 (the paper's symbol)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``O = o / l`` and the log-sum-exp of every row's scores, ``m + log l``."""
        return self.o / self.l, self.m + self.l.log()


def attend_block(
    state: Partial | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
) -> Partial:
    """``state`` updated with one block of keys and values (online softmax).

    The first block must give every query row a visible key (a rank's own block does: it
    holds the diagonal), so that ``m`` is finite from then on."""
    scores = block_scores(q, k, q_pos, k_pos, scale)
    block_max = scores.amax(-1, keepdim=True)
    m = block_max if state is None else torch.maximum(state.m, block_max)
    p = torch.exp(scores - m)
    if state is None:
        return Partial(p @ v, m, p.sum(-1, keepdim=True))
    rescale = torch.exp(state.m - m)  # the earlier blocks were summed against a smaller max
    return Partial(state.o * rescale + p @ v, m, state.l * rescale + p.sum(-1, keepdim=True))


def block_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    lse: torch.Tensor,
    d_out: torch.Tensor,
    delta: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One block's share of ``(dQ, dK, dV)`` from the final ``lse`` and ``D = rowsum(dO∘O)``."""
    p = torch.exp(block_scores(q, k, q_pos, k_pos, scale) - lse)
    ds = p * (d_out @ v.transpose(-2, -1) - delta)
    return ds @ k * scale, ds.transpose(-2, -1) @ q * scale, p.transpose(-2, -1) @ d_out


def simulate_ring(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: int, step: Callable = attend_block
) -> torch.Tensor:
    """Causal attention of ``[b, a, s, d]`` heads computed as ``cp`` ring ranks would, in one
    process, with ``step`` as each rank's block update: the exercise's checker (lab 08) and
    the tests run a learner's or a deliberately wrong ``step`` through it."""
    scale, out = q.shape[-1] ** -0.5, torch.empty_like(q)
    pos = [positions(r, cp, q.shape[-2]) for r in range(cp)]
    for rank in range(cp):
        state = None
        for j in range(cp):  # the blocks in the order the ring brings them
            src = pos[(rank - j) % cp]
            state = step(
                state, q[..., pos[rank], :], k[..., src, :], v[..., src, :], pos[rank], src, scale
            )
        out[..., pos[rank], :] = state.result()[0]
    return out


# ---------------------------------------------------------------- the ring


class Ring:
    """This rank's place on the ``cp`` ring: it sends to the next rank, receives from the previous."""

    def __init__(self, group: dist.ProcessGroup, device: torch.device):
        self.group, self.size, self.rank = group, group.size(), group.rank()
        self.wire = wire_device(group, device)

    def pass_on(self, t: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]:
        """Start sending ``t`` one rank on and receiving the previous rank's; the returned
        function waits for both and gives what arrived."""
        send = t.detach().to(self.wire).contiguous()
        recv = torch.empty_like(send)
        works = [
            dist.isend(send, group=self.group, group_dst=(self.rank + 1) % self.size, tag=tag),
            dist.irecv(recv, group=self.group, group_src=(self.rank - 1) % self.size, tag=tag),
        ]

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            return recv.to(t.device)

        return wait


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the whole sequence (module docstring)."""

    @staticmethod
    def forward(ctx, q, k, v, ring: Ring, pos: list[torch.Tensor]):
        scale = q.shape[-1] ** -0.5
        kv, state = torch.stack([k, v]), None
        for j in range(ring.size):
            wait = ring.pass_on(kv, KV) if j < ring.size - 1 else None  # the next block
            src = pos[(ring.rank - j) % ring.size]
            state = attend_block(state, q, kv[0], kv[1], pos[ring.rank], src, scale)
            if wait is not None:
                kv = wait()
        out, lse = state.result()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.pos, ctx.scale = ring, pos, scale
        return out

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, lse = ctx.saved_tensors
        ring, pos = ctx.ring, ctx.pos
        delta = (d_out * out).sum(-1, keepdim=True)
        dq, kv = torch.zeros_like(q), torch.stack([k, v])
        dkv = torch.zeros_like(kv)  # the gradient of the block this rank holds, so far
        for j in range(ring.size):
            wait = ring.pass_on(kv, KV) if j < ring.size - 1 else None
            src = pos[(ring.rank - j) % ring.size]
            block = block_grads(q, kv[0], kv[1], pos[ring.rank], src, ctx.scale, lse, d_out, delta)
            dq += block[0]
            dkv = ring.pass_on(dkv + torch.stack(block[1:]), GRAD)()  # on with its block
            if wait is not None:
                kv = wait()
        return dq, dkv[0], dkv[1], None, None  # after cp hops dK, dV are this rank's own


# ---------------------------------------------------------------- the model on a cp rank


class ShardEmbedding(nn.Module):
    """The GPT's embedding of this rank's tokens at their global positions (not 0..t-1)."""

    def __init__(self, embedding: nn.Module, pos: torch.Tensor):
        super().__init__()
        self.wte, self.wpe = embedding.wte, embedding.wpe  # the same names as the full model's
        self.register_buffer("pos", pos, persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx) + self.wpe(self.pos)


def _ring_core(ring: Ring, pos: list[torch.Tensor]) -> Callable:
    """``Attention.core`` (its q, k, v heads in, its heads out) computed around ``ring``."""

    def core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return RingAttention.apply(q, k, v, ring, pos)

    return core


def check(config: TrainConfig, layout: Layout) -> None:
    """Raise ValueError, naming the fix, when ``config`` has no sequence ``layout.cp`` splits."""
    if config.model != "gpt":
        raise ValueError(
            f"context parallelism splits each sample's sequence over ranks; model "
            f"{config.model!r} has none: use model='gpt'"
        )
    seq_len = meta_model(config)[0].wpe.num_embeddings
    if seq_len % (2 * layout.cp):
        raise ValueError(
            f"context parallelism cuts the sequence ({seq_len} tokens) into 2·cp = "
            f"{2 * layout.cp} chunks: use a cp that divides {seq_len // 2}"
        )
    if config.recompute != "none":
        raise ValueError(
            f"recompute={config.recompute!r} with context parallelism: ring attention keeps "
            "no probabilities already (it recomputes them from lse), and recomputing a block "
            "would run the ring again; use recompute='none'"
        )


def ring_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """Every rank's sends and recvs on the ``cp`` ring in one step (module docstring)."""
    model = meta_model(config)
    seq_len, width = model[0].wpe.num_embeddings, model[0].wpe.embedding_dim
    item = model[0].wpe.weight.element_size()
    block = 2 * (config.batch_size // layout.dp) * (seq_len // layout.cp) * width * item
    layers = sum(isinstance(unit, Block) for unit in model)
    hop = [event("send", block, "cp", layout.cp), event("recv", block, "cp", layout.cp)]
    forward = (layout.cp - 1) * hop
    backward = (layout.cp - 1) * hop + layout.cp * hop  # K, V again, and dK, dV
    per_rank = layers * (forward + backward)
    return on_ranks(per_rank, range(layout.world_size))


def expected_comm(config: TrainConfig, layout: Layout) -> list[CommEvent]:
    """The ring's sends, then every gradient averaged over ``cp``."""
    return ring_comm(config, layout) + allreduce_comm(layout, whole_model(config), "cp")


class ContextParallel(Single):
    """``cp`` from scratch: each rank embeds, attends (around the ring) and predicts its
    ``s/cp`` tokens of every sample; the gradients are averaged over ``cp``."""

    check = staticmethod(check)
    expected_comm = staticmethod(expected_comm)

    def __init__(self, model: nn.Sequential, config: TrainConfig, mesh: Mesh):
        cp, seq_len = mesh.layout.cp, model[0].wpe.num_embeddings
        self.group = mesh.group("cp")
        pos = [positions(r, cp, seq_len).to(mesh.device) for r in range(cp)]
        self.pos = pos[mesh.cp_rank]
        model[0] = ShardEmbedding(model[0], self.pos)
        ring = Ring(self.group, mesh.device)
        for unit in model.modules():
            if isinstance(unit, Attention):
                unit.core = _ring_core(ring, pos)  # this copy's attention, instead of the method
        super().__init__(model, config, mesh)

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        """This rank's tokens of every sample, then the gradient of the whole sequences."""
        out = super().forward_backward(x[:, self.pos], y[:, self.pos])
        allreduce_gradients(list(self.model.parameters()), self.group)
        return out
