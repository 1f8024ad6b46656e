"""The session registry (`rlhf` in the notebook): results by name, lineage, and the shared runtime.

It lives on the magics instance, not in a module global, so `%unload_ext` drops it cleanly. Importing this
module does not import torch; the runtime is created on first use.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, RLHFError, did_you_mean

# rlhf-magic's results by class (module, name), and what one is called; matched along the MRO, so subclasses count
RESULTS = {
    ("rlhf_magic.engine.handles", "PolicyHandle"): "policy",
    ("rlhf_magic.engine.reward_model", "RewardHandle"): "reward model",
    ("rlhf_magic.widgets.ranking", "RankingPanel"): "ranking panel",
    ("rlhf_magic.widgets.compare", "ComparePanel"): "comparison panel",
    ("rlhf_magic.preferences", "Preferences"): "preferences",
    ("rlhf_magic.comparison", "Comparison"): "comparison",
}


HANDLES = ("policy", "reward model")  # the kinds the session registers by name


def result_kind(obj: Any) -> str | None:
    """'policy', 'reward model', 'ranking panel', ... for an rlhf-magic result; None for anything else."""
    for cls in type(obj).__mro__:
        kind = RESULTS.get((cls.__module__, cls.__name__))
        if kind is not None:
            return kind
    return None


def a_type(obj: Any) -> str:
    """'a list', 'an int', 'a function': what a notebook variable holds, for error messages."""
    name = "function" if callable(obj) and hasattr(obj, "__code__") else type(obj).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


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

    def check_name(self, name: str, namespace: Mapping[str, Any], kind: str, magic: str, verb: str = "replaces") -> str:
        """Before any work: may a new result of `kind` (a value of RESULTS) take `name` in the notebook?

        A ConfigError when it would overwrite a variable that is not an rlhf-magic result or a result of another
        kind, or when a panel would shadow a policy or reward model of the session; else the line to print once
        the new result is bound ('' for a new name). A result deleted from the notebook (`del rm0`) but still in
        the session may be replaced by any kind."""
        here = name in namespace
        if not here and name not in self._handles:
            return ""
        old = namespace[name] if here else self._handles[name]
        old_kind = result_kind(old)
        if here and old_kind is None:
            raise ConfigError(
                f"{name} is already a notebook variable ({a_type(old)}); choose another name or `del {name}` first"
            )
        if kind not in HANDLES and (name in self._handles or old_kind in HANDLES):
            shadowed = result_kind(self._handles.get(name, old))
            raise ConfigError(
                f"{magic} {name}: {name} is a {shadowed} of this session, and a {kind} of that name would hide it "
                f"from %compare; choose another name, e.g. {name}_panel"
            )
        if here and old_kind != kind:
            raise ConfigError(
                f"{name} is already a {old_kind}; choose another name for the {kind}, or `del {name}` first"
            )
        return f"{name}: {verb} the earlier {old_kind} {name}"

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
