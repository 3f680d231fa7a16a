"""Rich output from ranks: ``display(obj)``, progress bars and widgets, shown in the cell that
runs the code, labelled with the rank — or each rank in its own tab (``%%ranks --tabs``).

On a rank, ``display(obj)`` (``pdlab.display``; plain ``display`` in ``%%ranks`` cells) sends
the object itself, pickled: the kernel shows it as it would its own (a DataFrame's table, a
plotly figure, an image, HTML), since a rank has no notebook to format for (plotly, for one,
renders nothing there). An object the kernel can't unpickle shows as the rank's ``repr``. An
ipywidgets widget (a progress bar, a label) is mirrored instead: the kernel builds the same
widget and the rank sends its state as it changes, at most ``WIDGET_HZ`` times a second (the
last change always arrives: it is sent when the call ends).

Progress bars need nothing on the rank: tqdm (or any ``\\r``-redrawn line) reaches the kernel
as text, where ``pdlab.control.output.RankOutput`` shows the line's latest state live instead of
piling up its redraws.

In the kernel, a ``View`` decides where a rank's output goes: ``Printed`` (the cell, each
item labelled ``[rank r]``) or ``Tabs`` (a tab a rank).
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import cloudpickle

from pdlab.control import protocol

WIDGET_HZ = 10

# ---- on a rank -------------------------------------------------------------------------------


def _nothing() -> None:
    pass


_send: Callable[[Any], None] | None = None  # to the kernel; None outside a pdlab rank
_flush_output: Callable[[], None] = _nothing  # so that a print() before a display() shows first
_widgets: dict[str, dict] = {}  # model id -> {"sent": time, "pending": keys not yet sent}


def bind(send: Callable[[Any], None], flush_output: Callable[[], None]) -> None:
    """Send rich output to the kernel with ``send`` (``pdlab.control.worker`` calls this); text
    written before a display is flushed first with ``flush_output``."""
    global _send, _flush_output
    _send, _flush_output = send, flush_output


def display(*objs: Any) -> None:
    """Show ``objs`` in the notebook cell running this code, labelled with this rank.

    Outside a pdlab rank: IPython's ``display`` where there is one, else ``print``.
    """
    for obj in objs:
        if _send is None:
            _display_here(obj)
        elif _is_widget(obj):
            _share(obj)
        else:
            try:
                value = cloudpickle.dumps(obj)
            except Exception:  # shown as text, then
                value = b""
            _flush_output()
            _send(protocol.Display(value, repr(obj)))


def _display_here(obj: Any) -> None:
    ipython = sys.modules.get("IPython")
    if ipython is not None and ipython.get_ipython() is not None:
        ipython.display.display(obj)
    else:
        print(obj)


def _is_widget(obj: Any) -> bool:
    widgets = sys.modules.get("ipywidgets")  # a rank that made a widget imported it
    return widgets is not None and isinstance(obj, widgets.DOMWidget)


def _share(widget: Any) -> None:
    """Mirror ``widget`` in the kernel, now and whenever its state changes."""
    kind = type(widget)
    if widget.model_id not in _widgets:
        _widgets[widget.model_id] = {"sent": 0.0, "pending": set(), "widget": widget}
        widget.observe(lambda change: _changed(widget, change["name"]), names=widget.keys)
    _flush_output()
    _send(protocol.WidgetState(widget.model_id, kind.__module__, kind.__qualname__, _state(widget)))


def _state(widget: Any, keys: Any = None) -> dict:
    """The widget's synced state, but for what refers to other widgets (layout, style)."""
    state = widget.get_state(key=keys)
    return {
        k: v
        for k, v in state.items()
        if not k.startswith(("_model_", "_view_")) and not str(v).startswith("IPY_MODEL_")
    }


def _changed(widget: Any, key: str) -> None:
    entry = _widgets[widget.model_id]
    entry["pending"].add(key)
    if time.monotonic() - entry["sent"] >= 1 / WIDGET_HZ:
        _send_pending(widget.model_id)


def _send_pending(model_id: str) -> None:
    entry = _widgets[model_id]
    widget, keys = entry["widget"], sorted(entry["pending"])
    entry["pending"].clear()
    entry["sent"] = time.monotonic()
    if keys and _send is not None:
        kind = type(widget)
        _send(
            protocol.WidgetState(model_id, kind.__module__, kind.__qualname__, _state(widget, keys))
        )


def flush() -> None:
    """Send every widget change not sent yet (``pdlab.control.worker`` calls this as a call ends)."""
    for model_id, entry in list(_widgets.items()):
        if entry["pending"]:
            _send_pending(model_id)


# ---- in the kernel ---------------------------------------------------------------------------

_mirrors: dict[tuple[int, str], Any] = {}  # (rank, model id) -> the kernel's copy of a widget


def _in_a_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a frontend shows displays and widgets)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _label(rank: int) -> dict:
    return {
        "text/plain": f"[rank {rank}]",
        "text/html": f"<div style='font-size:smaller;color:#666'>rank {rank}</div>",
    }


