"""The dashboard without a browser: runs in the background, stop, errors, cluster reuse; plots."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from itertools import pairwise

import pandas as pd
import plotly.graph_objects as go
import pytest

import pdlab
from pdlab.lab import plots
from pdlab.training.loop import expected_comm, train, validate

SMALL = {"model": "mlp", "batch_size": 8}


@pytest.fixture(scope="module")
def cluster():
    with pdlab.Cluster(2) as c:
        yield c


@pytest.fixture
def dashboard(cluster):
    d = pdlab.Dashboard(cluster, refresh_s=0.05)
    yield d
    d.close()


def loss_traces(d) -> dict[str, int]:
    """Run name -> points on the dashboard's loss plot."""
    return {t.name: len(t.x) for t in d.figure.data if t.xaxis == "x"}


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_import_pdlab_stays_free_of_plotting():
    code = "import sys, pdlab; print('plotly' in sys.modules, 'ipywidgets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_start_returns_at_once_and_wait_gives_the_result(dashboard):
    dashboard.start(strategy="dp", steps=20, **SMALL)
    assert dashboard.running and dashboard.start_button.disabled
    result = dashboard.wait(timeout=120)
    assert len(result.steps) == 20 and math.isfinite(result.final_loss)
    assert dashboard.progress.value == 20 and not dashboard.running
    assert "#1 dp/scratch mlp w2 done after 20 step(s)" in dashboard.message.value
    assert loss_traces(dashboard) == {"#1 dp/scratch mlp w2": 20}


def test_each_run_adds_a_trace_and_a_table_row(dashboard):
    for strategy in ("dp", "zero1"):
        dashboard.start(strategy=strategy, steps=3, **SMALL)
        dashboard.wait(timeout=120)
    assert loss_traces(dashboard) == {"#1 dp/scratch mlp w2": 3, "#2 zero1/scratch mlp w2": 3}
    table = dashboard.table()
    assert list(table.index) == list(loss_traces(dashboard))
    assert table.final_loss.iloc[0] == pytest.approx(table.final_loss.iloc[1], abs=1e-5)
    comm = {t.name: t for t in dashboard.figure.data if t.xaxis == "x3"}
    by_op = [t for name, t in comm.items() if "@" in name]
    assert [t.name for t in by_op] == ["reduce_scatter@dp", "all_gather@dp"]
    sent = [sum(t.y[rank] for t in by_op) for rank in range(2)]
    assert sent == list(comm["by formula"].y)  # zero1's bytes per rank, measured = formula
    wire = list(comm["on the wire"].y)
    assert all(0 < w - s < 4096 for w, s in zip(wire, sent, strict=True))  # gloo's headers
    snapshot = dashboard.snapshot()  # a plain figure of the same plots
    assert type(snapshot) is go.Figure

    def traces(figure):  # nan (a step with no band) as a string: nan == nan is False
        return [
            (t.name, [str(y) if y != y else y for y in ([] if t.y is None else t.y)])
            for t in figure.data
        ]

    assert traces(snapshot) == traces(dashboard.figure)


def test_stop_mid_run_keeps_the_steps_done(dashboard, cluster):
    dashboard.start(strategy="dp", steps=100_000, **SMALL)
    wait_for(lambda: dashboard.progress.value >= 3)
    dashboard.stop()
    partial = dashboard.wait(timeout=60)
    assert 3 <= len(partial.steps) < 100_000
    assert dashboard.runs[-1].status == "stopped" and "stopped after" in dashboard.message.value
    # The cluster carries on (restarting by itself if a rank was stuck in a collective).
    dashboard.start(strategy="dp", steps=2, **SMALL)
    assert len(dashboard.wait(timeout=120).steps) == 2
    assert dashboard.cluster is cluster


def test_a_bad_choice_is_shown_and_nothing_starts(dashboard, cluster):
    with pytest.raises(ValueError, match="cannot split"):
        dashboard.start(strategy="tp", model="article", world_size=4)
    assert "cannot split the width" in dashboard.message.value
    assert not dashboard.runs and not dashboard.running
    assert dashboard.cluster is cluster and cluster.run(pdlab.rank) == [0, 1]


