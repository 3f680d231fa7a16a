"""``Layout``: the ranks as a grid of data, expert, pipeline, context and tensor parallel
coordinates."""

from __future__ import annotations

from dataclasses import dataclass

DIMS = ("dp", "ep", "pp", "cp", "tp")  # the grid's dimensions, slowest to fastest


@dataclass(frozen=True)
class Layout:
    """The ranks as a grid ``arange(world).view(dp, ep, pp, cp, tp)``: tp fastest, dp slowest.

    TP partners are neighbours (on one host they share the fastest links), then the context
    parallel ring. A rank's data shard is its (dp, ep) coordinate: expert-parallel ranks read
    different samples and share the experts; context-parallel ranks read the same samples and
    split their sequence.
    """

    dp: int = 1
    pp: int = 1
    tp: int = 1
    cp: int = 1
    ep: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The grid's size along each of ``DIMS``."""
        return tuple(getattr(self, d) for d in DIMS)

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.pp * self.cp * self.tp

    def coords(self, rank: int) -> dict[str, int]:
        """Global ``rank``'s coordinate along each of ``DIMS``."""
        coords = {}
        for dim, size in reversed(list(zip(DIMS, self.shape, strict=True))):
            rank, coords[dim] = divmod(rank, size)
        return {d: coords[d] for d in DIMS}

    def rank_of(self, coords: dict[str, int]) -> int:
        """The global rank at ``coords`` (dims left out are 0)."""
        rank = 0
        for dim, size in zip(DIMS, self.shape, strict=True):
            rank = rank * size + coords.get(dim, 0)
        return rank

    def group_ranks(self, rank: int, dims: str | tuple[str, ...]) -> tuple[int, ...]:
        """The global ranks that differ from ``rank`` only along ``dims`` (its group there)."""
        dims = (dims,) if isinstance(dims, str) else dims
        members = [self.coords(rank)]
        for dim in dims:
            members = [{**c, dim: i} for c in members for i in range(getattr(self, dim))]
        return tuple(sorted(self.rank_of(c) for c in members))

    @property
    def data_shards(self) -> int:
        """How many different slices of each global batch the ranks read."""
        return self.dp * self.ep

    def data_shard(self, rank: int) -> int:
        """Which slice of the global batch ``rank`` reads."""
        c = self.coords(rank)
        return c["dp"] * self.ep + c["ep"]