class View:
    """Where the kernel shows the ranks' output; ``Printed`` shows it in the cell."""

    def lines(self, rank: int, stream: str, lines: list[str]) -> None:
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write("".join(f"[rank {rank}] {line}\n" for line in lines))
        out.flush()

    def progress(self, rank: int, stream: str, text: str, done: bool) -> None:
        """The latest state of a line the rank keeps redrawing (``\\r``); ``done``: its last."""
        if done:
            self.lines(rank, stream, [text])

    def show(self, rank: int, message: protocol.Display | protocol.WidgetState) -> None:
        """A rank's ``display()``: an object, or a widget's state."""
        if isinstance(message, protocol.WidgetState):
            widget, new = mirror(rank, message)
            if new:
                self.widget(rank, widget)
            return
        try:
            obj = cloudpickle.loads(message.value)
        except Exception:  # its class exists on the rank only: show what the rank saw
            obj = None
        self.object(rank, obj, message.text)

    def object(self, rank: int, obj: Any, text: str) -> None:
        self.lines(rank, "stdout", [text if obj is None else str(obj)])

    def widget(self, rank: int, widget: Any) -> None:
        self.lines(rank, "stdout", [repr(widget)])


class Printed(View):
    """In the cell: text prefixed ``[rank r]``; in a notebook, displays and widgets under a
    ``rank r`` label, and each redrawn line as one display updated in place."""

    def __init__(self) -> None:
        self._bars: dict[tuple[int, str], Any] = {}  # (rank, stream) -> its display handle

    def progress(self, rank: int, stream: str, text: str, done: bool) -> None:
        if not _in_a_notebook():
            return super().progress(rank, stream, text, done)
        from IPython.display import display

        shown = {"text/plain": f"[rank {rank}] {text}"}
        handle = self._bars.pop((rank, stream), None) if done else self._bars.get((rank, stream))
        if handle is None:
            handle = display(shown, raw=True, display_id=True)
            if not done:
                self._bars[rank, stream] = handle
        else:
            handle.update(shown, raw=True)

    def object(self, rank: int, obj: Any, text: str) -> None:
        if not _in_a_notebook():
            return super().object(rank, obj, text)
        from IPython.display import display

        display(_label(rank), raw=True)
        display(obj) if obj is not None else display({"text/plain": text}, raw=True)

    def widget(self, rank: int, widget: Any) -> None:
        if not _in_a_notebook():
            return super().widget(rank, widget)
        from IPython.display import display

        display(_label(rank), raw=True)
        display(widget)


class Tabs(View):
    """Each rank's output in its own tab of one ``ipywidgets.Tab``."""

    def __init__(self, ranks: list[int]):
        import ipywidgets

        self.outputs = {rank: ipywidgets.Output() for rank in ranks}
        self.tab = ipywidgets.Tab(children=list(self.outputs.values()))
        for i, rank in enumerate(ranks):
            self.tab.set_title(i, f"rank {rank}")
        self._bars: dict[tuple[int, str], int] = {}  # (rank, stream) -> its output's index

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.tab)

    def _append(self, rank: int, output: dict) -> int:
        out = self.outputs[rank]
        out.outputs = (*out.outputs, output)
        return len(out.outputs) - 1

    def lines(self, rank: int, stream: str, lines: list[str]) -> None:
        text = "".join(f"{line}\n" for line in lines)
        self._append(rank, {"output_type": "stream", "name": stream, "text": text})

    def progress(self, rank: int, stream: str, text: str, done: bool) -> None:
        output = {"output_type": "stream", "name": stream, "text": text + "\n"}
        at = self._bars.pop((rank, stream), None) if done else self._bars.get((rank, stream))
        if at is None:
            at = self._append(rank, output)
            if not done:
                self._bars[rank, stream] = at
        else:
            out = self.outputs[rank]
            out.outputs = (*out.outputs[:at], output, *out.outputs[at + 1 :])

    def object(self, rank: int, obj: Any, text: str) -> None:
        if obj is None:
            self.lines(rank, "stdout", [text])
        else:
            self.outputs[rank].append_display_data(obj)

    def widget(self, rank: int, widget: Any) -> None:
        self.outputs[rank].append_display_data(widget)


def mirror(rank: int, message: protocol.WidgetState) -> tuple[Any, bool]:
    """The kernel's copy of a rank's widget, its state updated; and whether it is new."""
    key = (rank, message.model_id)
    widget = _mirrors.get(key)
    new = widget is None
    if new:
        import ipywidgets

        kind = getattr(importlib.import_module(message.module), message.name)
        if not (isinstance(kind, type) and issubclass(kind, ipywidgets.DOMWidget)):
            raise TypeError(f"rank {rank} sent {message.module}.{message.name}: not a widget")
        widget = _mirrors[key] = kind()
    widget.set_state(message.state)
    return widget, new


@contextmanager
def routed(cluster: Any, view: View) -> Iterator[View]:
    """Show ``cluster``'s rank output in ``view`` while inside."""
    before, cluster._output.view = cluster._output.view, view
    try:
        yield view
    finally:
        cluster._output.view = before
