"""Plotly figures of training runs: small pure functions, one question each.

Runs are ``pdlab.train`` results (``TrainResult``); several overlay as one trace each::

    runs = [pdlab.train(cluster, strategy=s, model="gpt") for s in ("dp", "zero3")]
    plots.loss(runs)              # loss vs step, one line per run
    plots.comm(runs[1])           # bytes each rank sends a step: by op, formula, on the wire
    plots.timeline(result.timeline)   # the last pipeline step, F/B per rank
    plots.experts(moe_run)        # tokens per expert a step (model="moe")

Every function returns a ``go.Figure``; ``go.FigureWidget(fig)`` makes it live. Bars are
placed and stacked explicitly (``offset``, ``base``), not by the figure-wide ``barmode``, so
the figures also combine as subplots of one figure (what the dashboard shows). Each quantity
has one colour on every figure and in every run (``COLORS``, ``OP_COLORS``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from pandas.io.formats.style import Styler

from pdlab.cost.planner import describe
from pdlab.measure.comm import CommEvent
from pdlab.training.loop import TrainResult
from pdlab.training.parallel.pipeline import BUBBLE, analytic_bubble, bubble_fraction

Runs = Mapping[str, TrainResult] | Iterable[TrainResult]  # named runs, or names made up

HEIGHT = 300
SPREAD = 30  # values further apart than this share an axis only on a log scale
RUN_COLORS = px.colors.qualitative.Plotly  # run i has the same color on every plot
# Runs that coincide (a strategy and one process) stay visible: each run its own dash and
# marker. Dotted lines are predictions, so no run is drawn dotted.
RUN_DASHES = ("solid", "dash", "longdash", "dashdot")
PREDICTED = {"dash": "dot", "width": 3}
RUN_MARKERS = ("circle-open", "x", "diamond-open", "square-open", "cross", "triangle-up-open")
PHASE_COLORS = {"F": "#4C78A8", "B": "#F58518", "W": "#54A24B"}
MEMORY_PARTS = {
    "param_bytes": ("parameters", "#4C78A8"),
    "grad_bytes": ("gradients", "#F58518"),
    "optimizer_bytes": ("optimizer state", "#54A24B"),
}
OP_COLORS = {
    "all_reduce": "#4C78A8",
    "reduce_scatter": "#F58518",
    "all_gather": "#54A24B",
    "broadcast": "#B279A2",
    "send": "#E45756",
    "reduce": "#72B7B2",
    "gather": "#9D755D",
    "scatter": "#FF9DA6",
    "all_to_all": "#EECA3B",
}
GROUP_PATTERNS = {"dp": "", "tp": "/", "pp": "x", "world": "."}  # the same op on two groups
COLORS = {"wire": "#555555", "formula": "#000000", "received": "#BAB0AC"}
# Where a step's time goes, measured (``breakdown``) or predicted (``where_time_goes``).
TIME_COLORS = {"compute": "#4C78A8", "exposed": "#E45756", "waiting": "#BAB0AC"}


def _named(runs: Runs) -> dict[str, TrainResult]:
    if isinstance(runs, Mapping):
        return dict(runs)
    named: dict[str, TrainResult] = {}
    for i, result in enumerate(runs, 1):
        name = result.config.label
        named[f"{name} ({i})" if name in named else name] = result
    return named


def _figure(title: str, xaxis: str, yaxis: str, **layout: Any) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        xaxis_title=xaxis,
        yaxis_title=yaxis,
        height=HEIGHT,
        margin={"l": 60, "r": 20, "t": 40, "b": 40},
        barmode="overlay",
        **layout,
    )
    return fig


def _per_step(
    runs: Runs,
    column: str,
    title: str,
    yaxis: str,
    predicted: Mapping[str, pd.DataFrame] | None = None,
    unit: str = "",
) -> go.Figure:
    fig = _figure(title, "step", yaxis)
    predicted = predicted or {}
    hover = f"%{{fullData.name}}<br>step %{{x}}: %{{y:.3s}} {unit}<extra></extra>"
    for i, (name, result) in enumerate(_named(runs).items()):
        steps, color = result.steps, RUN_COLORS[i % len(RUN_COLORS)]
        fig.add_scatter(
            x=steps.step,
            y=steps[column],
            name=name,
            legendgroup=name,
            mode="lines+markers",
            line={"color": color, "dash": RUN_DASHES[i % len(RUN_DASHES)]},
            marker={"symbol": RUN_MARKERS[i % len(RUN_MARKERS)], "size": max(4, 10 - 2 * i)},
            hovertemplate=hover,
        )
        if (table := predicted.get(name)) is not None and not table.empty:
            fig.add_scatter(
                x=table.step,
                y=table[column],
                name=f"{name}, predicted on {table.attrs.get('target', '?')}",
                legendgroup=name,  # shown and hidden with its run, whose legend entry it shares
                showlegend=False,
                mode="lines",
                line={"color": color, **PREDICTED},
                opacity=0.6,
                hovertemplate=hover,
            )
            if f"{column}_loaded" in table:  # the band up to this machine's transport as loaded
                fig.add_scatter(
                    x=table.step,
                    y=table[f"{column}_loaded"],
                    name=f"{name}, predicted with the run's own transport",
                    legendgroup=name,
                    showlegend=False,
                    mode="lines",
                    line={"color": color, "width": 0},
                    fill="tonexty",  # to the prediction just drawn
                    opacity=0.4,
                    hovertemplate=hover,
                )
    if any(trace.showlegend is False for trace in fig.data):  # one entry says what dots mean
        fig.add_scatter(
            x=[None], y=[None], mode="lines", name="predicted", line={"color": "gray", **PREDICTED}
        )
    return fig


def loss(runs: Runs) -> go.Figure:
    """Training loss vs step, one trace per run (same seed and data: strategies overlay)."""
    return _per_step(runs, "loss", "Loss", "loss")


def throughput(runs: Runs, predicted: Mapping[str, pd.DataFrame] | None = None) -> go.Figure:
    """Samples per second vs step (global batch / slowest rank's step time), one trace a run;
    dotted in the run's colour, ``predicted[name]`` (a ``pdlab.predict`` table) beside it."""
    banded = any("samples_per_s_loaded" in table for table in (predicted or {}).values())
    title = "Throughput"
    if predicted:
        title += " (dotted: predicted, shaded: its band)" if banded else " (dotted: predicted)"
    fig = _per_step(runs, "samples_per_s", title, "samples/s", predicted, "samples/s")
    values = [y for trace in fig.data for y in trace.y if y is not None and y > 0]
    if values and max(values) > SPREAD * min(values):  # a GPU cluster beside these CPUs
        fig.update_yaxes(type="log", dtick="D2")  # 2 and 5 a decade, not every digit
    return fig


def comm_table(result: TrainResult) -> pd.DataFrame:
    """Bytes per step by ``op@group``, over all ranks, the mean over steps: payload measured
    (``measured``) and by formula (``expected``); sent and received, measured and by formula.
    Ops that carry nothing (a recv's payload and sent bytes are its sender's) show zeros."""
    steps = max(1, result.steps.step.nunique())
    ops = result.comm.assign(key=result.comm.op + "@" + result.comm.group)
    measured = ops.groupby("key")[["payload_bytes", "sent_bytes", "received_bytes"]].sum() / steps
    expected = (
        pd.DataFrame(
            [
                (f"{e.op}@{e.group}", e.payload_bytes, e.sent_bytes, e.received_bytes)
                for e in result.expected_comm
            ],
            columns=["key", "payload_bytes", "sent_bytes", "received_bytes"],
        )
        .groupby("key")
        .sum()
    )
    table = pd.DataFrame(
        {
            "measured": measured.payload_bytes,
            "expected": expected.payload_bytes,
            "sent": measured.sent_bytes,
            "expected_sent": expected.sent_bytes,
            "received": measured.received_bytes,
            "expected_received": expected.received_bytes,
        }
    )
    return table.fillna(0.0).rename_axis("op")


def sent_by_rank(events: Iterable[CommEvent]) -> pd.Series:
    """Bytes each rank sends in ``events`` (a step's ``expected_comm``), by rank."""
    sent = pd.DataFrame([(e.rank, e.sent_bytes) for e in events], columns=["rank", "sent"])
    return sent.groupby("rank").sent.sum()


def traffic(result: TrainResult) -> pd.DataFrame:
    """Bytes each rank sends and receives a step (the mean over steps): by its ops, by the
    formula, and as gloo's sockets counted them (``wire_*``, NaN where not measured)."""
    per_rank = result.ranks.groupby("rank")[
        ["sent_bytes", "wire_sent_bytes", "received_bytes", "wire_received_bytes"]
    ].mean()
    # Where the bytes depend on the routing (ep), each step has its formula: their mean.
    formulas = list(result.expected_by_step.values()) or [result.expected_comm]
    expected = pd.concat([sent_by_rank(events) for events in formulas], axis=1).mean(axis=1)
    expected = expected.reindex(per_rank.index, fill_value=0.0)
    per_rank.insert(1, "expected_sent_bytes", expected)
    return per_rank


def _per_rank_ops(result: TrainResult) -> pd.DataFrame:
    """Sent bytes a step, by rank (rows) and ``op@group`` (columns), ops sending nothing left out."""
    steps = max(1, result.steps.step.nunique())
    sent = result.comm[result.comm.sent_bytes > 0]
    table = sent.groupby(["rank", "op", "group"]).sent_bytes.sum().unstack(["op", "group"])
    issued = list(dict.fromkeys(zip(sent.op, sent.group, strict=True)))  # the order they ran
    ranks = sorted(result.ranks["rank"].unique())
    return (table[issued] / steps).reindex(ranks).fillna(0.0) if issued else table.reindex(ranks)


def comm(result: TrainResult) -> go.Figure:
    """Bytes each rank sends and receives a step (what costs time on a link): the sent bytes
    stacked by op, the formula's, and beside them what gloo's sockets counted (headers too)."""
    table, per_rank = _per_rank_ops(result), traffic(result)
    busiest, total = per_rank.sent_bytes.max(), per_rank.sent_bytes.sum()
    fig = _figure(
        f"Bytes sent a step: busiest rank {busiest:,.0f}, all {total:,.0f}",
        "rank",
        "bytes/step",
        bargap=0.1,
    )
    ranks = [str(r) for r in per_rank.index]
    base = 0.0
    for op, group in table.columns:
        y = table[op, group].to_numpy()
        fig.add_bar(
            x=ranks, y=y, base=base, offset=-0.45, width=0.3, name=f"{op}@{group}",
            marker={"color": OP_COLORS.get(op, "#888888"),
                    "pattern_shape": GROUP_PATTERNS.get(group, "-")},
        )  # fmt: skip
        base = base + y
    fig.add_scatter(
        x=ranks, y=per_rank.expected_sent_bytes, name="by formula", mode="markers",
        marker={"symbol": "line-ew", "size": 24, "line": {"width": 3, "color": COLORS["formula"]}},
    )  # fmt: skip
    if per_rank.wire_sent_bytes.notna().any():
        fig.add_bar(
            x=ranks, y=per_rank.wire_sent_bytes, offset=-0.15, width=0.3,
            name="on the wire", marker_color=COLORS["wire"],
        )  # fmt: skip
    fig.add_bar(
        x=ranks, y=per_rank.received_bytes, offset=0.15, width=0.3, name="received",
        marker={"color": COLORS["received"], "pattern_shape": "\\"},
    )  # fmt: skip
    if per_rank.wire_received_bytes.notna().any():
        fig.add_scatter(
            x=ranks, y=per_rank.wire_received_bytes, name="received, wire",
            mode="markers", marker={"symbol": "x", "size": 9, "color": COLORS["wire"]},
        )  # fmt: skip
    return fig


def experts(result: TrainResult, layer: int | None = None) -> go.Figure:
    """Tokens routed to each expert a step, over all ranks (a MoE ``layer``, or all summed),
    beside the balanced share that the load-balance loss pulls them towards."""
    routing = result.routing if layer is None else result.routing[result.routing.layer == layer]
    where = "all MoE layers" if layer is None else f"MoE layer {layer}"
    fig = _figure(f"Tokens per expert, {where}", "step", "tokens (token-expert pairs)")
    if routing.empty:  # not a moe run
        return fig
    table = routing.groupby(["step", "expert"]).tokens.sum().unstack()
    for e in table.columns:
        fig.add_scatter(x=table.index, y=table[e], name=f"expert {e}", mode="lines+markers")
    fig.add_scatter(
        x=table.index, y=table.sum(axis=1) / len(table.columns), name="balanced",
        mode="lines", line={"dash": "dot", "color": COLORS["formula"]},
    )  # fmt: skip
    return fig


def memory(result: TrainResult) -> go.Figure:
    """Bytes each rank holds after the last step: parameters, gradients, optimizer state."""
    mem = result.memory.sort_values("rank")
    fig = _figure(f"Memory per rank — {result.config.label}", "rank", "bytes")
    base = 0
    for column, (label, color) in MEMORY_PARTS.items():
        fig.add_bar(
            x=mem["rank"].astype(str), y=mem[column], base=base, name=label, marker_color=color
        )
        base = base + mem[column].to_numpy()
    return fig


def timeline_records(records: Sequence[dict], step: int | None = None) -> list[dict]:
    """Each rank's latest record with a pipeline timeline (of ``step``, if given)."""
    latest: dict[int, dict] = {}
    for rec in records:
        if rec.get("timeline") and (step is None or rec["step"] == step):
            latest[rec["rank"]] = rec
    if step is None and latest:  # ranks may be a step apart while a run streams
        last = min(rec["step"] for rec in latest.values())
        return timeline_records(records, last)
    return [latest[r] for r in sorted(latest)]


# What a Gantt label needs at plotly's 12 px font: ~7 px a character, 3 px padding each side.
LABEL_PX_PER_CHAR, LABEL_PAD_PX = 7.5, 8


def timeline(
    records: Sequence[dict], step: int | None = None, plot_width_px: float | None = None
) -> go.Figure:
    """A pipeline step as a Gantt chart: each rank's forward (F) and backward (B) micro-batches,
    a zero-bubble run's B (input gradient) and W (weight gradients) apart, each bar labelled
    with its micro-batch and, with several chunks a rank, its chunk (``F3·1``).

    ``records`` carry ``rank``, ``step`` and ``timeline``: a ``TrainResult.timeline``, or
    ``pdlab.log`` records as they stream (``cluster.metrics``); the latest step every rank
    reported is drawn unless ``step`` is given. The title compares the measured bubble (idle
    over busy time of the stages) with the schedule's formula (``pipeline.BUBBLE``) for ``p``
    stages, ``m`` micro-batches and ``v`` chunks a rank. A bar is labelled only where its
    label fits inside it: left to plotly (``uniformtext``) unless ``plot_width_px``, the
    width of the plotting area, is known; then decided here, as a figure repainted in a
    FigureWidget can lose plotly's decision (lab 05's browser test saw labels shrunk to 6 px).
    """
    chosen = timeline_records(records, step)
    fig = _figure("Pipeline timeline", "ms since the step began", "")
    if not chosen:
        fig.update_layout(title="Pipeline timeline — run a pipeline strategy (pp-*, dp-pp)")
        return fig
    events = [{**e, "rank": rec["rank"]} for rec in chosen for e in rec["timeline"]]
    t0 = min(e["start"] for e in events)
    split = any(e["phase"] == "W" for e in events)  # a zero-bubble run: B and W apart
    v = 1 + max(e.get("chunk", 0) for e in events)  # model chunks a rank (pp-interleaved)
    names = {"F": "forward", "B": "input gradient (B)" if split else "backward", "W": "weights (W)"}

    def row(e: dict) -> str:
        return f"rank {e['rank']} · stage {e['stage']}"

    span_ms = max(e["end"] - t0 for e in events) * 1e3 * 1.02  # the x range, set below
    px_per_ms = None
    if plot_width_px and span_ms > 0:
        # plotly widens the left margin to fit the rows' names: take their width off,
        # counted as generously as the labels' (CI saw "F0" shrunk on a borderline bar).
        bars_px = plot_width_px - LABEL_PX_PER_CHAR * max(len(row(e)) for e in events)
        px_per_ms = max(bars_px, 0) / span_ms

    def label(e: dict) -> str:
        text = f"{e['phase']}{e['mb']}" + (f"·{e['chunk']}" if v > 1 else "")
        if px_per_ms is None:
            return text
        width_px = (e["end"] - e["start"]) * 1e3 * px_per_ms
        return text if width_px >= LABEL_PX_PER_CHAR * len(text) + LABEL_PAD_PX else ""

    for phase, color in PHASE_COLORS.items():
        mine = [e for e in events if e["phase"] == phase]
        if not mine:
            continue  # W only in a zero-bubble run
        fig.add_bar(
            orientation="h",
            y=[row(e) for e in mine],
            base=[(e["start"] - t0) * 1e3 for e in mine],
            x=[(e["end"] - e["start"]) * 1e3 for e in mine],
            text=[label(e) for e in mine],
            textposition="inside",
            insidetextanchor="middle",
            textangle=0,  # never turned on end to fit a thin bar: left out instead
            name=names[phase],
            marker_color=color,
        )
    p = len({e["stage"] for e in events})
    m = len({e["mb"] for e in events})
    schedule = (
        "pp-zbv" if v > 1 and split
        else "pp-interleaved" if v > 1
        else "pp-zb" if split
        else "pp-1f1b"
    )  # fmt: skip
    measured = f"Pipeline step {chosen[0]['step']}: bubble {bubble_fraction(events):.0%} measured"
    formula = (
        "ZBV (zero in theory with equal F, B, W)"
        if schedule not in BUBBLE
        else f"{BUBBLE[schedule]} = {analytic_bubble(p, m, schedule, v):.0%}"
    )
    fig.update_layout(
        title=f"{measured}, {formula} for p={p}, m={m}" + (f", v={v}" if v > 1 else ""),
        yaxis_autorange="reversed",
        xaxis_range=[0, span_ms] if px_per_ms is not None else None,
        uniformtext={"minsize": 9, "mode": "hide"},  # a label that doesn't fit is left out
    )
    return fig


def compare(runs: Runs) -> pd.DataFrame:
    """One row a run, the bytes a step (mean): final loss, median samples/s, what the busiest
    rank and all ranks send (on the wire: NaN where not measured), the busiest rank's state."""
    rows = []
    for name, result in _named(runs).items():
        steps, mem = result.steps, result.memory
        rows.append(
            {
                "run": name,
                "steps": len(steps),
                "final_loss": result.final_loss,
                "samples_per_s": steps.samples_per_s.median(),  # the first step warms up
                "max_rank_sent": steps.max_rank_sent_bytes.mean(),
                "sent": steps.sent_bytes.mean(),
                "wire_sent": steps.wire_sent_bytes.mean(),
                "max_rank_state": int(mem[list(MEMORY_PARTS)].sum(axis=1).max()),
            }
        )
    return pd.DataFrame(rows).set_index("run")


SI_PREFIXES = {-4: "p", -3: "n", -2: "µ", -1: "m", 0: "", 1: "k", 2: "M", 3: "G", 4: "T"}


def si(value: float, unit: str = "") -> str:
    """``value`` to 3 significant figures with an SI prefix: 835072 bytes is "835 kB"; a
    fraction in "%" is a percentage (0.412 is "41.2%")."""
    if not math.isfinite(value):
        return "–"
    if unit == "%":
        return f"{100 * value:.3g}%"
    power = 0 if value == 0 else min(max(math.floor(math.log10(abs(value)) / 3), -4), 4)
    if abs(float(f"{value / 1000**power:.3g}")) >= 1000 and power < 4:
        power += 1  # 999.7 k rounds to 1.00 M, not "1e+03 k"
    return f"{value / 1000**power:.3g} {SI_PREFIXES[power]}{unit}".rstrip()


def _unit(column: str) -> str:
    """The unit of a pdlab table's column, from its name."""
    if column == "mfu":
        return "%"
    if column.endswith(("bytes", "sent", "state")):
        return "B"
    if column.endswith("_per_s"):
        return column.removesuffix("_per_s") + "/s"  # samples/s, tokens/s
    return "s" if column.endswith(("_time", "_s")) else ""


def readable(table: pd.DataFrame) -> Styler:
    """``table`` (``Dashboard.table()``, ``compare``, ``pdlab.plan``) as it reads best: every
    number to 3 significant figures, with its unit (bytes as "835 kB", MFU as "41.2%")."""
    numeric = table.select_dtypes("number").columns
    floats = [c for c in numeric if not pd.api.types.is_integer_dtype(table[c]) or _unit(c)]
    return table.style.format({c: functools.partial(si, unit=_unit(c)) for c in floats})


# ---- predicted time (pdlab.predict) --------------------------------------------------------

TIME_PARTS = {  # the colours of the measured breakdown's same parts (BREAKDOWN_PARTS)
    "compute": ("compute", TIME_COLORS["compute"]),
    "exposed_comm": ("exposed communication", TIME_COLORS["exposed"]),
    "bubble": ("waiting for other ranks (bubble)", TIME_COLORS["waiting"]),
}


def where_time_goes(predictions: Mapping[str, pd.DataFrame]) -> go.Figure:
    """One bar a run: its mean predicted step (``pdlab.predict``) split into compute,
    communication the compute does not hide, and time waiting for other ranks."""
    names = list(predictions)
    fig = _figure("Where the time goes (predicted, mean step)", "ms a step", "")
    base = [0.0] * len(names)
    for column, (label, color) in TIME_PARTS.items():
        # The mean (parts add up to the step) over the steps after the first, a warm-up.
        ms = [1e3 * p[column].iloc[1 if len(p) > 1 else 0 :].mean() for p in predictions.values()]
        fig.add_bar(y=names, x=ms, base=base, name=label, orientation="h", marker_color=color)
        base = [b + v for b, v in zip(base, ms, strict=True)]
    fig.update_layout(yaxis_autorange="reversed", height=max(HEIGHT, 40 * len(names) + 120))
    return fig


def predicted_vs_measured(table: pd.DataFrame, color: str = "link") -> go.Figure:
    """One point a run (``table``: ``measured`` and ``predicted`` seconds a step, a
    ``strategy`` and a ``color`` column): on the diagonal, the prediction was right."""
    fig = px.scatter(
        table.assign(measured_ms=1e3 * table.measured, predicted_ms=1e3 * table.predicted),
        x="measured_ms", y="predicted_ms", color=color, symbol="strategy",
        log_x=True, log_y=True, height=HEIGHT + 100,
        labels={"measured_ms": "measured ms a step", "predicted_ms": "predicted ms a step"},
        title="Predicted vs measured step time (the line: a perfect prediction)",
    )  # fmt: skip
    both = 1e3 * table[["measured", "predicted"]].to_numpy()
    ends = [both.min() / 1.5, both.max() * 1.5]
    fig.add_scatter(
        x=ends, y=ends, mode="lines", line={"dash": "dot", "color": "gray"}, name="exact"
    )
    return fig


def plan_layouts(rows: pd.DataFrame, title: str = "Every layout of the plan") -> go.Figure:
    """One point a layout of ``pdlab.plan``: memory per GPU across, step time up, colored by
    whether it fits; hover for its grid."""
    shown = rows.assign(layout=rows.apply(describe, axis=1), GB=rows.total_bytes / 1e9)
    return px.scatter(
        shown, x="GB", y="step_time", color="fits", hover_name="layout", title=title,
        labels={"GB": "GB a GPU", "step_time": "s a step"}, height=HEIGHT + 80,
        hover_data={"GB": ":.3g", "step_time": ":.3g"},
    )  # fmt: skip


BREAKDOWN_PARTS = {
    "compute_ms": ("compute", TIME_COLORS["compute"]),
    "exposed_comm_ms": ("exposed communication", TIME_COLORS["exposed"]),
    "idle_ms": ("idle", TIME_COLORS["waiting"]),
}


def breakdown(result: TrainResult) -> go.Figure:
    """Where each rank's step went (``pdlab.measure.trace.breakdown``): compute, communication the
    rank waited for (exposed) and idle, stacked to the step time; beside them, the
    communication that ran behind compute (overlapped: DDP's buckets during backward, FSDP's
    prefetched gathers)."""
    from pdlab.measure.trace import breakdown as split

    table = split(result)
    ranks = table.index.astype(str)
    overlap = table.overlapped_comm_ms.sum() / max(table.comm_ms.sum(), 1e-12)
    fig = _figure(
        f"Where the step went — {result.config.label}: {overlap:.0%} of communication "
        "overlapped compute",
        "rank",
        "ms per step",
    )
    base = 0
    for column, (label, color) in BREAKDOWN_PARTS.items():
        fig.add_bar(
            x=ranks,
            y=table[column],
            base=base,
            name=label,
            marker_color=color,
            offset=-0.4,
            width=0.5,
        )
        base = base + table[column].to_numpy()
    fig.add_bar(
        x=ranks,
        y=table.overlapped_comm_ms,
        name="communication overlapped",
        offset=0.1,
        width=0.3,
        marker_color=BREAKDOWN_PARTS["exposed_comm_ms"][1],
        marker_pattern_shape="/",
    )
    return fig
