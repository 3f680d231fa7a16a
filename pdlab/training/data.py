"""Local data sets: the article's 2-D, 3-class points and a public-domain text for the GPT.

Nothing is downloaded. Batches are a pure function of ``(seed, step)``, so every rank can
draw the same global batch and keep only its own shard, and the single-process baseline sees
exactly the union of what the data-parallel ranks see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from importlib import resources

import torch

BLOCK_SIZE = 32  # characters in a text window: the GPT's context
TEXT_FILE = "sonnets.txt"  # Shakespeare's sonnets (public domain), shipped in pdlab/assets/


def points(n: int, seed: int = 0, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` noisy points on ``classes`` interleaved spiral arms: inputs ``[n, 2]``, labels ``[n]``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    r = torch.rand(n, generator=g)
    angle = y * (2 * math.pi / classes) + 3.0 * r + 0.2 * torch.randn(n, generator=g)
    x = torch.stack([r * torch.cos(angle), r * torch.sin(angle)], dim=1)
    return x, y


@cache
def text() -> str:
    return resources.files("pdlab").joinpath("assets", TEXT_FILE).read_text(encoding="utf-8")


@cache
def alphabet() -> str:
    return "".join(sorted(set(text())))


def text_vocab_size() -> int:
    return len(alphabet())


def encode(s: str) -> torch.Tensor:
    index = {c: i for i, c in enumerate(alphabet())}
    return torch.tensor([index[c] for c in s], dtype=torch.long)


def text_windows(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of ``block_size`` characters: inputs and next-character targets."""
    ids = encode(text())
    starts = torch.arange(len(ids) - block_size)
    offsets = torch.arange(block_size)
    return ids[starts[:, None] + offsets], ids[starts[:, None] + offsets + 1]


@dataclass
class Dataset:
    """Inputs and targets, sampled into batches by ``(seed, step)``."""

    x: torch.Tensor
    y: torch.Tensor
    seed: int = 0

    def __len__(self) -> int:
        return len(self.x)

    def batch(
        self, step: int, batch_size: int, shard: int = 0, num_shards: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Shard ``shard`` of ``num_shards`` of the global batch for ``step``.

        The global batch is ``batch_size`` samples drawn without replacement; the shards are
        its contiguous, equal slices (``batch_size`` must divide by ``num_shards``).
        """
        if batch_size % num_shards:
            raise ValueError(
                f"batch_size {batch_size} does not divide into {num_shards} shards: "
                f"use a multiple of {num_shards}"
            )
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        idx = torch.randperm(len(self), generator=g)[:batch_size]
        per = batch_size // num_shards
        idx = idx[shard * per : (shard + 1) * per]
        return self.x[idx], self.y[idx]


def load_dataset(
    model: str, seed: int = 0, n_points: int = 4096, block_size: int = BLOCK_SIZE
) -> Dataset:
    """The data set that goes with ``model``: points for ``article``/``mlp``, text for ``gpt``
    and ``moe``."""
    if model in ("gpt", "moe"):
        x, y = text_windows(block_size)
    else:
        x, y = points(n_points, seed)
    return Dataset(x, y, seed)
