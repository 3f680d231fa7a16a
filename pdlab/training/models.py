"""The models every strategy trains: the article's network, a deeper MLP, a small GPT and
its mixture-of-experts version (``moe``).

Every model is an ``nn.Sequential`` of *units* (a dense layer, an embedding, a transformer
block, the output head). That one shape is what the parallel strategies rely on:
pipeline parallelism cuts the sequence into contiguous stages, tensor parallelism shards the
linears inside each unit, and the loss is always cross-entropy on the last unit's logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdlab.training.data import BLOCK_SIZE, text_vocab_size

# Model configs as plain values (nanoGPT style). Widths are divisible by 4 so TP and PP
# apply up to 4 ranks; the article's hidden width (10) is its own, and only splits by 2.
ARTICLE_WIDTHS = (2, 10, 3)
MLP_WIDTHS = (2, 64, 64, 64, 3)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 65
    block_size: int = BLOCK_SIZE
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64


class Dense(nn.Module):
    """One linear layer, with a ReLU unless it is the output layer."""

    def __init__(self, n_in: int, n_out: int, relu: bool):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x.to(self.linear.weight.dtype))  # the data is float32 (bf16 runs)
        return F.relu(x) if self.relu else x


def mlp(widths: tuple[int, ...]) -> nn.Sequential:
    """Dense layers ``widths[0] -> ... -> widths[-1]``, ReLU between them."""
    last = len(widths) - 2
    return nn.Sequential(*(Dense(a, b, relu=i < last) for i, (a, b) in enumerate(pairwise(widths))))


class Embedding(nn.Module):
    """Token plus position embedding: the GPT's first unit."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.wte(idx) + self.wpe(pos)


