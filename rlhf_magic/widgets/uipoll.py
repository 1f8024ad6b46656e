"""Let a widget's clicks reach the kernel while the cell that shows it is still running.

Why it is needed: ipykernel runs the shell messages of its main shell (cells, and widgets' `comm_msg`) one at a time
on the main thread, so a Stop click made during training waits behind the running cell and is handled after it.

The mechanism (ipykernel 7 with per-comm routing, i.e. `BaseComm._reply_subshell_for`; 7.4 here):

* ipykernel 7 reads the shell socket on its "Shell channel" thread and forwards each message over an inproc socket
  to the main shell or to a *subshell* (a thread with its own event loop). For `comm_msg`/`comm_close` it asks the
  target comm, `comm._reply_subshell_for(data, default)`, which subshell to use (`default`: the one in the header).
* `poll_ui_events(*widgets)` creates, once per kernel, a private subshell (on the shell channel thread, as ipykernel
  does for a `create_subshell_request`) and sets, on the comms of `widgets` and of their children, a
  `_reply_subshell_for` that answers that subshell. From then on their front-end messages are handled at once on the
  subshell's thread while the main thread trains; their callbacks (e.g. `StopControl.request`) run there.
* Nothing else changes: only the comms given here are rerouted. Execute requests, other widgets and all other
  messages still go to the main shell, in order; nothing is read from a socket here and nothing runs re-entrantly
  on the main thread. Later calls only check that the routing is in place (throttled, a few microseconds).
* A front end that sends comm messages on a subshell of its own (JupyterLab >= 4.4, setting "Kernel comms over
  subshells", default one per comm target) keeps its choice. That setting alone does *not* help with ipykernel 7.4:
  the comm's own `_reply_subshell_for` routes to the shell that last published on the comm, the main shell for a
  widget a cell made (checked with JupyterLab 4.6.6: without this module the click waits for the cell's end).

Limits:

* Callbacks of routed widgets run on another thread: route only widgets whose handlers are thread-safe (set a flag,
  update their own traits). `comm` also fires IPython's pre/post_execute events around them, on that thread.
* A click sent before the first call (e.g. while a model loads) is already queued for the main shell and is handled
  when the cell ends.
* The subshell publishes busy/idle statuses whose parent is the click; a front end that does not filter statuses by
  parent type may show the kernel idle between the click and the end of the cell (cosmetic; JupyterLab 4.6 filters
  them and kept showing busy).
* A no-op returning False outside a kernel, with ipykernel 6 (e.g. Colab: there only the kernel interrupt stops a
  run) or a 7.x without per-comm routing, and in in-process kernels and others without a shell channel thread.
  It uses ipykernel internals (`shell_channel_thread.manager`, `_create_subshell`, `_reply_subshell_for`): if they
  change, it degrades to a no-op rather than failing. The subshell is listed by `%subshell`.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

MIN_INTERVAL_S = 0.2
CREATE_TIMEOUT_S = 5.0

_lock = threading.Lock()
_subshells: dict[int, str | None] = {}  # id(kernel) -> our subshell id, None where it cannot be made
_last: tuple[tuple[int, ...], float, bool] = ((), -1.0, False)  # (widget ids, time, result) of the last call


def poll_ui_events(*widgets: Any) -> bool:
    """Have the front-end events of `widgets` handled now, on a kernel subshell, while this cell runs.

    Cheap (throttled to one real check per MIN_INTERVAL_S for the same widgets) and safe anywhere: a no-op returning
    False where it cannot work. True when every given widget's messages reach the kernel during the cell.
    """
    global _last
    key, now = tuple(map(id, widgets)), time.monotonic()
    if key == _last[0] and now - _last[1] < MIN_INTERVAL_S:
        return _last[2]
    try:
        ok = _route(widgets)
    except Exception:  # internals moved: degrade to doing nothing
        ok = False
    _last = (key, now, ok)
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
        if default is not None:
            return default
        return self.subshell if self.subshell in self.alive() else None


def _subshell(kernel: Any, manager: Any) -> str | None:
    """Our subshell in this kernel, created on the shell channel thread on first use (None if that fails)."""
    with _lock:
        sid = _subshells.get(id(kernel), "")
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
        _subshells[id(kernel)] = sid
        return sid
