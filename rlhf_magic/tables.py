"""How preferences read in a notebook: rankings in the panel's letters, and tables that show full texts.

pandas cuts every cell at 50 characters in a notebook; the tables here are DataFrames whose notebook view shows
each text in full, wrapped (`white-space: pre-wrap`), so a pairs table can be read like the panel.
"""

from __future__ import annotations

import functools
import json
import string
from collections.abc import Sequence
from typing import Any

LETTERS = string.ascii_uppercase  # answer A, B, C ... as the panel shows them
HISTORY_COLUMNS = ("prompt", "time", "labeler", "action", "ranking", "flags", "comment", "id")  # history()
WRAP_CSS = (
    "<style>.rlhf-table td{white-space:pre-wrap;text-align:left;vertical-align:top;min-width:8em;max-width:48em}"
    "</style>"
)


def ranking_text(groups: Sequence[Sequence[int]] | None) -> str:
    """Groups -> the panel's letters, best first: 'B > A > C = D' ('' for no ranking)."""
    if not groups:
        return ""
    if any(i >= len(LETTERS) for g in groups for i in g):
        return json.dumps([g[0] if len(g) == 1 else sorted(g) for g in groups])
    return " > ".join(" = ".join(LETTERS[i] for i in sorted(g)) for g in groups)


def groups_of(rec: dict) -> list[list[int]]:
    """A checked record's ranking as rank groups ([] for a flagged prompt without a ranking)."""
    return [g if isinstance(g, list) else [g] for g in rec.get("ranking") or []]


def history_rows(log: Sequence[dict]) -> list[dict[str, Any]]:
    """What happened, in file order: 'saved', 'replaced' (a new ranking replacing an earlier one, after Back) and
    'undone' (a retraction), each with its time and labeler and the ranking it concerns."""
    rows, seen = [], {}
    for rec in log:
        undone = seen.get(rec.get("retracts")) if rec.get("kind") == "retraction" else None
        if rec.get("kind") == "retraction" and undone is None:
            continue
        target = undone or rec
        action = "undone" if undone else "replaced" if rec.get("replaces") in seen else "saved"
        if undone is None and isinstance(rec.get("id"), str):
            seen[rec["id"]] = rec
        rows.append(
            {
                "prompt": target["prompt"],
                "time": rec.get("time") or "",
                "labeler": rec.get("labeler") or target.get("labeler") or "",
                "action": action,
                "ranking": ranking_text(groups_of(target)),
                "flags": list(target.get("flags") or []),
                "comment": target.get("comment") or "",
                "id": rec.get("id") or "",
            }
        )
    return rows


@functools.cache
def _table_type() -> type:
    import pandas as pd

    class Table(pd.DataFrame):
        """A DataFrame whose notebook view shows every text in full, wrapped (pandas cuts cells at 50 characters)."""

        @property
        def _constructor(self) -> type:
            return Table

        def _repr_html_(self) -> str | None:
            with pd.option_context("display.max_colwidth", None):
                body = super()._repr_html_()
            return None if body is None else f"<div class='rlhf-table'>{WRAP_CSS}{body}</div>"

    Table.__module__, Table.__qualname__ = __name__, "Table"  # pickles as rlhf_magic.tables.Table
    return Table


def __getattr__(name: str) -> Any:
    """`rlhf_magic.tables.Table`, made on first use (pandas is imported only then)."""
    if name == "Table":
        return _table_type()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> Any:
    """A pandas DataFrame of `rows` (the same columns when empty) that shows full texts, wrapped, in a notebook."""
    return _table_type()(list(rows), columns=list(columns))
