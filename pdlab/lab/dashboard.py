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
each rank's step went (``pdlab.measure.trace.breakdown``); when a step takes far longer than the
recent ones, the dashboard asks the ranks where they are (``cluster.where()``) and says it.

The cluster control says what a run costs elsewhere: this machine, a link (its ranks emulate
it, ``pdlab.cost.emulation``, unless "emulate" is off) or a GPU cluster. Each run's steps are
predicted there as they come in (``pdlab.predict``, from the run's compute and exact ops): the
throughput plot shows them dotted beside the measured ones, and a bar a run splits the
predicted step into compute, exposed communication and bubble. A prediction here, or on a
link, adds this machine's transport, measured once a cluster (``calibrate``) after its first
run, so that Start trains at once: that run is predicted whole when it ends.

The dashboard owns the clusters it starts: ``close()`` stops its run and shuts them down
(the controls stay: Start then starts a fresh cluster), and a new ``Dashboard`` closes the
ones before it, so re-running a notebook never leaves an old dashboard's ranks behind.

``live(control, draw)`` is the same idea for one figure: a control above a figure that
``draw(value)`` redraws, with any error it hits shown beside the control.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import html
import json
import statistics
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from plotly.basedatatypes import Undefined
from plotly.subplots import make_subplots

from pdlab.control.cluster import Cluster
from pdlab.cost import emulation
from pdlab.cost.calibration import Calibration, calibrate, under_load
from pdlab.cost.predictor import BAND_TOP, predict
from pdlab.cost.topology import THIS_MACHINE
from pdlab.lab import plots
from pdlab.measure.comm import CommEvent
from pdlab.measure.trace import breakdown
from pdlab.training import registry
from pdlab.training.config import TrainConfig, choices
from pdlab.training.loop import TrainResult, expected_comm, results, train, validate

# The controls' first values: TrainConfig's defaults, but a run worth watching (the GPT, a
# batch small enough to step quickly on CPUs, two micro-batches for the pipelines) and long
# enough to watch and to stop (a GPT step takes some 20-100 ms on a laptop's CPUs).
START = TrainConfig(strategy="dp", model="gpt", batch_size=16, micro_batches=2, steps=300)
STOP_RETRY_S = 1.0  # an interrupt that lands between two calls is dropped: send it again
# A rank's first run imports pdlab.training.loop (and pandas): an interrupt landing inside an import
# leaves that module half-imported in the rank for good. Stop waits for the first step that
# long at most (a run that hangs before it must still stop).
FIRST_STEP_WAIT_S = 30.0
FIRST_POINT_S = 0.02  # how often the painter looks for a run's first step
# The plots as (row, col) of one figure: a FigureWidget carries its own copy of plotly.js
# (5 MB) to the browser and into the saved notebook, so the dashboard has just one.
GRID = {
    "loss": (1, 1),
    "throughput": (1, 2),
    "comm": (2, 1),
    "memory": (2, 2),
    "timeline": (3, 1),
    "where": (4, 1),
}
# The clusters a run is predicted on: this machine, links its ranks can also emulate, and GPU
# clusters (pdlab.cost.topology presets) whose compute is predicted from the run's FLOPs.
CLUSTERS = {
    "this machine": THIS_MACHINE,
    "100 Mbit/s link": "100Mbit/s",
    "1 GbE": "eth1",
    "10 GbE": "eth10",
    "8xH100 (NVLink)": "8xH100",
    "2x8xH100 (InfiniBand)": "2x8xH100-ib-ndr400",
}
# JupyterLab's output area in a 1280-pixel window with the file browser open is 848 pixels
# (measured in the browser test); a widget there has no width to fill, so the figure is fixed.
WIDTH = 820
MARGIN = {"t": 40, "b": 40, "l": 55, "r": 150}  # the right one holds the legends
QUIET = {"loss"}  # same runs and colors as the throughput plot: its legend is enough
# Runs plotted at once: the latest ones. With more, a repaint took seconds (every run redrawn)
# and legends overlapped; ``Dashboard.table()`` keeps every run.
PLOTTED_RUNS = 8
REPAINT_S = 0.8  # the longest a running run's plot waits for new steps to show
LEGEND_FONT = 10
_dashboards: weakref.WeakSet[Dashboard] = weakref.WeakSet()  # every open dashboard
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
    expected: list[CommEvent] = field(default_factory=list)  # once the cluster's backend is known
    backend: str = "gloo"  # the cluster's
    # Appended by the cluster's reader threads, copied by the painter: both single
    # operations under the GIL, so no lock is needed.
    records: list[dict] = field(default_factory=list)
    status: str = "starting"  # then running, and done, stopped or failed
    result: TrainResult | None = None
    error: BaseException | None = None
    stop_requested: bool = False
    started: float = field(default_factory=time.monotonic)
    slow: SlowStep = field(default_factory=SlowStep)
    cluster: str = THIS_MACHINE  # where its steps are predicted (a CLUSTERS value)
    calibration: Calibration | None = None  # this machine's, to predict a link here
    prediction: pd.DataFrame | None = None  # ``pdlab.predict``'s rows for the steps so far
    prediction_error: str = ""

    @property
    def measures_here(self) -> bool:
        """Whether its prediction adds this machine's transport (a prediction here, or on a
        link its ranks emulate): it needs a ``calibration``."""
        return self.config.world_size > 1 and (
            self.cluster == THIS_MACHINE or _emulable(self.cluster)
        )

    def predict(self, current: TrainResult) -> None:
        """Predict the steps of ``current`` not predicted yet (each step is predicted alone);
        none before its ``calibration`` is there, when it needs one."""
        if self.prediction_error or (self.measures_here and self.calibration is None):
            return
        done = -1 if self.prediction is None else int(self.prediction.step.max())
        if current.ranks.step.max() <= done:
            return
        new = replace(
            current,
            ranks=current.ranks[current.ranks.step > done],
            comm=current.comm[current.comm.step > done],
        )
        target = None if self.cluster == THIS_MACHINE else self.cluster
        try:
            fresh = predict(new, target, calibration=self.calibration)
            if self.cluster == THIS_MACHINE and self.config.link is None:
                fresh = with_band(fresh, new, under_load(current, self.calibration), self.calibration)  # fmt: skip
        except Exception as exc:  # the run goes on; the status line says why there is none
            self.prediction_error = f"{type(exc).__name__}: {exc}"
            return
        if self.prediction is not None:
            fresh = pd.concat([self.prediction, fresh], ignore_index=True)
            fresh.attrs.update(self.prediction.attrs)
        self.prediction = fresh

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
        return results(self.config, outputs, self.expected, self.backend)


Figure = dict[str, Any]  # {"data": [trace, ...], "layout": {...}}: plain values, as plotly.js takes


class LiveFigure(go.FigureWidget):
    """A ``FigureWidget`` that a thread other than the kernel's may repaint.

    The browser answers each change with the defaults plotly.js filled in; the kernel's thread
    applies them to the trace it looks up by index, and a repaint that replaced the traces
    meanwhile made that raise IndexError into JupyterLab's log console. Each browser message
    and each repaint (``_show``) hold one lock: a late answer then finds its change superseded
    and is dropped whole.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._painting = threading.RLock()

    def _handle_msg(self, msg: dict) -> None:
        with self._painting:
            super()._handle_msg(msg)


def _show(widget: LiveFigure, fig: Figure) -> None:
    """Put ``fig`` in a live ``widget``, as one message to the browser.

    When the widget has the same traces (by name), they and the layout change in place as
    plain values (``plotly_update``, which sends only what changed): plotly's objects would
    validate every property again, which was most of a repaint. The template is left out:
    the widget has it.
    """
    data = fig["data"]
    layout = {key: value for key, value in fig["layout"].items() if key != "template"}
    with widget._painting:
        shown = [trace.to_plotly_json() for trace in widget.data]
        if [(t.get("type"), t.get("name")) for t in shown] != [
            (t.get("type", "scatter"), t.get("name")) for t in data
        ]:
            with widget.batch_update():
                widget.data = ()
                widget.add_traces(data)
                widget.layout.update(layout)
            return
        # Per trace: its new value, None to take away one it no longer has, else Undefined
        # (plotly's "leave it"; a bar's property is no scatter's). Not the uid, the widget's
        # name for the trace, by which the browser reports changes to it.
        keys = {key for trace in [*shown, *data] for key in trace} - {"uid"}
        pairs = list(zip(shown, data, strict=True))
        restyle = {
            key: [new.get(key, None if key in old else Undefined) for old, new in pairs]
            for key in keys
        }
        widget.plotly_update(restyle, _paths(layout), list(range(len(data))))


def _paths(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``values`` as plotly key paths (``{"xaxis.title.text": ...}``): a relayout sets those
    alone, so what the browser changed and the figure does not set (a zoom) stays."""
    paths = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            paths.update(_paths(value, f"{prefix}{key}."))
        else:
            paths[prefix + key] = value
    return paths


@functools.cache
def _grid() -> Figure:
    """The empty subplot grid's layout: the axes' domains and anchors, the titles' places.
    The same at every paint, where ``make_subplots`` took a fifth of one."""
    grid = make_subplots(
        rows=4,
        cols=2,
        specs=[[{}, {}], [{}, {}], [{"colspan": 2}, None], [{"colspan": 2}, None]],
        subplot_titles=list(GRID),
        vertical_spacing=0.08,
        horizontal_spacing=0.33,  # room for the left plots' legends and the right ones' ticks
    )
    layout = grid.layout.to_plotly_json()
    layout.pop("template", None)
    return json.loads(json.dumps(layout))  # lists, not tuples: how a widget keeps them


def _set(target: dict, **values: Any) -> None:
    """``target.update(values)``, leaving out the values that are None (unset)."""
    target.update({key: value for key, value in values.items() if value is not None})


def _combine(figures: dict[str, go.Figure]) -> Figure:
    """``figures`` (from ``pdlab.lab.plots``) as the subplots of one figure, each with its
    legend; ``go.Figure`` takes it as it is."""
    layout = copy.deepcopy(_grid())
    data = []
    for i, (name, title) in enumerate(zip(GRID, layout["annotations"], strict=True), 1):
        fig, suffix = figures[name], "" if i == 1 else str(i)
        legend = f"legend{suffix}"
        for trace in fig.data:
            data.append(trace.to_plotly_json())
            data[-1].update(
                xaxis=f"x{suffix}",
                yaxis=f"y{suffix}",
                legend=legend,
                showlegend=name not in QUIET and trace.showlegend is not False,
            )
        xaxis, yaxis = layout[f"xaxis{suffix}"], layout[f"yaxis{suffix}"]
        x_range = fig.layout.xaxis.range  # a tuple, where a widget keeps a list
        _set(xaxis, title={"text": fig.layout.xaxis.title.text}, range=x_range and list(x_range))
        _set(
            yaxis, title={"text": fig.layout.yaxis.title.text}, autorange=fig.layout.yaxis.autorange
        )
        yaxis["type"] = fig.layout.yaxis.type  # None takes a log axis back to plotly's choice
        title.update(text=fig.layout.title.text, font={"size": 12})
        layout[legend] = {
            "x": xaxis["domain"][1] + 0.01,
            "y": yaxis["domain"][1],
            "yanchor": "top",
            "font": {"size": LEGEND_FONT},
        }
    layout.update(
        width=WIDTH,
        height=4 * plots.HEIGHT,
        barmode="overlay",
        margin=MARGIN,
        # The Gantt labels that fit; always a key, so a repaint takes an earlier one away.
        uniformtext=figures["timeline"].layout.uniformtext.to_plotly_json() or None,
    )
    return {"data": data, "layout": layout}


def _message(text: str, error: bool = False) -> str:
    """``text`` as the HTML of a status line: its first line in bold (red for an error), the
    rest (a traceback) folded under "details"."""
    if not text:
        return ""
    first, _, rest = html.escape(text).partition("\n")
    style = "color:#b00020" if error else ""
    details = f"<details><summary>details</summary><pre>{rest}</pre></details>" if rest else ""
    return f"<div style='{style}'><b>{first}</b>{details}</div>"


def live(
    control: widgets.ValueWidget,
    draw: Callable[[Any], go.Figure],
    first: go.Figure | None = None,
) -> widgets.VBox:
    """``control`` above a figure that ``draw(control.value)`` redraws whenever it changes
    (``first``: the figure to show until then, if it is drawn already).

    What ``draw`` raises shows in red beside the control, with its traceback under "details"
    (a callback's errors would otherwise go only to JupyterLab's hidden log console); the last
    figure stays. While ``draw`` runs, the line says so.
    """
    figure = LiveFigure(draw(control.value) if first is None else first)
    status = widgets.HTML()

    def redraw(change: dict) -> None:
        status.value = _message(f"drawing {control.description} = {change['new']} ...")
        try:
            fresh = draw(change["new"])
        except Exception as exc:
            status.value = _message(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", True)
            return
        _show(figure, fresh.to_plotly_json())
        status.value = ""

    control.observe(redraw, "value")
    return widgets.VBox([widgets.HBox([control, status]), figure])


class Dashboard:
    """Controls to train any strategy on ``cluster``, and plots that update while it runs."""

    _error_shown = False  # the status line shows an error (cleared when a control changes)

    def __init__(self, cluster: Cluster | None = None, refresh_s: float = 0.5):
        for earlier in list(_dashboards):  # re-running the cell that made one
            earlier.close()
        _dashboards.add(self)
        self.cluster = cluster
        self.refresh_s = refresh_s
        self.runs: list[Run] = []
        self.started: list[Cluster] = []  # the clusters this dashboard started: it owns them
        self._live: Run | None = None
        self._thread: threading.Thread | None = None
        self._calibrated: tuple[Cluster, Calibration] | None = None
        self._unsubscribe = cluster.subscribe(self._on_record) if cluster else None
        self._build_widgets(cluster.world_size if cluster else 2)

    # ----- widgets ---------------------------------------------------------------------------

    def _build_widgets(self, world_size: int) -> None:
        self.menu = registry.menu()  # "fsdp" is an entry that fixes zero3's impl to torch
        options = {f.name: choices(f) for f in fields(TrainConfig)}
        # Labels of one width, boxes of one width (the menu wider), so that they wrap as a grid.
        size = {"layout": {"width": "185px"}, "style": {"description_width": "95px"}}
        self.controls: dict[str, widgets.ValueWidget] = {
            "strategy": widgets.Dropdown(
                options=[(entry.label, key) for key, entry in self.menu.items()],
                value=START.strategy,
                description="strategy",
                **(size | {"layout": {"width": "265px"}}),
            ),
            "impl": widgets.Dropdown(
                options=options["impl"], value=START.impl, description="impl", **size
            ),
            "world_size": widgets.Dropdown(
                options=sorted({1, 2, 4, 8, world_size}),
                value=world_size,
                description="ranks",
                **size,
            ),
            "model": widgets.Dropdown(
                options=options["model"], value=START.model, description="model", **size
            ),
            "batch_size": widgets.BoundedIntText(
                START.batch_size, min=1, max=4096, description="batch", **size
            ),
            "micro_batches": widgets.BoundedIntText(
                START.micro_batches, min=1, max=256, description="micro-batches", **size
            ),
            "virtual_stages": widgets.BoundedIntText(
                1,
                min=1,
                max=16,
                description="virtual stages",
                **size,  # set by _on_strategy
            ),
            "recompute": widgets.Dropdown(
                options=options["recompute"], value=START.recompute, description="recompute", **size
            ),
            "precision": widgets.Dropdown(
                options=options["precision"], value=START.precision, description="precision", **size
            ),
            "lr": widgets.BoundedFloatText(
                START.lr, min=1e-6, max=10.0, step=0.001, description="lr", **size
            ),
            "steps": widgets.BoundedIntText(
                START.steps, min=1, max=100_000, description="steps", **size
            ),
            "cluster": widgets.Dropdown(
                options=list(CLUSTERS.items()),
                value=THIS_MACHINE,
                description="cluster",
                **(size | {"layout": {"width": "265px"}}),
            ),
            "emulate": widgets.Checkbox(
                True, description="emulate its link", disabled=True, **size, indent=False
            ),
        }
        self.controls["strategy"].observe(self._on_strategy, "value")
        self._on_strategy({"new": START.strategy})
        self.controls["cluster"].observe(self._on_cluster, "value")
        for control in self.controls.values():
            control.observe(self._on_change, "value")
        self.start_button = widgets.Button(description="Start", button_style="success", icon="play")
        self.stop_button = widgets.Button(
            description="Stop", button_style="danger", icon="stop", disabled=True
        )
        self.start_button.on_click(lambda _: self._on_start())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = widgets.IntProgress(0, min=0, max=1, description="step 0")
        self.message = widgets.HTML()
        # Where the live (or last) run's steps went, per rank: as wide as the output area.
        self.breakdown = widgets.HTML(layout={"width": "100%"})
        before_any_run = {
            "loss": plots.loss({}),
            "throughput": plots.throughput({}),
            "comm": go.Figure(layout_title_text="Communication per step"),
            "memory": go.Figure(layout_title_text="Memory per rank"),
            "timeline": plots.timeline([]),
            "where": plots.where_time_goes({}),
        }
        self.figure = LiveFigure(_combine(before_any_run))
        self.widget = widgets.VBox(
            [
                widgets.Box(list(self.controls.values()), layout={"flex_flow": "row wrap"}),
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
        # Model chunks a rank, as the registry says: shown where the learner has a choice
        # (interleaved 1F1B: 2 or more), its fixed count otherwise (ZBV: 2), hidden at one.
        least, most = registry.get(self.menu[change["new"]].strategy).chunks
        chunks = self.controls["virtual_stages"]
        chunks.value, chunks.disabled = least, least == most
        chunks.layout.display = None if most != 1 else "none"

    def _on_cluster(self, change: dict) -> None:
        self.controls["emulate"].disabled = not _emulable(change["new"])

    def _on_change(self, change: dict) -> None:
        if self._error_shown and not self.running:
            self._say("")  # the controls changed: the error was about the old ones

    def _say(self, text: str, error: bool = False) -> None:
        self.message.value = _message(text, error)
        self._error_shown = error

    # ----- runs ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a run (or the cluster it needs) is starting or training."""
        return self._thread is not None and self._thread.is_alive()

    def config(self) -> TrainConfig:
        """The run the controls describe now (the controls but cluster and emulate are
        ``TrainConfig`` fields; those two set its ``link``)."""
        values = {name: w.value for name, w in self.controls.items()}
        cluster, emulate = values.pop("cluster"), values.pop("emulate")
        values["link"] = cluster if emulate and _emulable(cluster) else None
        entry = self.menu[values["strategy"]]
        values["strategy"], values["impl"] = entry.strategy, entry.impl or values["impl"]
        if entry.strategy == "single":
            values["world_size"] = 1
        if not registry.get(entry.strategy).micro_batched:
            values["micro_batches"] = 1  # the control is for pipelines
        if self.controls["virtual_stages"].disabled:
            values["virtual_stages"] = None  # what the schedule needs
        return TrainConfig(**values)

    def start(self, **settings: Any) -> Run:
        """Start a run in the background and return at once.

        ``settings`` set controls first: ``strategy`` (a key of ``self.menu``), ``impl``,
        ``world_size``, ``model``, ``batch_size``, ``micro_batches``, ``virtual_stages``
        (pp-interleaved), ``recompute``, ``precision``, ``lr``, ``steps``,
        ``cluster`` (a value of ``CLUSTERS``: where the steps are predicted) and ``emulate``
        (a link cluster: whether the ranks emulate it). A bad combination raises ValueError,
        also shown in the dashboard; nothing starts then.
        """
        if self.running:
            raise RuntimeError("a run is in progress: call stop() or wait() first")
        unknown = set(settings) - set(self.controls)
        if unknown:
            raise TypeError(f"unknown setting(s) {sorted(unknown)}: use {list(self.controls)}")
        # The strategy first: choosing it resets virtual_stages.
        for name, value in sorted(settings.items(), key=lambda item: item[0] != "strategy"):
            self.controls[name].value = value
        target = self.controls["cluster"].value
        try:
            config = self.config()
            validate(config)
        except (ValueError, NotImplementedError) as exc:
            self._say(str(exc), error=True)
            raise
        # Where it is predicted, unless its label says the link it emulates ("@100Mbit/s").
        elsewhere = target != THIS_MACHINE and config.link is None
        on = f" → {_cluster_name(target)}" if elsewhere else ""
        name = f"#{len(self.runs) + 1} {config.label}{on}"
        run = Run(name, config, self.controls["world_size"].value, cluster=target)
        self.runs.append(run)
        self._live = run
        self.progress.max, self.progress.value = config.steps, 0
        self.progress.description = "step 0"
        self._set_buttons(running=True)
        self._say(f"{run.name} starting")
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
        self._say(f"{run.name} stopping after step {run.steps_done()}")
        threading.Thread(target=self._interrupt_until_done, args=(run, thread), daemon=True).start()

    def _interrupt_until_done(self, run: Run, thread: threading.Thread) -> None:
        patience = time.monotonic() + FIRST_STEP_WAIT_S
        while thread.is_alive():
            training = run.records or time.monotonic() > patience
            if training and self.cluster is not None:
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

    def snapshot(self) -> go.Figure:
        """The plots as the latest run with a step left them, as a plain figure: unlike the
        live one, it stays in a saved notebook and in its HTML (a handout: ``make handouts``).

        Drawn again from the runs, not copied from the live figure, whose Python side the
        browser's messages may change while the painter thread draws.
        """
        for run in reversed(self.runs):
            if (current := run.snapshot()) is not None:
                return go.Figure(self._plots(run, current))
        return go.Figure(self.figure)  # no run yet: the empty plots

    def table(self) -> pd.DataFrame:
        """Every run with results so far, one row each (a ``pandas.DataFrame``)."""
        return plots.compare({r.name: r.result for r in self.runs if r.result is not None})

    def close(self) -> None:
        """Stop any run and shut down every cluster this dashboard started (a cluster you gave
        it is yours to shut down). The controls stay: Start then starts a fresh cluster."""
        self.stop()
        if self._thread is not None:
            self._thread.join()
        for cluster in self.started:
            cluster.shutdown()
        self.started = []
        if self.cluster is not None and self.cluster.state == "stopped":
            self._unsubscribe_now()

    # ----- the background threads ------------------------------------------------------------

    def _train(self, run: Run) -> None:
        done = threading.Event()
        painter = threading.Thread(target=self._paint_until, args=(run, done), daemon=True)
        try:
            cluster = self._cluster_of_size(run.world_size)
            run.expected = expected_comm(run.config, cluster.backend)
            run.backend = cluster.backend
            calibrated = self._calibrated is not None and self._calibrated[0] is cluster
            if run.measures_here and calibrated:
                run.calibration = self._calibrated[1]
            if not run.stop_requested:
                run.status = "running"  # the ranks say their phases, then the line counts steps
                painter.start()
                run.result = train(cluster, run.config)
            if run.measures_here and not calibrated and not run.stop_requested:
                # A cluster's first run trains first, as Start to the first point is what a
                # learner waits for; its steps are predicted at its last paint, measured then.
                run.calibration = self._calibration(cluster)
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
            self._unsubscribe_now()
            cluster.shutdown()
        self._say(f"starting a cluster of {world_size} rank(s)")
        self.cluster = Cluster(world_size)
        self.started = [c for c in self.started if c.state != "stopped"] + [self.cluster]
        self._unsubscribe = self.cluster.subscribe(self._on_record)
        return self.cluster

    def _calibration(self, cluster: Cluster) -> Calibration:
        """This machine's link and matmul rate, measured once a cluster (about a second),
        after the cluster's first run: a prediction here, or on a link its ranks emulate, adds
        this machine's transport."""
        if self._calibrated is None or self._calibrated[0] is not cluster:
            self._say(
                f"measuring this machine's link and compute on {cluster.world_size} ranks, "
                "to predict the run"
            )
            self._calibrated = (cluster, calibrate(cluster))
        return self._calibrated[1]

    def _unsubscribe_now(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

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
        painted, next_paint, shown, wait = 0, 0.0, False, FIRST_POINT_S
        while not done.wait(wait):
            began = time.monotonic()
            stuck_s = run.slow.check(run.steps_done(), run.pace(), began)
            if stuck_s is not None:
                self._where(run, stuck_s)
            # New records since the last drawing, at most every ``refresh_s``, and drawing
            # (which shares the CPU with the ranks) kept under a fifth of one core, unless that
            # leaves the plot older than ``REPAINT_S``: with 20 runs a paint took 0.45 s, and
            # the plot stood still 2.6 s.
            if len(run.records) != painted and began >= next_paint:
                painted, shown = len(run.records), run.steps_done() > 0
                self._paint(run)
                paint_s = time.monotonic() - began
                next_paint = began + max(self.refresh_s, min(5 * paint_s, REPAINT_S))
            # Look again when the next paint is due, not a ``refresh_s`` later (which left
            # the plot 1.4 s old); with none due, often until the first step is on the plot
            # (what a learner waits for after Start), then every ``refresh_s``.
            now = time.monotonic()
            wait = (
                next_paint - now if next_paint > now else self.refresh_s if shown else FIRST_POINT_S
            )

    def _paint(self, run: Run) -> None:
        steps = run.steps_done()
        self.progress.value = steps
        self.progress.description = f"step {steps}"
        if run.status == "running" and not run.stop_requested:
            self._say(f"{run.name} running: step {steps} of {run.config.steps}")
        current = run.snapshot()
        if current is None:
            return
        run.predict(current)
        _show(self.figure, self._plots(run, current))
        # At the run's end only: over a run's steps it took a fifth of a repaint's time.
        if run.status not in ("starting", "running") and not current.spans.empty:
            table = breakdown(current).round(2).reset_index().to_html(index=False)
            # Small, and scrolled rather than cut where the output area is narrow.
            self.breakdown.value = (
                f"<b>Where each rank's step went</b> (ms, {html.escape(run.name)}; "
                f"pdlab.measure.trace.breakdown)<div style='overflow-x:auto;font-size:12px'>{table}</div>"
            )

    def _plots(self, run: Run, current: TrainResult) -> Figure:
        """The plots with ``run`` as the current run, ``current`` its result so far."""
        shown = [r for r in self.runs[-PLOTTED_RUNS:] if r is not run] + [run]
        results = {r.name: current if r is run else r.result for r in shown}
        named = {name: result for name, result in results.items() if result is not None}
        predicted = [r for r in shown if r.prediction is not None]
        # The latest pipeline run's steps: a run of another strategy has no timeline.
        piped = next((r for r in reversed(shown) if plots.timeline_records(r.records)), run)
        timeline = plots.timeline(piped.records, plot_width_px=WIDTH - MARGIN["l"] - MARGIN["r"])
        if piped.records:
            timeline.update_layout(title=f"{piped.name}: {timeline.layout.title.text}")
        here = " → this machine"  # other runs' names say where they are predicted
        figures = {
            "loss": plots.loss(named),
            "throughput": plots.throughput(named, {r.name: r.prediction for r in predicted}),
            "comm": plots.comm(current),
            "memory": plots.memory(current),
            # A moe run has no pipeline timeline: its panel shows the tokens per expert.
            "timeline": plots.experts(current) if len(current.routing) else timeline,
            "where": plots.where_time_goes(
                {r.name + here * (r.cluster == THIS_MACHINE): r.prediction for r in predicted}
            ),
        }
        if len(self.runs) > PLOTTED_RUNS:
            figures["throughput"].update_layout(
                title=f"{figures['throughput'].layout.title.text}, last {PLOTTED_RUNS} runs"
            )
        return _combine(figures)

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
            why = f"\nno prediction on {run.cluster}: {run.prediction_error}"
            self._say(
                f"{run.name} {run.status} after {run.steps_done()} step(s){loss}, {seconds:.1f} s"
                + (why if run.prediction_error else "")
            )
        self._live = None
        self._set_buttons(running=False)

    def _set_buttons(self, running: bool) -> None:
        self.start_button.disabled = running
        self.stop_button.disabled = not running


def with_band(
    predicted: pd.DataFrame, run: TrainResult, loaded: Calibration, idle: Calibration
) -> pd.DataFrame:
    """``predicted`` (``run``'s steps on this machine, ``idle`` its calibration) with the top
    of its band: the steps predicted again on this machine's transport as the run's
    collectives met it (``loaded``, ``under_load``: on a busy machine a message also waits for
    its peer's thread to get a core, which an idle calibration never sees), its ranks
    beginning each step as far apart as they did (``BAND_TOP``). ``*_loaded``
    columns; none where the run met the idle link (or has no collectives: a pipeline)."""
    if loaded is idle:
        return predicted
    top = predict(run, None, calibration=loaded, assumptions=BAND_TOP)
    return predicted.assign(
        step_time_loaded=top.step_time.to_numpy(), samples_per_s_loaded=top.samples_per_s.to_numpy()
    )


def _cluster_name(cluster: str) -> str:
    """A ``CLUSTERS`` value as its menu shows it ("8xH100 (NVLink)")."""
    return next((name for name, value in CLUSTERS.items() if value == cluster), cluster)


def _emulable(cluster: str) -> bool:
    """Whether ``cluster`` (a ``CLUSTERS`` value) is a link this machine's ranks can emulate."""
    if cluster == THIS_MACHINE:
        return False
    try:
        emulation.parse(cluster)
    except ValueError:
        return False
    return True
