"""The keyboard and drag view of the ranking panel: a small anywidget whose ESM module ships in `static/`.

`Cards` (ranking_cards.py) holds the one ranking state, in its click-to-rank buttons. After every change it pushes a
`state` (answers, ranks, display order, status line) to this view, which draws the answers as a reorderable list with
one tab stop, a visible focus ring, rank buttons that name themselves ("Rank answer A as 1", `aria-pressed`) and the
keyboard shortcuts. The view never ranks on its own: it sends actions back (a custom message, or the `order` traitlet
for a drag), `apply_message` / `check_order` check them, and Cards applies them exactly as the matching clicks.
Without anywidget (or in a front end that cannot run the module) the click cards stay, and the panel says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

STATIC = Path(__file__).with_name("static")
LETTERS = "ABCDEFGHI"
ACTIONS = ("submit", "skip", "undo", "back", "flag", "tie")
NO_ANYWIDGET = (
    'Keyboard shortcuts and drag-to-rank need the anywidget package (pip install "rlhf-magic[notebook]"): rank by '
    "clicking."
)
NOT_LOADED = "The keyboard and drag view did not load in this front end: rank by clicking the buttons."
DROPPED_OUTSIDE = "Dropped outside the list of answers: the ranking is unchanged (drop it on the list to move it)."

_CLASSES: dict[str, type] = {}


class ViewTarget(Protocol):
    """What `apply_message` drives: `Cards`."""

    def rank(self, card: Any, rank: Any) -> None: ...
    def act(self, name: str) -> None: ...
    def view_loaded(self) -> None: ...
    def refuse(self, message: str) -> None: ...


def view_class() -> type | None:
    """The RankView widget class, or None when anywidget cannot be imported (asked by every new panel)."""
    try:
        import anywidget
        import traitlets
    except ImportError:
        return None
    if "view" not in _CLASSES:

        class RankView(anywidget.AnyWidget):
            """The answers as a reorderable, keyboard-driven list: renders `state`; a drag sets `order`."""

            _esm = STATIC / "rank_list.js"
            _css = STATIC / "rank_list.css"
            state = traitlets.Dict().tag(sync=True)
            order = traitlets.List(traitlets.Int()).tag(sync=True)  # answer indices, best first

        _CLASSES["view"] = RankView
    return _CLASSES["view"]


def apply_message(target: ViewTarget, content: Any) -> None:
    """One message from the view's front end, applied through `target` (the same path as a click)."""
    action = content.get("action") if isinstance(content, dict) else None
    if action == "ready":
        target.view_loaded()
    elif action == "rank":
        target.rank(content.get("card"), content.get("rank"))
    elif action == "drop_outside":
        target.refuse(DROPPED_OUTSIDE)
    elif action in ACTIONS:
        target.act(action)
    else:
        target.refuse(f"the ranking view sent {action!r}; expected one of: rank, {', '.join(ACTIONS)}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_rank(card: Any, rank: Any, k: int) -> str | None:
    """Why `rank card as rank` cannot be applied to K = `k` answers on screen (rank 0 clears), or None."""
    if k == 0:
        return "No answers are shown right now: there is nothing to rank."
    if card is None:
        return f"No answer has focus: click an answer or Tab to the answers, then press 1 to {k}."
    if not _is_int(card) or not 0 <= card < k:
        return f"Answer {card!r} is not on screen: the answers here are A to {LETTERS[k - 1]}."
    if not _is_int(rank) or not 0 <= rank <= k:
        return f"Rank {rank!r} is out of range: answer {LETTERS[card]} takes a rank from 1 to {k} (0 clears it)."
    return None


def check_order(order: Any, k: int) -> str | None:
    """Why a dragged `order` (answer indices, best first) is not an order of the `k` answers on screen, or None."""
    if k == 0:
        return "No answers are shown right now: there is nothing to reorder."
    if not isinstance(order, (list, tuple)) or sorted(order) != list(range(k)) or not all(map(_is_int, order)):
        return f"Order {order!r} is not an order of the {k} answers: give each of 0 to {k - 1} once, best first."
    return None


def display_order(ranks: list[int]) -> list[int]:
    """Answer indices as the list shows them: ranked ones by rank (ties by letter), then the unranked by letter."""
    return sorted(range(len(ranks)), key=lambda j: (ranks[j] or len(ranks) + 1, j))
