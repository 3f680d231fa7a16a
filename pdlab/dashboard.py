"""A live strategy dashboard: pick a strategy, press Start, watch the ranks train.

    dashboard = pdlab.Dashboard(cluster)
    dashboard                                    # controls and live plots
    dashboard.start(strategy="zero3", steps=30)  # or press Start: returns at once
    dashboard.wait()                             # the run's TrainResult
    dashboard.table()                            # every run so far, one row each

Training runs in a background thread, so the kernel stays free. The ranks' ``pdlab.log``
records arrive through ``cluster.subscribe``; the plots are redrawn from them at most every
``refresh_s`` seconds, in a thread of their own, so drawing never holds a rank up. Stop calls
``cluster.interrupt()``: every rank gets a KeyboardInterrupt, and the steps done so far stay
on the plots. A world size other than the cluster's starts a new cluster of that size
(``dashboard.cluster``) and shuts the old one down. Under the controls, a table says where
each rank's step went (``pdlab.trace.breakdown``); when a step takes far longer than the
recent ones, the dashboard asks the ranks where they are (``cluster.where()``) and says it.
"""

from __future__ import annotations

import contextlib
import html
import statistics
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pdlab import plots
from pdlab.cluster import Cluster
from pdlab.comm import CommEvent
from pdlab.config import TrainConfig, choices
from pdlab.parallel import registry
from pdlab.trace import breakdown
from pdlab.training import TrainResult, expected_comm, results, train, validate

# The controls' first values: TrainConfig's defaults, but a run worth watching (the GPT, a
# batch small enough to step quickly on CPUs, two micro-batches for the pipelines).
START = TrainConfig(strategy="dp", model="gpt", batch_size=16, micro_batches=2)
STOP_RETRY_S = 1.0  # an interrupt that lands between two calls is dropped: send it again
# The plots as (row, col) of one figure: a FigureWidget carries its own copy of plotly.js
# (5 MB) to the browser and into the saved notebook, so the dashboard has just one.
GRID = {"loss": (1, 1), "throughput": (1, 2), "comm": (2, 1), "memory": (2, 2), "timeline": (3, 1)}
WIDTH = 960  # JupyterLab's output area, with the file browser open
QUIET = {"loss"}  # same runs and colors as the throughput plot: its legend is enough
SLOW, SLOW_MIN_S = 10, 2.0  # a step this many times the recent ones (and this long) is stuck?


@dataclass
class SlowStep:
    """Tells when a step takes far longer than the recent ones: ``SLOW`` times their pace,
    and at least ``SLOW_MIN_S``."""

    steps: int = 0
    since: float | None = None  # when ``steps`` were first seen done
    told: bool = False

    def check(self, steps: int, pace: float | None, now: float) -> float | None:
        """The seconds the current step has taken, the first time it is slow against
        ``pace`` (seconds a step; None: not known yet); else None."""
        if self.since is None or steps != self.steps:
            self.steps, self.since, self.told = steps, now, False
            return None
        if self.told or pace is None or now - self.since <= max(SLOW * pace, SLOW_MIN_S):
            return None
        self.told = True
        return now - self.since


@dataclass
class Run:
    """One run started from the dashboard: its records as they stream in, then its result."""

    name: str
    config: TrainConfig
    world_size: int  # the cluster's (``single`` uses rank 0 of it)
    expected: list[CommEvent]
    # Appended by the cluster's reader threads, copied by the painter: both single
    # operations under the GIL, so no lock is needed.
    records: list[dict] = field(default_factory=list)
    status: str = "starting"  # then running, and done, stopped or failed
    result: TrainResult | None = None
    error: BaseException | None = None
    stop_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    slow: SlowStep = field(default_factory=SlowStep)

    @property
    def ranks(self) -> list[int]:
        return [0] if self.config.strategy == "single" else list(range(self.world_size))

    def steps_done(self) -> int:
        """Steps every rank has reported."""
        records = list(self.records)
        return min(sum(rec["rank"] == r for rec in records) for r in self.ranks)

    def pace(self) -> float | None:
        """Median seconds of the last five steps (the slowest rank's), the first step left
        out: it warms up. None before there are any."""
        times: dict[int, float] = {}
        for rec in list(self.records):
            times[rec["step"]] = max(times.get(rec["step"], 0.0), rec["step_time"])
        recent = [times[step] for step in sorted(times)[1:][-5:]]
        return statistics.median(recent) if recent else None

    def snapshot(self) -> TrainResult | None:
        """The result so far, over the steps every rank has reported (None before the first)."""
        if self.result is not None:
            return self.result
        records = list(self.records)
        by_rank = {r: [rec for rec in records if rec["rank"] == r] for r in self.ranks}
        done = min(len(recs) for recs in by_rank.values())
        if done == 0:
            return None
        outputs = [
            {
                "rank": r,
                "records": recs[:done],
                "memory": recs[done - 1]["memory"],
                "state_dict": None,
            }
            for r, recs in by_rank.items()
        ]
        return results(self.config, outputs, self.expected)