def test_the_menu_shows_zero2_between_zero1_and_zero3():
    d = pdlab.Dashboard()
    keys = [key for _, key in d.controls["strategy"].options]
    assert keys.index("zero1") < keys.index("zero2") < keys.index("zero3")
    assert ("ZeRO-2", "zero2") in d.controls["strategy"].options


def test_fsdp_is_zero3_with_torch():
    d = pdlab.Dashboard()
    d.controls["strategy"].value = "fsdp"
    assert d.controls["impl"].disabled
    config = d.config()
    assert (config.strategy, config.impl) == ("zero3", "torch")
    d.controls["strategy"].value = "dp"
    assert not d.controls["impl"].disabled


def test_the_pipeline_schedules_are_in_the_menu_and_interleaved_gets_its_chunks():
    d = pdlab.Dashboard()
    keys = [key for _, key in d.controls["strategy"].options]
    assert {"pp-zb", "pp-interleaved", "pp-zbv"} <= set(keys)
    chunks = d.controls["virtual_stages"]
    assert chunks.layout.display == "none" and d.config().virtual_stages is None  # dp
    d.controls["strategy"].value = "pp-interleaved"
    assert chunks.layout.display is None and not chunks.disabled and chunks.value == 2
    chunks.value = 3
    assert d.config().virtual_stages == 3  # the learner's choice reaches the run
    d.controls["strategy"].value = "pp-zbv"  # shown, fixed at ZBV's 2
    assert chunks.layout.display is None and chunks.disabled and chunks.value == 2
    d.controls["strategy"].value = "pp-1f1b"
    assert chunks.layout.display == "none" and d.config().virtual_stages is None
    validate(d.config())


def test_recompute_and_precision_reach_the_run():
    d = pdlab.Dashboard()
    assert d.controls["recompute"].options == ("none", "selective", "full")
    assert d.controls["precision"].options == ("fp32", "bf16")
    assert (d.config().recompute, d.config().precision) == ("none", "fp32")
    d.controls["recompute"].value, d.controls["precision"].value = "selective", "bf16"
    assert (d.config().recompute, d.config().precision) == ("selective", "bf16")
    validate(d.config())
    # A lever the model can't take is refused on the status line, naming the fix.
    with pytest.raises(ValueError, match="use model='gpt', or recompute='none'"):
        d.start(model="mlp")
    assert "recompute=&#x27;none&#x27;" in d.message.value and not d.runs  # HTML-escaped


def test_the_levers_and_chunks_run_on_the_ranks(dashboard):
    dashboard.start(
        strategy="pp-interleaved", model="gpt", batch_size=8, micro_batches=2, virtual_stages=2,
        recompute="full", precision="bf16", steps=2,
    )  # fmt: skip
    result = dashboard.wait(timeout=120)
    assert (result.config.recompute, result.config.precision) == ("full", "bf16")
    # Each rank ran both its chunks; bf16 activations: the bytes sent are half fp32's.
    for record in result.timeline:
        assert {e["chunk"] for e in record["timeline"]} == {0, 1}
    fp32 = expected_comm(replace(result.config, precision="fp32"))
    assert (result.steps.comm_bytes == sum(e.payload_bytes for e in fp32) / 2).all()


def test_world_size_restarts_the_cluster_and_keeps_it_otherwise():
    first = pdlab.Cluster(2)
    d = pdlab.Dashboard(first, refresh_s=0.05)
    try:
        d.start(strategy="single", world_size=1, steps=2, **SMALL)
        d.wait(timeout=120)
        one_rank = d.cluster
        assert one_rank.world_size == 1 and first.state == "stopped"
        d.start(strategy="single", steps=2, **SMALL)
        d.wait(timeout=120)
        assert d.cluster is one_rank
    finally:
        d.close()
        d.cluster.shutdown()
        first.shutdown()


# ----- plots, from a run in this process -------------------------------------------------


def test_plots_overlay_runs_and_compare():
    runs = [train(strategy="single", optimizer=o, steps=4, **SMALL) for o in ("sgd", "adam")]
    fig = plots.loss(runs)
    assert [t.name for t in fig.data] == ["single/scratch mlp w1", "single/scratch mlp w1 (2)"]
    assert [len(t.y) for t in fig.data] == [4, 4]
    memory = plots.memory(runs[1])
    assert [t.name for t in memory.data] == ["parameters", "gradients", "optimizer state"]
    assert memory.data[2].base[0] == memory.data[0].y[0] + memory.data[1].y[0]  # stacked
    assert list(plots.compare(runs).steps) == [4, 4]


