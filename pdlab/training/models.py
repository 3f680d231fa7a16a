"""The models every strategy trains: the article's network, a deeper MLP and a small GPT.

Every model is an ``nn.Sequential`` of *units* (a dense layer, an embedding, a transformer
block, the output head). That one shape is what the parallel strategies rely on:
pipeline parallelism cuts the sequence into contiguous stages, tensor parallelism shards the
linears inside each unit, and the loss is always cross-entropy on the last unit's logits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
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
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = FeedForward(cfg)
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


def gpt(cfg: GPTConfig) -> nn.Sequential:
    units = [Embedding(cfg), *(Block(cfg) for _ in range(cfg.n_layer)), Head(cfg)]
    model = nn.Sequential(*units)
    # GPT-2's scaled init for the projections that write into the residual stream.
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
    return model


MODELS = ("article", "mlp", "gpt")
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

    ``vocab_size`` is only for ``gpt`` and defaults to the shipped text's alphabet.
    ``seq_len`` is the gpt's context: its position embedding has that many rows (weights
    drawn after the token embedding's, so ``wte`` is the same at every length).
    """
    torch.manual_seed(seed)
    if name == "article":
        return mlp(ARTICLE_WIDTHS)
    if name == "mlp":
        return mlp(MLP_WIDTHS)
    if name == "gpt":
        return gpt(GPTConfig(vocab_size=vocab_size or text_vocab_size(), block_size=seq_len))
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
