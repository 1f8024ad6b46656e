"""Let a widget's clicks (e.g. Stop) reach the kernel while the cell that shows it is still running.

ipykernel handles a cell and widget `comm_msg`s one at a time on its main thread, so a click waits for the cell to end.
On ipykernel 7 with per-comm routing (`BaseComm._reply_subshell_for`) we route the given widgets' comms to a private
subshell (a thread of its own). Elsewhere (no kernel, ipykernel 6 as on Colab, in-process kernels) it is a no-op that
returns False; it relies on ipykernel internals and degrades to a no-op if they change.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MIN_INTERVAL_S = 0.2
CREATE_TIMEOUT_S = 5.0


@dataclass
class _State:
    """What poll_ui_events remembers. Process-wide because the kernel is: one subshell of ours per kernel, shared by
    every view that calls this, and the throttle holds across calls from the training loop."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    subshells: dict[int, str | None] = field(default_factory=dict)  # id(kernel) -> our subshell (None: cannot be made)
    last: tuple[tuple[int, ...], float, bool] = ((), -1.0, False)  # (widget ids, time, result) of the last real check


_STATE = _State()


def poll_ui_events(*widgets: Any) -> bool:
    """Have the front-end events of `widgets` handled now, on a kernel subshell, while this cell runs.

    Cheap (throttled to one real check per MIN_INTERVAL_S for the same widgets) and safe anywhere: a no-op returning
    False where it cannot work. True when every given widget's messages reach the kernel during the cell. A click sent
    before the first call is already queued for the main shell and is handled when the cell ends.
    """
    key, now = tuple(map(id, widgets)), time.monotonic()
    last = _STATE.last
    if key == last[0] and now - last[1] < MIN_INTERVAL_S:
        return last[2]
    try:
        ok = _route(widgets)
    except Exception:  # internals moved: degrade to doing nothing
        ok = False
    _STATE.last = (key, now, ok)
    return ok


def _kernel() -> Any:
    """The running ipykernel kernel if it can route comms to subshells, else None."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    kernel = getattr(shell, "kernel", None)
    if kernel is None or getattr(kernel, "shell_channel_thread", None) is None:
        return None
    if not getattr(kernel, "_supports_kernel_subshells", False) or getattr(kernel, "comm_manager", None) is None:
        return None
    comm_mod = sys.modules.get("ipykernel.comm.comm")
    if comm_mod is None or not callable(getattr(comm_mod.BaseComm, "_reply_subshell_for", None)):
        return None  # subshells, but comm messages are routed by their header only
    return kernel


def _route(widgets: tuple[Any, ...]) -> bool:
    """Set a `_Router` on the comms of `widgets` (and their children); all other messages keep going to the main
    shell, in order. Callbacks of routed widgets run on the subshell's thread: route only thread-safe handlers."""
    kernel = _kernel()
    comms = [c for w in widgets for c in _comms(w)] if kernel is not None else []
    if not comms:
        return False
    manager = kernel.shell_channel_thread.manager
    subshell = _subshell(kernel, manager)
    if subshell is None:
        return False
    for c in comms:
        router = c.__dict__.get("_reply_subshell_for")
        if not (isinstance(router, _Router) and router.subshell == subshell):
            # ipykernel's own router answers the shell that last published on the comm (the main shell for a widget
            # a cell made), so without ours a click waits for the cell even with JupyterLab's comm subshells
            c._reply_subshell_for = _Router(subshell, manager.list_subshell)
    return True


def _comms(widget: Any) -> list[Any]:
    """The open kernel comms of a widget and of the widgets it contains."""
    comm = getattr(widget, "comm", None)
    out = [comm] if comm is not None and hasattr(comm, "__dict__") else []
    for child in getattr(widget, "children", None) or ():
        out += _comms(child)
    return out


class _Router:
    """A comm's `_reply_subshell_for`: our subshell, unless the front end chose one or ours was deleted."""

    def __init__(self, subshell: str, alive: Callable[[], list[str]]):
        self.subshell, self.alive = subshell, alive

    def __call__(self, data: Any, default: str | None) -> str | None:
        if default is not None:  # a front end that sends comms on a subshell of its own (JupyterLab >= 4.4) keeps it
            return default
        return self.subshell if self.subshell in self.alive() else None


def _subshell(kernel: Any, manager: Any) -> str | None:
    """Our subshell in this kernel, created on the shell channel thread on first use (None if that fails)."""
    with _STATE.lock:
        sid = _STATE.subshells.get(id(kernel), "")
        if sid is None or (sid and sid in manager.list_subshell()):
            return sid
        done, box = threading.Event(), {}

        def create() -> None:  # runs on the shell channel thread, where ipykernel creates its subshells
            try:
                box["id"] = manager._create_subshell()
            finally:
                done.set()

        kernel.shell_channel_thread.io_loop.add_callback(create)
        sid = box.get("id") if done.wait(CREATE_TIMEOUT_S) else None
        _STATE.subshells[id(kernel)] = sid
        return sid