def test_timeline_reports_the_bubble():
    def rec(rank, events):
        fields = ("stage", "mb", "phase", "start", "end")
        return {"rank": rank, "step": 0, "timeline": [dict(zip(fields, e)) for e in events]}  # noqa: B905

    # p=2 stages, m=2 micro-batches, unit-time F and B: GPipe's schedule, idle 2 of busy 4.
    records = [
        rec(0, [(0, 0, "F", 0, 1), (0, 1, "F", 1, 2), (0, 1, "B", 4, 5), (0, 0, "B", 5, 6)]),
        rec(1, [(1, 0, "F", 1, 2), (1, 1, "F", 2, 3), (1, 1, "B", 3, 4), (1, 0, "B", 4, 5)]),
    ]
    fig = plots.timeline(records)
    assert "bubble 50% measured, (p-1)/m = 50% for p=2, m=2" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["forward", "backward"]
    # ZB-H1's order, unit-time F, B and W: the last W ends at 7, busy 6 a stage, idle 1.
    records = [
        rec(0, [(0, 0, "F", 0, 1), (0, 1, "F", 1, 2), (0, 0, "B", 3, 4), (0, 0, "W", 4, 5),
                (0, 1, "B", 5, 6), (0, 1, "W", 6, 7)]),
        rec(1, [(1, 0, "F", 1, 2), (1, 0, "B", 2, 3), (1, 1, "F", 3, 4), (1, 1, "B", 4, 5),
                (1, 0, "W", 5, 6), (1, 1, "W", 6, 7)]),
    ]  # fmt: skip
    fig = plots.timeline(records)
    assert "bubble 17% measured, (p-1)/(3m) = 17% for p=2, m=2" in fig.layout.title.text
    assert [t.name for t in fig.data] == ["forward", "input gradient (B)", "weights (W)"]


# ----- what a learner sees --------------------------------------------------------------------


def test_the_status_line_says_running_with_the_step(dashboard):
    dashboard.start(strategy="dp", steps=100_000, **SMALL)
    wait_for(lambda: "running: step" in dashboard.message.value and dashboard.progress.value >= 2)
    assert "#1 dp/scratch mlp w2 running: step" in dashboard.message.value
    assert "of 100000" in dashboard.message.value
    dashboard.stop()
    dashboard.wait(timeout=60)
    assert "stopped after" in dashboard.message.value


def test_an_error_clears_when_a_control_changes(dashboard):
    with pytest.raises(ValueError):
        dashboard.start(strategy="pp-gpipe", batch_size=8, micro_batches=3)
    assert "b00020" in dashboard.message.value  # shown in red
    dashboard.controls["micro_batches"].value = 2
    assert dashboard.message.value == ""


def test_close_shuts_down_what_the_dashboard_started_and_a_new_one_closes_the_old():
    first = pdlab.Dashboard(refresh_s=0.05)
    first.start(strategy="single", world_size=1, steps=2, **SMALL)
    first.wait(timeout=120)
    started = first.cluster
    assert first.started == [started] and started.state != "stopped"
    second = pdlab.Dashboard(refresh_s=0.05)  # the notebook run again
    try:
        assert started.state == "stopped" and first.started == []
        second.start(strategy="single", world_size=1, steps=2, **SMALL)
        second.wait(timeout=120)
        owned = second.cluster
        second.close()
        assert owned.state == "stopped"
        # The controls still work after close(): Start starts a fresh cluster.
        second.start(strategy="single", world_size=1, steps=2, **SMALL)
        assert len(second.wait(timeout=120).steps) == 2 and second.cluster is not owned
    finally:
        second.close()
    assert second.cluster.state == "stopped"