def _show(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Copy ``fig``'s traces and layout into a live ``widget``, as one message to the browser.

    Traces change in place when the same ones are there. The template is left out: the
    widget has the same one, and re-validating it would cost most of a second each time.
    """
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    with widget.batch_update():
        if [t.name for t in widget.data] == [t.name for t in fig.data]:
            for old, new in zip(widget.data, fig.data, strict=True):
                old.update(new.to_plotly_json())
        else:
            widget.data = ()
            widget.add_traces(list(fig.data))
        widget.layout.update(layout)


def _combine(figures: dict[str, go.Figure]) -> go.Figure:
    """``figures`` (from ``pdlab.plots``) as the subplots of one figure, each with its legend."""
    grid = make_subplots(
        rows=3,
        cols=2,
        specs=[[{}, {}], [{}, {}], [{"colspan": 2}, None]],
        subplot_titles=[figures[name].layout.title.text for name in GRID],
        vertical_spacing=0.09,
        horizontal_spacing=0.16,  # room for the left plots' legends
    )
    for i, (name, (row, col)) in enumerate(GRID.items(), 1):
        fig, axes = figures[name], grid.get_subplot(row, col)
        legend = "legend" if i == 1 else f"legend{i}"
        grid.add_traces(list(fig.data), rows=row, cols=col)
        for trace in grid.data[len(grid.data) - len(fig.data) :]:
            trace.update(legend=legend, showlegend=name not in QUIET)
        axes.xaxis.title.text = fig.layout.xaxis.title.text
        axes.yaxis.update(
            title_text=fig.layout.yaxis.title.text, autorange=fig.layout.yaxis.autorange
        )
        grid.layout[legend] = {
            "x": axes.xaxis.domain[1] + 0.01,
            "y": axes.yaxis.domain[1],
            "yanchor": "top",
        }
    grid.update_annotations(font_size=13)  # the subplot titles
    # A fixed size: the notebook's output area gives a widget no width to fill.
    grid.update_layout(
        width=WIDTH, height=3 * plots.HEIGHT, barmode="overlay", margin={"t": 40, "b": 40, "r": 180}
    )
    return grid


class Dashboard:
    """Controls to train any strategy on ``cluster``, and plots that update while it runs."""

    def __init__(self, cluster: Cluster | None = None, refresh_s: float = 0.5):
        self.cluster = cluster
        self.refresh_s = refresh_s
        self.runs: list[Run] = []
        self._live: Run | None = None
        self._thread: threading.Thread | None = None
        self._unsubscribe = cluster.subscribe(self._on_record) if cluster else None
        self._build_widgets(cluster.world_size if cluster else 2)

    # ----- widgets ---------------------------------------------------------------------------

    def _build_widgets(self, world_size: int) -> None:
        self.menu = registry.menu()  # "fsdp" is an entry that fixes zero3's impl to torch
        options = {f.name: choices(f) for f in fields(TrainConfig)}
        self.controls: dict[str, widgets.ValueWidget] = {
            "strategy": widgets.Dropdown(
                options=[(entry.label, key) for key, entry in self.menu.items()],
                value=START.strategy,
                description="strategy",
            ),
            "impl": widgets.Dropdown(options=options["impl"], value=START.impl, description="impl"),
            "world_size": widgets.Dropdown(
                options=sorted({1, 2, 4, 8, world_size}), value=world_size, description="ranks"
            ),
            "model": widgets.Dropdown(
                options=options["model"], value=START.model, description="model"
            ),
            "batch_size": widgets.BoundedIntText(
                START.batch_size, min=1, max=4096, description="batch"
            ),
            "micro_batches": widgets.BoundedIntText(
                START.micro_batches,
                min=1,
                max=256,
                description="micro-batches",
                style={"description_width": "initial"},
            ),
            "lr": widgets.BoundedFloatText(
                START.lr, min=1e-6, max=10.0, step=0.001, description="lr"
            ),
            "steps": widgets.BoundedIntText(START.steps, min=1, max=100_000, description="steps"),
        }
        self.controls["strategy"].observe(self._on_strategy, "value")
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(
            description="Stop", button_style="danger", icon="stop", disabled=True
        )
        self.start_button.on_click(lambda _: self._on_start())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = widgets.IntProgress(0, min=0, max=1, description="step 0")
        self.message = widgets.HTML()
        self.breakdown = widgets.HTML()  # where the live (or last) run's steps went, per rank
        before_any_run = {
            "loss": plots.loss({}),
            "throughput": plots.throughput({}),
            "comm": go.Figure(layout_title_text="Communication per step"),
            "memory": go.Figure(layout_title_text="Memory per rank"),
            "timeline": plots.timeline([]),
        }
        self.figure = go.FigureWidget(_combine(before_any_run))
        c = list(self.controls.values())
        self.widget = widgets.VBox(
            [
                widgets.HBox(c[:4]),
                widgets.HBox(c[4:]),
                widgets.HBox([self.start_button, self.stop_button, self.progress]),
                self.message,
                self.breakdown,
                self.figure,
            ]
        )

    def _repr_mimebundle_(self, **kwargs: Any) -> dict | None:
        return self.widget._repr_mimebundle_(**kwargs)

    def _on_strategy(self, change: dict) -> None:
        fixed = self.menu[change["new"]].impl
        if fixed:
            self.controls["impl"].value = fixed
        self.controls["impl"].disabled = fixed is not None

    def _say(self, text: str, error: bool = False) -> None:
        first, _, rest = html.escape(text).partition("\n")
        style = "color:#b00020" if error else ""
        details = f"<details><summary>details</summary><pre>{rest}</pre></details>" if rest else ""
        self.message.value = f"<div style='{style}'><b>{first}</b>{details}</div>"

    # ----- runs ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a run (or the cluster it needs) is starting or training."""
        return self._thread is not None and self._thread.is_alive()

    def config(self) -> TrainConfig:
        """The run the controls describe now (each control is a ``TrainConfig`` field)."""
        values = {name: w.value for name, w in self.controls.items()}
        entry = self.menu[values["strategy"]]
        values["strategy"], values["impl"] = entry.strategy, entry.impl or values["impl"]
        if entry.strategy == "single":
            values["world_size"] = 1
        if not registry.get(entry.strategy).micro_batched:
            values["micro_batches"] = 1  # the control is for pipelines
        return TrainConfig(**values)

    def start(self, **settings: Any) -> Run:
        """Start a run in the background and return at once.

        ``settings`` set controls first: ``strategy`` (a key of ``self.menu``), ``impl``,
        ``world_size``, ``model``, ``batch_size``, ``micro_batches``, ``lr``, ``steps``. A bad
        combination raises ValueError, also shown in the dashboard; nothing starts then.
        """
        if self.running:
            raise RuntimeError("a run is in progress: call stop() or wait() first")
        unknown = set(settings) - set(self.controls)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}: use {list(self.controls)}")
        for name, value in settings.items():
            self.controls[name].value = value
        try:
            config = self.config()
            validate(config)
            expected = expected_comm(config)
        except (ValueError, NotImplementedError) as exc:
            self._say(str(exc), error=True)
            raise
        name = f"#{len(self.runs) + 1} {plots.run_name(config)}"
        run = Run(name, config, self.controls["world_size"].value, expected)
        self.runs.append(run)
        self._live = run
        self.progress.max, self.progress.value = config.steps, 0
        self.progress.description = "step 0"
        self._set_buttons(running=True)
        self._say(f"{run.name}: starting")
        self._thread = threading.Thread(target=self._train, args=(run,), daemon=True)
        self._thread.start()
        return run

    def _on_start(self) -> None:
        # The button has no caller to raise to: start() has shown the error already.
        with contextlib.suppress(ValueError, NotImplementedError, RuntimeError):
            self.start()

    def stop(self) -> None:
        """Stop the run: every rank gets a KeyboardInterrupt; the steps done so far are kept."""
        run, thread = self._live, self._thread
        if run is None or thread is None:
            return
        run.stop_requested = True
        self._say(f"{run.name}: stopping")
        threading.Thread(target=self._interrupt_until_done, args=(thread,), daemon=True).start()

    def _interrupt_until_done(self, thread: threading.Thread) -> None:
        while thread.is_alive():
            if self.cluster is not None:
                self.cluster.interrupt()
            thread.join(STOP_RETRY_S)

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        """Block until the current run ends; its result (partial if stopped), or its error raised."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the run is still going after {timeout} s")
        if not self.runs:
            return None
        run = self.runs[-1]
        if run.error is not None:
            raise run.error
        return run.result

    def table(self) -> pd.DataFrame:
        """Every run with results so far, one row each (a ``pandas.DataFrame``)."""
        return plots.compare({r.name: r.result for r in self.runs if r.result is not None})

    def close(self) -> None:
        """Stop any run, stop listening to the cluster and remove the widgets (not the cluster)."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.widget.close()

    # ----- the background threads ------------------------------------------------------------

    def _train(self, run: Run) -> None:
        done = threading.Event()
        painter = threading.Thread(target=self._paint_until, args=(run, done), daemon=True)
        try:
            cluster = self._cluster_of_size(run.world_size)
            if not run.stop_requested:
                run.status = "running"
                painter.start()
                run.result = train(cluster, run.config)
        except Exception as exc:  # shown in the dashboard, raised again by wait()
            if not run.stop_requested:
                run.error = exc
        finally:
            done.set()
            if painter.is_alive():
                painter.join()
            self._finish(run)

    def _cluster_of_size(self, world_size: int) -> Cluster:
        """The cluster to train on: the current one, or a new one when the size changed."""
        cluster = self.cluster
        if cluster is not None and cluster.world_size == world_size and cluster.state != "stopped":
            return cluster
        if cluster is not None:
            if self._unsubscribe is not None:
                self._unsubscribe()
            cluster.shutdown()
        self._say(f"starting a cluster of {world_size} rank(s)")
        self.cluster = Cluster(world_size)
        self._unsubscribe = self.cluster.subscribe(self._on_record)
        return self.cluster

    def _on_record(self, record: dict) -> None:
        run = self._live
        config = run.config if run is not None else None
        if run is not None and not run.stop_requested and "phase" in record:
            self._say(f"{run.name}: {record['phase']}")  # what the ranks do before step 1
        if (
            config is not None
            and record.get("strategy") == config.strategy
            and record.get("impl") == config.impl
            and "step" in record
        ):
            if not run.records and not run.stop_requested:
                self._say(f"{run.name}: training")
            run.records.append(record)

    def _paint_until(self, run: Run, done: threading.Event) -> None:
        painted, next_paint = 0, 0.0
        while not done.wait(self.refresh_s):
            began = time.monotonic()
            stuck_s = run.slow.check(run.steps_done(), run.pace(), began)
            if stuck_s is not None:
                self._where(run, stuck_s)
            # New records since the last drawing, and drawing (which shares the CPU with the
            # ranks) kept under a fifth of one core.
            if len(run.records) != painted and began >= next_paint:
                painted = len(run.records)
                self._paint(run)
                next_paint = began + 5 * (time.monotonic() - began)

    def _paint(self, run: Run) -> None:
        steps = run.steps_done()
        self.progress.value = steps
        self.progress.description = f"step {steps}"
        current = run.snapshot()
        if current is None:
            return
        results = {r.name: current if r is run else r.result for r in self.runs}
        named = {name: result for name, result in results.items() if result is not None}
        figures = {
            "loss": plots.loss(named),
            "throughput": plots.throughput(named),
            "comm": plots.comm(current),
            "memory": plots.memory(current),
            "timeline": plots.timeline(run.records),
        }
        _show(self.figure, _combine(figures))
        if not current.spans.empty:
            table = breakdown(current).round(2)
            self.breakdown.value = (
                f"<b>Where each rank's step went</b> (ms, {html.escape(run.name)}; "
                "pdlab.trace.breakdown)" + table.to_html()
            )

    def _where(self, run: Run, stuck_s: float) -> None:
        """Say where every rank is when a step takes far longer than the recent ones."""
        where = self.cluster.where()
        self._say(
            f"{run.name}: step {run.slow.steps + 1} has taken {stuck_s:.0f} s, far longer than "
            f"the last ones: {where.summary()}\n{where}"
        )

    def _finish(self, run: Run) -> None:
        if run.result is None:
            run.result = run.snapshot()  # stopped or failed: keep the steps done
        run.status = "failed" if run.error else "stopped" if run.stop_requested else "done"
        self._paint(run)
        seconds = time.monotonic() - run.started
        if run.error is not None:
            self._say(f"{run.name} failed: {run.error}", error=True)
        else:
            loss = f", loss {run.result.final_loss:.4f}" if run.result is not None else ""
            self._say(
                f"{run.name} {run.status} after {run.steps_done()} step(s){loss}, {seconds:.1f} s"
            )
        self._live = None
        self._set_buttons(running=False)

    def _set_buttons(self, running: bool) -> None:
        self.start_button.disabled = running
        self.stop_button.disabled = not running
