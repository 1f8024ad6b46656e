"""Step events from the engine, and the stop flag that widgets (or a kernel interrupt) set.

The engine calls `emit(Event(...))` on a list of plain callables; widgets subscribe by being one of them.
Nothing here imports torch, IPython or ipywidgets.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["start", "step", "eval", "samples", "histogram", "warning", "alarm", "end"]


@dataclass
class Event:
    """One thing that happened in a training run.

    kind: start (payload: config, total steps), step (metrics of one optimizer step), eval (held-out metrics),
    samples (payload: rows of text to show), histogram (payload: title, xlabel, series of values),
    warning (payload: message), alarm (the run diverged; payload: message, the one line that says what happened and
    what to change, and stopped, whether the run stops with its last good weights), end (payload: reason).
    """

    kind: Kind
    stage: str
    step: int = 0
    total: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    payload: Any = None
    time: float = field(default_factory=time.monotonic)


Callback = Callable[[Event], None]


class Emitter:
    """Sends events to callbacks. A callback that raises is dropped with a warning: it must not stop training."""

    def __init__(self, stage: str, callbacks: Sequence[Callback] = ()):
        self.stage = stage
        self.callbacks = list(callbacks)
        self.total = 0

    def __call__(self, kind: Kind, step: int = 0, metrics: dict | None = None, payload: Any = None) -> None:
        ev = Event(kind, self.stage, step, self.total, dict(metrics or {}), payload)
        for cb in list(self.callbacks):
            try:
                cb(ev)
            except Exception as e:
                self.callbacks.remove(cb)
                import warnings

                warnings.warn(f"rlhf-magic: a progress view failed and was detached: {e!r}", stacklevel=2)


class StopControl:
    """Asks a running loop to end after its current step (a Stop button, or the first Ctrl-C / interrupt)."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = ""

    def request(self, reason: str = "stopped by the user", *, replace: bool = False) -> None:
        """The first reason stays, unless `replace` (a divergence, which changes the weights the result keeps)."""
        if replace or not self.requested:
            self.reason = reason  # before the flag: another thread (a Stop click) may set it
            self.requested = True

    @contextlib.contextmanager
    def catch_interrupt(self) -> Iterator[StopControl]:
        """While active, the first SIGINT only sets the flag; a second one interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                signal.signal(signal.SIGINT, previous)
                raise KeyboardInterrupt
            self.request("interrupted (the run ends after the current step; interrupt again to abort)")

        signal.signal(signal.SIGINT, handler)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)