def test_live_shows_a_callbacks_error_beside_its_control():
    import ipywidgets as widgets
    import plotly.graph_objects as go

    def draw(n):
        if n % 2:
            raise ValueError(f"{n} is odd: choose an even number")
        return go.Figure(go.Scatter(y=list(range(n))), layout_title_text=f"n = {n}")

    slider = widgets.IntSlider(value=2, min=1, max=8, description="n")
    box = live_widget = pdlab.lab.dashboard.live(slider, draw)
    (control, status), figure = box.children[0].children, box.children[1]
    assert control is slider and figure.layout.title.text == "n = 2"
    slider.value = 3
    assert (
        "ValueError: 3 is odd: choose an even number" in status.value and "b00020" in status.value
    )
    assert figure.layout.title.text == "n = 2"  # the last good figure stays
    slider.value = 4
    assert status.value == "" and figure.layout.title.text == "n = 4" and len(figure.data[0].y) == 4
    live_widget.close()


def test_a_repaint_changes_the_same_traces_in_place_and_keeps_the_learners_zoom():
    from pdlab.lab.dashboard import LiveFigure, _show

    def fig(y, fill, offset):
        scatter = {"type": "scatter", "name": "loss", "y": y, **fill}
        return {"data": [scatter, {"type": "bar", "name": "sent", "y": [1], "offset": offset}],
                "layout": {"title": {"text": f"{len(y)} steps"}, "xaxis": {"title": {"text": "step"}}}}  # fmt: skip

    widget = LiveFigure(fig([3, 2], {"fill": "tonexty"}, -0.4))
    before, uids = widget.data, [t.uid for t in widget.data]
    _show(widget, fig([3, 2, 1], {}, 0.1))
    assert widget.data[0] is before[0] and widget.data[1] is before[1]  # in place
    assert [t.uid for t in widget.data] == uids  # by which the browser names them
    assert list(widget.data[0].y) == [3, 2, 1] and widget.data[0].fill is None
    assert widget.data[1].offset == 0.1 and widget.layout.title.text == "3 steps"
    widget.plotly_relayout({"xaxis.range": [0, 1]})  # the learner zooms in the browser
    _show(widget, fig([3, 2, 1, 0], {}, 0.1))
    assert widget.layout.xaxis.range == (0, 1) and widget.layout.title.text == "4 steps"
    _show(widget, {"data": [{"type": "bar", "name": "loss"}], "layout": {}})  # other traces
    assert [(t.type, t.name) for t in widget.data] == [("bar", "loss")]


def test_each_quantity_keeps_its_colour_from_run_to_run():
    runs = [train(strategy="single", steps=2, **SMALL), train(strategy="single", steps=3, **SMALL)]
    colours = [[t.marker.color for t in plots.memory(r).data] for r in runs]
    assert colours[0] == colours[1] == [c for _, c in plots.MEMORY_PARTS.values()]
    loss = plots.loss(runs)
    # Runs that coincide stay visible: each its own dash and marker.
    assert loss.data[0].line.dash != loss.data[1].line.dash
    assert loss.data[0].marker.symbol != loss.data[1].marker.symbol


def test_the_gantt_labels_only_what_fits():
    events = [
        {"stage": 0, "mb": i, "phase": p, "start": t, "end": t + 1}
        for i, (p, t) in enumerate([("F", 0), ("F", 1), ("B", 2), ("B", 3)])
    ]
    fig = plots.timeline([{"rank": 0, "step": 0, "timeline": events}])
    assert fig.layout.uniformtext.mode == "hide" and fig.data[0].textposition == "inside"
    # Where the plot's width is known the fit is decided here. 4 bars of 1 s on an x range of
    # 4.08 s, after 16 characters of row names (120 px): on 230 px a bar is 27 px, room for
    # "F0" (2 * 7.5 + 8 = 23 px); on 200 px it is 20 px, and no label is drawn.
    wide, narrow = (
        plots.timeline([{"rank": 0, "step": 0, "timeline": events}], plot_width_px=width).data
        for width in (230, 200)
    )
    assert list(wide[0].text) == ["F0", "F1"] and list(wide[1].text) == ["B2", "B3"]
    assert list(narrow[0].text) == ["", ""] and list(narrow[1].text) == ["", ""]


