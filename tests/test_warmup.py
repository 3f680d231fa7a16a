"""Issue 22: what a kernel imports while its ranks start, and the wire's fast encoding.

The kernel's warm-up runs in a fresh interpreter (a subprocess): this one has imported
everything already. What ranks pay ahead of a first run is in test_prestart.py.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import threading
import time

import cloudpickle

from pdlab.control import protocol

# A fresh kernel whose warm-up first imports a slow module (it sets an event, then sleeps),
# and whose main thread asks for ``pdlab.TrainConfig`` while that import runs.
KERNEL = """
import builtins, json, sys, threading, time
builtins.importing = threading.Event()
sys.path.insert(0, {folder!r})
import pdlab
from pdlab.control import warmup
warmup._preloaded.insert(0, ("slow_probe", False))  # first, and the kernel's only
warmup.in_kernel()
assert builtins.importing.wait(60)
start = time.monotonic()
pdlab.TrainConfig  # a first use: its module isn't imported yet
waited = time.monotonic() - start
warmup.in_kernel().join(300)
print(json.dumps({{
    "waited": waited,
    "probe_done_first": sys.modules["slow_probe"].done < start + waited,
    "missing": [m for m in warmup.modules(kernel=True) if m not in sys.modules],
    "timed": sorted(warmup.timings),
}}))
"""
SLOW_PROBE = """
import builtins, time
builtins.importing.set()
time.sleep({seconds})
done = time.monotonic()
"""


def run_kernel(tmp_path, seconds: float) -> dict:
    import json

    (tmp_path / "slow_probe.py").write_text(SLOW_PROBE.format(seconds=seconds))
    script = KERNEL.format(folder=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_first_use_in_the_kernel_waits_for_the_warm_ups_import(tmp_path):
    # Without the wait (``beside_the_kernels`` a no-op), the main thread imports beside the
    # warm-up at once (waited ~0.01 s, the probe still sleeping), which is how two threads
    # end up with a half-imported module.
    seen = run_kernel(tmp_path, seconds=1.5)
    assert seen["waited"] >= 1.0 and seen["probe_done_first"], seen
    # Then it imports everything a first pdlab.train and the dashboard need, one at a time.
    assert seen["missing"] == []
    assert {"pandas", "pdlab.training.loop", "pdlab.lab.dashboard"} <= set(seen["timed"])


def test_plain_messages_take_the_c_pickler_and_the_rest_cloudpickle():
    call = protocol.Call(7, "call", cloudpickle.dumps((len, ("ab",), {})), ("/tmp", ["/x"]))
    frame = protocol.encode(call)
    assert frame == pickle.dumps(call, cloudpickle.DEFAULT_PROTOCOL)
    assert pickle.loads(frame) == call
    # A display's value may hold a rank's own objects: cloudpickle, as before.
    shown = protocol.Here(1, location=lambda: "a function defined on a rank")
    assert pickle.loads(protocol.encode(shown)).location() == "a function defined on a rank"


def test_a_call_goes_in_before_the_warm_ups_next_step(monkeypatch):
    # Steps of 0.05 s each, back to back: the warm-up re-takes the lock at once after each
    # one, so a thread woken by its release found it taken again, step after step (a call
    # waited 12 s in CI). With ``holding``, a call waits for the step in flight only.
    from pdlab.control import warmup

    done = threading.Event()  # the test's end: the steps left return at once
    monkeypatch.setattr(warmup, "_preloaded", [])
    steps = {f"step {i}": lambda: spin(0.05, done) for i in range(400)}
    monkeypatch.setattr(warmup, "_first_uses", steps)
    monkeypatch.setattr(warmup, "timings", {})
    thread = warmup.in_background()
    while not warmup.timings:  # the warm-up is under way
        time.sleep(0.001)
    waited = []
    for _ in range(10):
        start = time.monotonic()
        with warmup.holding():
            waited.append(time.monotonic() - start)
        time.sleep(0.01)
    done.set()
    thread.join()
    # One step (0.05 s) each at most, 0.5 s in all; a busy machine's scheduling allowed
    # for. Without ``holding``'s ticket, 0.5-10 s in all here (it failed 2 tries in 3).
    assert sum(waited) < 2.0, waited


def test_a_first_use_on_the_main_thread_makes_way_for_a_call(monkeypatch):
    import queue

    import torch

    from pdlab.control import warmup

    layer = torch.nn.Linear(4, 4)

    started = []

    def forever():  # a model's steps: each module's forward is a point to yield at
        started.append(time.monotonic())
        with warmup.yielding():
            while True:
                layer(torch.ones(4))

    def stubborn():  # the known-wrong use: the same steps, for 1 s, outside yielding()
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            layer(torch.ones(4))

    monkeypatch.setattr(warmup, "timings", {})
    monkeypatch.setattr(warmup, "_imported", threading.Event())
    warmup._imported.set()  # the background warm-up is done: the main thread's turn
    waited, left = {}, {}
    for name, use, after in (
        ("forever", forever, 0.1),  # a call soon after the last: the rank isn't idle yet
        ("forever", forever, warmup.IDLE_S + 0.3),
        ("stubborn", stubborn, warmup.IDLE_S + 0.3),
    ):
        monkeypatch.setattr(warmup, "_main_thread_uses", {name: use})
        calls, arrived, got = queue.SimpleQueue(), [], []

        def arrive(calls=calls, arrived=arrived):
            arrived.append(time.monotonic())
            calls.put("a call")

        threading.Timer(after, arrive).start()
        thread = threading.Thread(
            target=lambda calls=calls, got=got: got.append(warmup.next_call(calls)), daemon=True
        )
        thread.start()
        thread.join(timeout=30)  # not forever, should ``forever`` never yield
        assert got == ["a call"], name
        waited[name] = time.monotonic() - arrived[0]
        left[name] = list(warmup._main_thread_uses)
        if after < warmup.IDLE_S:
            assert started == [], "a first use started before the rank was idle"
    assert len(started) == 1
    # ``forever`` made way at its next module and waits for the next wait to run again...
    assert waited["forever"] < 0.5, waited
    assert left["forever"] == ["forever"] and "forever" not in warmup.timings
    assert warmup._calls is None
    # ...where one that never yields kept the call waiting to its end (0.7 s), and is done.
    assert waited["stubborn"] >= 0.5, waited
    assert left["stubborn"] == [] and warmup.timings["stubborn"] >= 1.0


def spin(seconds: float, done: threading.Event) -> None:
    """Compute for ``seconds`` holding the GIL, as an import does, unless ``done``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end and not done.is_set():
        pass


STOPPING = """
import threading, time
from pdlab.control import warmup

ran, begun = [], threading.Event()

def slow_step():
    begun.set()
    time.sleep(0.5)
    ran.append("first")

thread = threading.Thread(target=warmup._timed, args=("first", slow_step))
thread.start()
begun.wait()
warmup.stop()  # waits for the step in flight ...
assert ran == ["first"], ran
warmup._timed("second", lambda: ran.append("second"))  # ... and starts no other
assert ran == ["first"], ran
"""


def test_a_rank_that_exits_stops_its_warm_up_between_two_steps():
    # In a process of its own: stopping is for good, and this one's kernel warm-up goes on.
    run = subprocess.run([sys.executable, "-c", STOPPING], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