class Attention(nn.Module):
    """Causal self-attention with separate q, k, v projections.

    Separate projections (nanoGPT fuses them) let tensor parallelism shard by heads with a
    plain column split; the number of heads is read from the projection's width, so the same
    code runs on a full layer and on a TP shard holding ``n_head / tp`` heads.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.k = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.v = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.recompute = False  # selective recompute of ``core`` (``set_recompute``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(h: torch.Tensor) -> torch.Tensor:
            return h.view(b, t, -1, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.recompute:  # keep q, k, v; compute the scores again in backward
            y = checkpoint(self.core, q, k, v, use_reentrant=False)
        else:
            y = self.core(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))

    def core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q·kᵀ/√d, causal)·v, written out (not fused) so that backward keeps the
        softmax's b·a·s² probabilities: Korthikanti et al.'s 5as/h term (2as/h here, without
        dropout), which selective recompute drops."""
        t = q.shape[-2]
        causal = torch.full((t, t), float("-inf"), dtype=q.dtype, device=q.device).triu(1)
        scores = q @ k.transpose(-2, -1) * self.head_dim**-0.5 + causal
        return scores.softmax(-1) @ v


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 4 * cfg.n_embd
        self.fc = nn.Linear(cfg.n_embd, hidden)
        self.proj = nn.Linear(hidden, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """A pre-norm transformer block; ``mlp`` builds its MLP (the ``moe`` model's: a ``MoE``)."""

    def __init__(self, cfg: GPTConfig, mlp: Callable[[GPTConfig], nn.Module] = FeedForward):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = mlp(cfg)
        self.recompute = False  # full recompute: keep the input only (``set_recompute``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            return checkpoint(self.layer, x, use_reentrant=False)
        return self.layer(x)

    def layer(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final layer norm and the vocabulary projection (untied, so stages own disjoint weights)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def gpt(cfg: GPTConfig, mlp: Callable[[GPTConfig], nn.Module] = FeedForward) -> nn.Sequential:
    """The GPT as units: embedding, ``n_layer`` blocks (each MLP built by ``mlp``), head."""
    units = [Embedding(cfg), *(Block(cfg, mlp) for _ in range(cfg.n_layer)), Head(cfg)]
    model = nn.Sequential(*units)
    # GPT-2's scaled init for the projections that write into the residual stream.
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
    return model


# --- mixture of experts: the ``moe`` model ---------------------------------------------------


@dataclass(frozen=True)
class MoEConfig(GPTConfig):
    n_expert: int = 4  # E experts in every block (4 split over 1, 2 or 4 expert-parallel ranks)
    top_k: int = 2  # experts each token goes to
    expert_hidden: int = 128  # an expert's hidden width (the gpt's one MLP has 4·n_embd)
    balance: float = 1e-2  # α of the load-balance loss (Switch Transformer's value)


class Experts(nn.ModuleList):
    """The E experts of one MoE layer. ``forward(routed, counts)``: expert e runs on its
    ``counts[e]`` rows of ``routed`` (the token assignments sorted by expert).

    Every expert runs, on zero rows too: its parameters then get a (zero) gradient every
    step, so DDP and the gradient all-reduces see the same parameters whatever the routing.
    Expert parallelism swaps this module for one that sends the rows to the rank holding
    their expert (``pdlab/training/parallel/expert.py``).
    """

    def forward(self, routed: torch.Tensor, counts: list[int]) -> torch.Tensor:
        chunks = routed.split(counts)
        return torch.cat([expert(chunk) for expert, chunk in zip(self, chunks, strict=True)])


class AddBalanceLoss(torch.autograd.Function):
    """Forward: ``x`` unchanged; backward: ``x``'s gradient, and 1 for ``aux``. The
    load-balance loss joins the gradient without changing the loss the run reports
    (Megatron-LM's ``MoEAuxLossAutoScaler``): every strategy keeps its ``loss_fn``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grad, torch.ones((), device=grad.device)


class MoE(nn.Module):
    """A top-k mixture of experts in place of the block's MLP (Shazeer et al. 2017; Mixtral's
    routing: softmax over E, the top k renormalised). Dropless: every token reaches its k
    experts, there is no capacity, so nothing depends on how tokens are split over ranks.

    ``tokens_per_expert`` holds the last forward's assignments per expert (the dashboard's
    plot, and the all-to-all bytes expert parallelism sends).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.router = nn.Linear(cfg.n_embd, cfg.n_expert, bias=False)
        self.experts = Experts(FeedForward(cfg, cfg.expert_hidden) for _ in range(cfg.n_expert))
        self.top_k, self.balance = cfg.top_k, cfg.balance
        self.tokens_per_expert = torch.zeros(cfg.n_expert, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, h = x.shape
        probs = self.router(x).float().softmax(-1)  # [b, t, E], float32 in bf16 runs too
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [b, t, k]
        weights = weights / weights.sum(-1, keepdim=True)
        assigned = chosen.flatten()  # b·t·k assignments, token by token
        order = assigned.argsort(stable=True)  # ... sorted by expert
        token = order // self.top_k  # the token of each sorted assignment
        out = self.experts(x.reshape(-1, h)[token], self.count(assigned))
        out = out * weights.flatten()[order, None].to(out.dtype)
        y = torch.zeros_like(out[: b * t]).index_add(0, token, out).view(b, t, h)
        return AddBalanceLoss.apply(y, self.balance_loss(probs, chosen))

    def count(self, assigned: torch.Tensor) -> list[int]:
        """The assignments per expert (kept in ``tokens_per_expert``). On the meta device
        (shapes only: the predictor's FLOP count) an even split: dropless, every routing
        costs the same FLOPs."""
        n, e = assigned.numel(), len(self.experts)
        if assigned.is_meta:
            return [n // e + (i < n % e) for i in range(e)]
        self.tokens_per_expert = torch.bincount(assigned, minlength=e)
        return self.tokens_per_expert.tolist()

    def balance_loss(self, probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Switch Transformer's α·E·Σ_i f_i·P_i (Fedus et al. 2021, eq. 4), f_i the share of
        a sequence's k·T assignments expert i got and P_i its mean router probability, per
        sequence and averaged over the sequences: DeepSeek-V3's sequence-wise form (arXiv
        2412.19437, §2.1.2). Linear in the batch, so data-parallel ranks' averaged gradients
        are one process's."""
        e, t = probs.shape[-1], probs.shape[1]
        f = F.one_hot(chosen, e).sum((1, 2)).float() / (self.top_k * t)  # [b, E]
        return self.balance * e * (f * probs.mean(1)).sum(-1).mean()


def moe(cfg: MoEConfig) -> nn.Sequential:
    """The GPT with a ``MoE`` in place of every block's MLP."""
    return gpt(cfg, MoE)


def routing(model: nn.Module) -> list[list[int]]:
    """Tokens per expert in each MoE layer of ``model`` in its last forward ([] if none)."""
    return [m.tokens_per_expert.tolist() for m in model.modules() if isinstance(m, MoE)]


MODELS = ("article", "mlp", "gpt", "moe")
RECOMPUTE = ("none", "selective", "full")


def set_recompute(model: nn.Module, mode: str) -> None:
    """Activation recomputation (Korthikanti et al. 2022, torch.utils.checkpoint) on the
    GPT's blocks: "full" keeps each block's input and runs the block again in backward (2sbh
    bytes a layer in 16 bits); "selective" recomputes only attention's core, whose b·a·s²
    probabilities are most of the memory and little of the compute; "none" keeps everything."""
    if mode not in RECOMPUTE:
        raise ValueError(f"unknown recompute {mode!r}: choose one of {', '.join(RECOMPUTE)}")
    for m in model.modules():
        if isinstance(m, Block):
            m.recompute = mode == "full"
        elif isinstance(m, Attention):
            m.recompute = mode == "selective"


def build_model(
    name: str, seed: int = 0, vocab_size: int | None = None, seq_len: int = BLOCK_SIZE
) -> nn.Sequential:
    """Build model ``name`` with weights drawn from ``seed`` (same on every rank).

    ``vocab_size`` is only for ``gpt`` and ``moe`` and defaults to the shipped text's alphabet.
    ``seq_len`` is their context: the position embedding has that many rows (drawn after the
    token embedding's, so ``wte`` is the same at every length).
    """
    torch.manual_seed(seed)
    if name == "article":
        return mlp(ARTICLE_WIDTHS)
    if name == "mlp":
        return mlp(MLP_WIDTHS)
    if name == "gpt":
        return gpt(GPTConfig(vocab_size=vocab_size or text_vocab_size(), block_size=seq_len))
    if name == "moe":
        return moe(MoEConfig(vocab_size=vocab_size or text_vocab_size(), block_size=seq_len))
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; works for class logits ``[B, C]`` and token logits ``[B, T, V]``.
    Computed in float32 whatever the logits' dtype (bf16 runs), as Megatron does."""
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


def stage(model: nn.Sequential, start: int, stop: int) -> nn.Sequential:
    """Units ``start:stop`` of ``model`` as a pipeline stage, keeping their global names.

    ``stage(m, 2, 4).state_dict()`` has keys like ``"2.attn.q.weight"``, the same as in the
    full model, so a stage's parameters compare directly with the single-process run.
    """
    return nn.Sequential(OrderedDict((str(i), model[i]) for i in range(start, stop)))