def test_stop_waits_for_the_first_step_before_it_interrupts(monkeypatch):
    """A rank's first run imports the training code: an interrupt cut into an import would
    leave it broken in that rank, so Stop interrupts once the first step is in (or at last
    after FIRST_STEP_WAIT_S, for a run that hangs before it)."""
    import threading

    from pdlab.lab.dashboard import Run

    class Ranks:  # stands in for the cluster: counts the interrupts it gets
        interrupts = 0

        def interrupt(self):
            self.interrupts += 1

    d = pdlab.Dashboard(refresh_s=0.05)
    d.cluster = ranks = Ranks()
    run = Run("#1", pdlab.TrainConfig(), 2)
    training = threading.Event()
    thread = threading.Thread(target=training.wait, args=(30,))
    thread.start()
    stopper = threading.Thread(target=d._interrupt_until_done, args=(run, thread))
    stopper.start()
    time.sleep(2.5)
    assert ranks.interrupts == 0  # no step yet: the ranks may be importing
    run.records.append({"rank": 0, "step": 0})
    wait_for(lambda: ranks.interrupts >= 1, 10)
    training.set()
    stopper.join(10)
    assert not stopper.is_alive()
    monkeypatch.setattr(pdlab.lab.dashboard, "FIRST_STEP_WAIT_S", 0.5)  # a run that hangs early
    late, thread = Run("#2", pdlab.TrainConfig(), 2), threading.Thread(target=time.sleep, args=(3,))
    thread.start()
    before = ranks.interrupts
    d._interrupt_until_done(late, thread)
    assert ranks.interrupts > before
    d.cluster = None


def test_stop_soon_after_start_leaves_the_ranks_usable():
    d = pdlab.Dashboard(refresh_s=0.05)
    try:
        run = d.start(strategy="dp", world_size=2, steps=100_000, **SMALL)
        wait_for(lambda: run.status == "running", 120)  # the cluster is up; the call just sent
        d.stop()
        assert 1 <= len(d.wait(timeout=180).steps) < 100_000
        d.start(strategy="dp", steps=2, **SMALL)
        assert len(d.wait(timeout=180).steps) == 2
    finally:
        d.close()


def test_the_cluster_choice_predicts_every_step_there(dashboard):
    """A GPU cluster is predicted only: the run trains as before, each step is predicted as
    it comes in, dotted beside the measured throughput, and split in a bar."""
    controls = dashboard.controls
    assert controls["emulate"].disabled  # this machine: nothing to emulate
    controls["cluster"].value = "8xH100"
    assert controls["emulate"].disabled  # a GPU's compute is predicted, never emulated
    dashboard.start(strategy="dp", steps=6, **SMALL)
    result = dashboard.wait(timeout=120)
    run = dashboard.runs[-1]
    # The run's name says where it is predicted, as the menu names that cluster.
    assert run.config.link is None and run.name == "#1 dp/scratch mlp w2 → 8xH100 (NVLink)"
    assert list(run.prediction.step) == list(result.steps.step)  # predicted a few at a time
    whole = pdlab.predict(result, "8xH100")  # the same steps predicted at once
    assert run.prediction.step_time.tolist() == pytest.approx(whole.step_time.tolist())
    throughput = {t.name: t for t in dashboard.figure.data if t.xaxis == "x2"}
    dotted = throughput[f"{run.name}, predicted on 8xH100"]
    assert list(dotted.y) == pytest.approx(list(run.prediction.samples_per_s))
    assert dotted.line.dash == "dot" and dotted.line.color == throughput[run.name].line.color
    # Measured lines are never dotted; one legend entry says what the dots are.
    assert throughput[run.name].line.dash != "dot"
    assert throughput["predicted"].line.dash == "dot" and throughput["predicted"].showlegend
    # One bar a run on the last row: compute, exposed communication and bubble add up to the
    # predicted step (the steps after the first).
    bars = [t for t in dashboard.figure.data if t.xaxis == "x6"]
    assert [t.name for t in bars] == [label for label, _ in plots.TIME_PARTS.values()]
    assert all(list(t.y) == [run.name] for t in bars)
    total_ms = sum(t.x[0] for t in bars)
    assert total_ms == pytest.approx(1e3 * run.prediction.step_time.iloc[1:].mean())


