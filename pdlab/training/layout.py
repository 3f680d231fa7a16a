"""``Layout``: the ranks as a grid of data, pipeline and tensor parallel coordinates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    """The ranks as a grid ``arange(world).view(dp, pp, tp)``: tp fastest, dp slowest.

    TP partners are neighbours (on one host they share the fastest links); a rank's data
    shard is its dp coordinate.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.pp * self.tp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """``(dp_rank, pp_rank, tp_rank)`` of global ``rank``."""
        return rank // (self.pp * self.tp), rank // self.tp % self.pp, rank % self.tp
