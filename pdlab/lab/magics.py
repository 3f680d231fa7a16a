"""IPython magics: ``%pdlab start|status|restart|stop|script|timeout`` and ``%%ranks``."""

from __future__ import annotations

import argparse
import contextlib
import shlex

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display

from pdlab import checks
from pdlab.control import cluster as cluster_module
from pdlab.control import rich_output
from pdlab.control.cluster import Cluster

USAGE = (
    "usage: %pdlab start N [--backend gloo|nccl] [--device cpu|cuda] | status | restart | stop"
    " | script PATH [ARGS...] | timeout [SECONDS|off]"
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="%pdlab", add_help=False, exit_on_error=False)
    parser.add_argument("command", choices=("start", "status", "restart", "stop"))
    parser.add_argument("world_size", nargs="?", type=int, default=2)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--device", default=None)
    return parser


def parse_ranks(spec: str) -> list[int] | None:
    """``"0,2"`` -> ``[0, 2]``; ``"1-3"`` -> ``[1, 2, 3]``; empty -> all ranks (None)."""
    spec = spec.strip()
    if not spec:
        return None
    ranks: list[int] = []
    for part in spec.split(","):
        first, dash, last = (p.strip() for p in part.partition("-"))
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"can't read ranks {spec!r}: write e.g. %%ranks 0,2 or %%ranks 1-3")
        if int(last or first) < int(first):
            raise ValueError(
                f"ranks {part.strip()!r} name none: write the lower rank first, e.g. 0-1"
            )
        ranks.extend(range(int(first), int(last or first) + 1))
    return ranks


def parse_cell_line(
    line: str, timeout: float | None = None
) -> tuple[list[int] | None, float | None, bool]:
    """``%%ranks``'s line: which ranks (all by default), ``--timeout S`` (``timeout`` when
    not given), ``--tabs``."""
    words = shlex.split(line)
    tabs = "--tabs" in words
    words = [w for w in words if w != "--tabs"]
    if "--timeout" in words:
        at = words.index("--timeout")
        if at + 1 == len(words):
            raise ValueError("write %%ranks --timeout SECONDS, e.g. %%ranks 0,1 --timeout 30")
        timeout = parse_seconds(words[at + 1], "%%ranks --timeout")
        del words[at : at + 2]
    return parse_ranks(" ".join(words)), timeout, tabs


def parse_seconds(word: str, name: str) -> float | None:
    """A timeout typed in a magic: seconds (``checks.timeout``), or ``off`` for none."""
    if word.lower() in ("off", "none"):
        return None
    try:
        seconds = float(word)
    except ValueError:
        raise ValueError(f"{name} takes seconds or 'off', e.g. 30, got {word!r}") from None
    return checks.timeout(seconds, name, no_limit="'off'")


@magics_class
class PdlabMagics(Magics):
    """``%pdlab`` manages the cluster it started (or the current one); ``%%ranks`` runs on
    the most recently started cluster, whichever way it was created."""

    started: Cluster | None = None
    timeout: float | None = None  # %%ranks's default; `%pdlab timeout S` sets it

    @line_magic
    def pdlab(self, line: str) -> None:
        """%pdlab start N [--backend B --device D] | status | restart | stop
        | script PATH [ARGS...] | timeout [SECONDS|off]"""
        words = shlex.split(line)
        if words[:1] == ["script"] and len(words) > 1:
            cluster_module.current().run_script(words[1], *words[2:], timeout=self.timeout)
            return
        if words[:1] == ["timeout"]:
            self._set_timeout(words[1:])
            return
        try:
            args = _parser().parse_args(words)
        except (argparse.ArgumentError, SystemExit):
            print(USAGE)
            return
        if args.command == "start":
            if self.started is not None:
                self.started.shutdown()
            self.started = Cluster(args.world_size, backend=args.backend, device=args.device)
            print(self.started.status())
            return
        cluster = self.started or cluster_module.current()
        if args.command == "status":
            print(cluster.status())
        elif args.command == "restart":
            cluster.restart()
            print(cluster.status())
        else:
            cluster.shutdown()
            self.started = None
            print("pdlab cluster stopped")

    def _set_timeout(self, words: list[str]) -> None:
        if words:
            PdlabMagics.timeout = parse_seconds(words[0], "%pdlab timeout")
        shown = "none" if self.timeout is None else f"{self.timeout:g} s"
        print(f"%%ranks timeout: {shown}")

    @cell_magic
    def ranks(self, line: str, cell: str) -> None:
        """%%ranks [0,2] [--timeout S] [--tabs]: run the cell on those ranks (all by default),
        each in its own namespace. ``--timeout`` (or ``%pdlab timeout S``) stops a cell that
        hangs (``off``: no limit); ``--tabs`` shows each rank's output in a tab of its own."""
        targets, timeout, tabs = parse_cell_line(line, self.timeout)
        cluster = cluster_module.current()
        shown = sorted(set(targets if targets is not None else range(cluster.world_size)))
        view = rich_output.Tabs(shown) if tabs else None
        if view is not None:
            display(view)
        with rich_output.routed(cluster, view) if view else contextlib.nullcontext():
            # One blank line for the %%ranks line: tracebacks give the cell's own line numbers.
            results = cluster.exec("\n" + cell, ranks=targets, timeout=timeout)
        for rank, value in zip(shown, results, strict=True):
            if value is None:
                continue
            if view is not None:
                view.lines(rank, "stdout", [f"Out: {value!r}"])
            else:
                print(f"[rank {rank}] Out: {value!r}")


def register(ipython) -> None:
    ipython.register_magics(PdlabMagics)