def test_a_clusters_first_run_trains_before_this_machine_is_measured(dashboard, monkeypatch):
    """Issue 22: Start on a cluster not yet calibrated used to measure it first (0.5-1 s
    before the first step). Now the first run trains at once and is measured after its last
    step, predicted whole at its last paint; the next run is predicted as its steps come."""
    measured_after: list[int] = []  # records of the live run when the calibration began
    real = pdlab.lab.dashboard.calibrate

    def calibrate(cluster):
        measured_after.append(len(dashboard.runs[-1].records))
        return real(cluster)

    monkeypatch.setattr(pdlab.lab.dashboard, "calibrate", calibrate)
    for _ in range(2):
        dashboard.start(strategy="dp", steps=4, **SMALL)
        result = dashboard.wait(timeout=120)
        assert list(dashboard.runs[-1].prediction.step) == list(result.steps.step)
    assert measured_after == [4 * 2]  # once, after the first run's 4 steps on both ranks


def test_a_prediction_here_shows_its_band(dashboard):
    """Without a link, a run on this machine is predicted on the idle calibration (dotted)
    and, shaded up from it, on the transport as the run's own collectives met it
    (``under_load``: issue 17's band). A pipeline's sends alone have no band."""
    for strategy in ("dp", "pp-1f1b"):
        dashboard.start(strategy=strategy, steps=4, micro_batches=2, **SMALL)
        dashboard.wait(timeout=120)
    dp, pp = dashboard.runs[-2:]
    assert (dp.prediction.samples_per_s_loaded <= dp.prediction.samples_per_s).all()
    assert "samples_per_s_loaded" not in pp.prediction
    throughput = [t for t in dashboard.figure.data if t.xaxis == "x2"]
    names = [t.name for t in throughput]
    band = throughput[names.index(f"{dp.name}, predicted with the run's own transport")]
    assert names[names.index(band.name) - 1] == f"{dp.name}, predicted on this-machine"
    assert band.fill == "tonexty" and list(band.y) == pytest.approx(list(dp.prediction.samples_per_s_loaded))  # fmt: skip
    assert not any(name.startswith(pp.name) and "own transport" in name for name in names)
    assert "shaded: its band" in dashboard.figure.layout.annotations[1].text


def test_a_link_is_emulated_on_the_ranks_or_only_predicted(dashboard):
    """On a 100 Mbit/s link each step takes at least what the busiest rank sends over it:
    emulated, the measured step does; with emulate off only the prediction does."""
    rate = 100e6 / 8  # bytes a second
    dashboard.controls["cluster"].value = "100Mbit/s"
    assert not dashboard.controls["emulate"].disabled
    dashboard.start(strategy="dp", steps=4, **SMALL)
    emulated = dashboard.wait(timeout=120)
    assert emulated.config.link == "100Mbit/s" and "@100Mbit/s" in dashboard.runs[-1].name
    floor = emulated.steps.max_rank_sent_bytes / rate  # seconds the gradient takes to cross
    assert (emulated.steps.step_time >= floor).all()
    dashboard.start(emulate=False)
    assert dashboard.wait(timeout=120).config.link is None  # trained on this machine's loopback
    predicted = dashboard.runs[-1].prediction
    assert (predicted.step_time >= floor).all()  # predicted on the link
    assert predicted.attrs["target"] == "this-machine over 100Mbit/s"  # its compute, that link


