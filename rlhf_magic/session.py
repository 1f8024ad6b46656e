"""The session registry (`rlhf` in the notebook): results by name, lineage, and the shared runtime.

It lives on the magics instance, not in a module global, so `%unload_ext` drops it cleanly. Importing this
module does not import torch; the runtime is created on first use.
"""

from __future__ import annotations

import html
from typing import Any

from .errors import RLHFError, did_you_mean


class Session:
    """Named results of this notebook session, newest last."""

    def __init__(self, device: str | None = None, precision: str | None = None) -> None:
        self._handles: dict[str, Any] = {}
        self._runtime: Any = None
        self._device, self._precision = device, precision

    @property
    def runtime(self) -> Any:
        if self._runtime is None:
            from .engine.runtime import Runtime

            self._runtime = Runtime(self._device, self._precision)
        return self._runtime

    def add(self, handle: Any) -> Any:
        self._handles.pop(handle.name, None)  # re-running a cell makes the new result the newest
        self._handles[handle.name] = handle
        return handle

    def __getitem__(self, name: str) -> Any:
        if name not in self._handles:
            known = ", ".join(self._handles) or "none yet"
            raise RLHFError(f"no result named {name!r}{did_you_mean(name, self._handles)}; results: {known}")
        return self._handles[name]

    def __contains__(self, name: object) -> bool:
        return name in self._handles

    def __iter__(self):
        return iter(self._handles.values())

    def __len__(self) -> int:
        return len(self._handles)

    def latest(self, kind: str, stage: str | None = None) -> Any | None:
        """The newest result of a kind ('policy', 'reward') and optionally a stage ('sft', 'ppo')."""
        for h in reversed(list(self._handles.values())):
            if h.kind == kind and (stage is None or h.stage == stage):
                return h
        return None

    def close(self) -> None:
        """Forget every result and free the cached models."""
        self._handles.clear()
        if self._runtime is not None:
            self._runtime.release()
            self._runtime = None

    def rows(self) -> list[dict[str, str]]:
        out = []
        for h in self._handles.values():
            summary = getattr(getattr(h, "metrics", None), "summary", {}) or {}
            brief = ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(summary.items())[:4]
            )
            out.append(
                {
                    "name": h.name,
                    "kind": h.kind,
                    "stage": h.stage,
                    "parents": ", ".join(h.parents) or "-",
                    "summary": brief,
                }
            )
        return out

    def __repr__(self) -> str:
        rows = self.rows()
        if not rows:
            return "rlhf session: no results yet (run %%sft NAME to make one)"
        lines = [f"rlhf session: {len(rows)} result(s)"]
        lines += [
            f"  {r['name']:<16} {r['kind']:<7} {r['stage']:<7} from {r['parents']:<20} {r['summary']}" for r in rows
        ]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        rows = self.rows()
        if not rows:
            return "<i>rlhf session: no results yet (run <code>%%sft NAME</code> to make one)</i>"
        head = "".join(f"<th style='text-align:left'>{c}</th>" for c in ("name", "kind", "stage", "parents", "summary"))
        body = "".join(
            "<tr>"
            + "".join(
                f"<td style='text-align:left'>{html.escape(r[c])}</td>"
                for c in ("name", "kind", "stage", "parents", "summary")
            )
            + "</tr>"
            for r in rows
        )
        return f"<table class='rlhf-session'><tr>{head}</tr>{body}</table>"