def test_a_prediction_that_fails_is_said_and_the_run_kept(dashboard, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no model of this")

    monkeypatch.setattr(pdlab.lab.dashboard, "predict", broken)
    dashboard.start(strategy="dp", steps=3, cluster="8xH100", **SMALL)
    result = dashboard.wait(timeout=120)
    assert len(result.steps) == 3 and dashboard.runs[-1].prediction is None
    assert "no prediction on 8xH100: ValueError: no model of this" in dashboard.message.value


def test_numbers_read_to_three_significant_figures_with_units():
    assert plots.si(835072, "B") == "835 kB"  # not 835072.0
    assert plots.si(7.215213e10, "B") == "72.2 GB"  # not 7.215213e+10
    assert plots.si(999_700, "B") == "1 MB"  # rounding carries into the next prefix
    assert plots.si(0.000264, "s") == "264 µs" and plots.si(0.4129, "%") == "41.3%"
    table = pd.DataFrame({"samples_per_s": [124.123456], "sent": [835072.0], "steps": [20]})
    shown = plots.readable(table).to_html()
    assert "124 samples/s" in shown and "835 kB" in shown and ">20<" in shown
    assert "124.123456" not in shown and "835072" not in shown


def test_a_slow_paint_still_repaints_a_running_run_every_repaint_s():
    """With 20 runs plotted a paint took 0.45 s while the ranks trained. The painter spaces
    paints to keep under a fifth of a core, but never more than ``REPAINT_S`` apart, and
    looks for new steps when a paint is due: when it looked every ``refresh_s`` instead,
    paints came 1.45 s apart (0.45 + 2 x 0.5), and 2.7 s before the cap (5 x 0.45 + 0.45)."""
    from types import SimpleNamespace

    from pdlab.lab.dashboard import REPAINT_S

    d = pdlab.Dashboard(refresh_s=0.5)
    records, starts, done = [], [], threading.Event()
    run = SimpleNamespace(
        records=records,
        steps_done=lambda: len(records),
        pace=lambda: None,
        slow=SimpleNamespace(check=lambda *args: None),
    )

    def slow_paint(run):
        starts.append(time.monotonic())
        time.sleep(0.45)

    def train():  # a step every 0.05 s, for 5 s
        for step in range(100):
            records.append({"step": step})
            time.sleep(0.05)
        done.set()

    d._paint = slow_paint
    trainer = threading.Thread(target=train)
    trainer.start()
    d._paint_until(run, done)
    trainer.join()
    d.close()
    gaps = [b - a for a, b in pairwise(starts)]
    assert len(gaps) >= 3, starts
    # Paints come REPAINT_S apart; on a loaded machine one may wake late (CI with two busy
    # loops: one gap of 1.04 s among 0.80s). The old painters' 1.45 s and 2.7 s stay far out.
    assert REPAINT_S - 0.01 <= statistics.median(gaps) <= REPAINT_S + 0.05, gaps
    assert all(REPAINT_S - 0.01 <= gap <= REPAINT_S + 0.35 for gap in gaps), gaps


@pytest.mark.parametrize("locked", [True, False])
def test_the_browsers_answer_and_a_repaint_take_turns(locked, monkeypatch):
    """The browser answers each change with plotly.js's defaults, applied on the kernel's
    thread while the painter's thread may repaint. Without the lock (the known-wrong case) the
    answer meets traces a repaint replaced midway: the IndexError that lab 05's browser test
    found in JupyterLab's log console."""
    import ipywidgets.widgets.widget

    from pdlab.lab.dashboard import LiveFigure, _show

    errors = []

    class Kernel:  # where a widget's message handler puts its errors: the log console
        def showtraceback(self) -> None:
            errors.append(sys.exc_info()[0])

    monkeypatch.setattr(ipywidgets.widgets.widget, "get_ipython", Kernel)
    if not locked:
        monkeypatch.setattr(LiveFigure, "_handle_msg", go.FigureWidget._handle_msg)
    widget = LiveFigure({"data": [{"type": "scatter", "name": n, "y": [1, 2]} for n in "ab"]})
    answering, repainting, repainted = threading.Event(), threading.Event(), threading.Event()
    seen_repainted = []
    apply = widget._remove_overlapping_props

    def answer_midway(*args):
        answering.set()
        repainting.wait()
        # Locked, the repaint waits for this answer: a second passes and the answer goes on.
        seen_repainted.append(repainted.wait(timeout=1 if locked else 60))
        return apply(*args)

    def repaint():
        answering.wait()
        repainting.set()
        _show(widget, {"data": [{"type": "bar", "name": "c", "y": [1]}], "layout": {}})
        repainted.set()

    widget._remove_overlapping_props = answer_midway
    painter = threading.Thread(target=repaint)
    painter.start()
    delta = {"uid": widget.data[1].uid, "line": {"color": "red"}}
    edit = {"trace_deltas": [delta], "trace_edit_id": widget._last_trace_edit_id}
    widget._handle_msg({"content": {"data": {"method": "update", "state": {"_js2py_traceDeltas": edit}}}})  # fmt: skip
    painter.join()
    assert [(t.type, t.name) for t in widget.data] == [("bar", "c")]
    assert (seen_repainted, errors) == (([False], []) if locked else ([True], [IndexError]))
