"""The widgets of the ranking panel: prompt, one card per answer with rank buttons, flag, buttons, status.

Every interactive element carries an `rlhf-...` CSS class (stable selectors for browser tests). Without ties,
picking a rank another card holds swaps the two, and the last free rank fills itself in, so a complete
ranking takes K-1 clicks. K = 2 is a pairwise choice: A is better / Tie / B is better.

The rank buttons here are the one ranking state. With anywidget, a keyboard and drag view (rank_view.py) draws the
same state as a reorderable list and replaces these cards on screen; its actions come back through `rank`,
`apply_order` and `act`, which change the same buttons a click does.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from . import notebook_module, rank_view

LETTERS = "ABCDEFGHI"
UNSET = "–"
PAIR = {"A is better": [[0], [1]], "Tie": [[0, 1]], "B is better": [[1], [0]]}
PAIR_RANKS = {None: [0, 0], "A is better": [1, 2], "Tie": [1, 1], "B is better": [2, 1]}
BORDER = {"unset": "1px dashed #bbb", "set": "1px solid #888", "best": "2px solid #2e7d32"}
BEST = (
    "<span class='rlhf-best-badge' style='background:#2e7d32;color:#fff;border-radius:10px;padding:1px 8px;"
    "font-size:.85em;font-weight:bold'>{}</span>"
)
# An unset rank ("–", ipywidgets' data-value %E2%80%93) is outlined, a chosen rank filled, focus is a 3 px ring; the
# note that the keyboard view did not load waits 3 s (the view hides it once it runs). Front ends that drop <style>
# in widget HTML still show ipywidgets' own highlight, the card borders and the "Best" badge.
_OUTLINE = (
    "background:#fff !important;color:#546e7a !important;border:1px solid #90a4ae !important;padding:0 !important"
)
CSS = (
    "<style>"
    f".rlhf-rank .widget-toggle-button, .rlhf-choice .widget-toggle-button{{{_OUTLINE}}}"
    ".rlhf-rank .widget-toggle-button.mod-active, .rlhf-choice .widget-toggle-button.mod-active"
    "{background:#1565c0 !important;color:#fff !important;border-color:#1565c0 !important;font-weight:bold}"
    f".rlhf-rank .widget-toggle-button[data-value='%E2%80%93'].mod-active{{{_OUTLINE};border-style:dashed !important;"
    "font-weight:normal}"
    ".rlhf-ranking-panel :focus-visible{outline:3px solid #1565c0 !important;outline-offset:2px}"
    ".rlhf-late{animation:rlhf-late 3s step-end}"
    "@keyframes rlhf-late{from{visibility:hidden}to{visibility:visible}}"
    "</style>"
)


def describe(obj: Any) -> str:
    """'A > C = B > D' for a record (its `ranking`) or a list of rank groups."""
    groups = obj["ranking"] if isinstance(obj, dict) else obj
    if not groups:
        return "flagged, no ranking"
    groups = [g if isinstance(g, list) else [g] for g in groups]
    return " > ".join(" = ".join(LETTERS[i] for i in sorted(g)) for g in groups)


def _answer_html(text: str) -> str:
    body = html.escape(text) if text.strip() else "<i style='color:#888'>(empty answer)</i>"
    return f"<div style='white-space:pre-wrap;line-height:1.4'>{body}</div>"


class Cards:
    """The panel's widget tree; `RankingPanel` owns the logic and calls `show`, `update` and `say`."""

    def __init__(self, on_change: Callable[[], None], title: str, labeler: str):
        W = notebook_module("ipywidgets")

        self.W, self.on_change = W, on_change
        self.responses: list[str] = []
        self.ties = False
        self.ranks: list[Any] = []  # one ToggleButtons per card (K > 2)
        self.choice: Any = None  # the pairwise ToggleButtons (K = 2)
        self.badges: list[Any] = []  # one "Best" badge per card
        self._syncing = False
        self._token, self._seq, self._said, self._pushing = 0, 0, ("", False), False
        self._view_error = False  # the status line shows a refused view action
        self.actions: dict[str, Callable[[], None]] = {}  # view actions the panel handles itself (e.g. flag)
        self._make_view()
        self.progress = self._tag(W.HTML(), "progress")
        self.bar = self._tag(W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="160px")), "progress-bar")
        self.labeler = self._tag(
            W.Text(value=labeler, placeholder="your name", description="Labeler", continuous_update=False), "labeler"
        )
        self.prompt = self._tag(W.HTML(), "prompt")
        self.cards = self._tag(W.VBox(), "cards")
        self.summary = self._tag(W.HTML(), "summary")
        self.flag = self._tag(
            W.Checkbox(value=False, description="All answers are bad or unsafe", indent=False), "flag"
        )
        self.flag.observe(lambda _: self.on_change(), names="value")  # a flagged prompt can be submitted unranked
        self.comment = self._tag(
            W.Text(description="Comment", placeholder="optional", layout=W.Layout(width="340px")), "comment"
        )
        self.buttons = {
            "submit": W.Button(description="Submit", button_style="primary", icon="check", disabled=True),
            "skip": W.Button(description="Skip", icon="forward"),
            "back": W.Button(description="Back", icon="arrow-left"),
            "undo": W.Button(description="Undo last", icon="undo"),
        }
        for name, button in self.buttons.items():
            self._tag(button, name)
        self.status = self._tag(W.HTML(), "status")
        self.log = self._tag(W.Output(), "log")
        head = W.HBox([W.HTML(f"<b>{html.escape(title)}</b>"), self.bar, self.progress, self.labeler])
        head.layout.align_items, head.layout.grid_gap = "center", "12px"
        buttons = W.HBox([self.buttons[b] for b in ("back", "skip", "undo", "submit")])
        view = [self.view] if self.view is not None else []
        rows = [W.HTML(CSS), head, self.prompt, self.view_note, self.cards, *view, self.summary]
        rows += [W.HBox([self.flag, self.comment]), buttons, self.status, self.log]
        self.root = self._tag(W.VBox(rows), "ranking-panel")

    def _make_view(self) -> None:
        """The keyboard and drag view (anywidget), or None with a note saying the click cards are the way."""
        W = self.W
        view_cls = rank_view.view_class()
        self.view = view_cls() if view_cls is not None else None
        self.view_note = self._tag(
            W.HTML(
                f"<i class='rlhf-late' style='color:#666'>{rank_view.NOT_LOADED}</i>"
                if self.view is not None
                else f"<i style='color:#666'>{rank_view.NO_ANYWIDGET}</i>"
            ),
            "view-note",
        )
        if self.view is not None:
            self._tag(self.view, "view")
            self.view.on_msg(lambda _w, content, _b: self._from_view(lambda: rank_view.apply_message(self, content)))
            self.view.observe(lambda change: self._pushing or self._from_view(lambda: self.apply_order(change["new"])),
                              names="order")  # fmt: skip

    @staticmethod
    def _tag(widget: Any, name: str) -> Any:
        widget.add_class(f"rlhf-{name}")
        return widget

    def on_button(self, name: str, fn: Callable[..., None]) -> None:
        self.buttons[name].on_click(fn)

    def on_labeler(self, fn: Callable[..., None]) -> None:
        self.labeler.observe(fn, names="value")

    def on_action(self, name: str, fn: Callable[[], None]) -> None:
        """Have the keyboard view's `name` action (e.g. "flag") call `fn` instead of the matching widget."""
        self.actions[name] = fn

    # ---- building ----------------------------------------------------------------------------------------------
    def show(self, prompt: str, responses: Sequence[str], i: int, n: int, ties: bool) -> None:
        """Cards for one prompt, nothing ranked yet."""
        W = self.W
        self._clear()
        self.responses, self.ties = list(responses), ties
        self._token += 1
        self.prompt.value = (
            f"<div style='color:#666'>Prompt {i + 1} of {n}</div>"
            f"<div style='white-space:pre-wrap;font-size:1.1em;margin:4px 0 8px'><b>{html.escape(prompt)}</b></div>"
        )
        self.flag.value, self.comment.value = False, ""
        if len(responses) == 2:
            self.choice = self._tag(
                W.ToggleButtons(options=list(PAIR), value=None, style={"button_width": "110px"}), "choice"
            )
            self.choice.observe(lambda _: self.on_change(), names="value")
            row = W.HBox([self._card(j, a, None) for j, a in enumerate(responses)])
            self.cards.children = [row, self.choice]
        else:
            options = [UNSET] + [str(r) for r in range(1, len(responses) + 1)]
            for j in range(len(responses)):
                tips = [f"Answer {LETTERS[j]}: no rank yet"] + [f"Rank answer {LETTERS[j]} as {r}" for r in options[1:]]
                tb = W.ToggleButtons(options=options, value=UNSET, tooltips=tips, style={"button_width": "30px"})
                tb.add_class("rlhf-rank")
                tb.observe(lambda change, j=j: self._on_rank(j, change), names="value")
                self.ranks.append(self._tag(tb, f"rank-{j}"))
            self.cards.children = [self._card(j, a, self.ranks[j]) for j, a in enumerate(responses)]

    def _card(self, j: int, answer: str, rank: Any) -> Any:
        W = self.W
        self.badges.append(self._tag(W.HTML(""), f"best-{j}"))
        letter = W.HTML(f"<b style='font-size:1.15em'>{LETTERS[j]}</b>")
        head = [letter, *([rank] if rank is not None else []), self.badges[j]]
        text = self._tag(W.HTML(_answer_html(answer)), f"answer-{j}")
        card = W.VBox([W.HBox(head), text], layout=W.Layout(border=BORDER["unset"], padding="4px 10px", margin="4px"))
        if rank is None:
            card.layout.width = "50%"
        return self._tag(card, "card")

    def show_note(self, message_html: str) -> None:
        """No cards, just a message (all done, or answers that could not be sampled)."""
        self._clear()
        self.responses = []
        self._token += 1
        self.prompt.value = f"<div style='font-size:1.1em'>{message_html}</div>"

    def _clear(self) -> None:
        old = [*self.ranks, self.choice]
        self.ranks, self.choice, self.badges = [], None, []
        self.cards.children = []
        for w in old:
            if w is not None:
                w.close()

    # ---- ranks -------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _sync(self) -> Iterator[None]:
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _on_rank(self, j: int, change: dict) -> None:
        if self._syncing:
            return
        if not self.ties and change["new"] != UNSET:
            with self._sync():
                for other, tb in enumerate(self.ranks):
                    if other != j and tb.value == change["new"]:
                        tb.value = change["old"]  # swap: the other card takes this card's old rank
                free = [tb for tb in self.ranks if tb.value == UNSET]
                missing = sorted(set(self.ranks[0].options[1:]) - {tb.value for tb in self.ranks})
                if len(free) == 1 and len(missing) == 1:
                    free[0].value = missing[0]  # the last rank is forced
        self.on_change()

    def groups(self) -> list[list[int]] | None:
        """The ranking on screen as rank groups, or None while it is incomplete."""
        if self.choice is not None:
            return None if self.choice.value is None else PAIR[self.choice.value]
        if not self.ranks:
            return None
        values = [tb.value for tb in self.ranks]
        if UNSET in values or (not self.ties and len(set(values)) != len(values)):
            return None
        ranks = [int(v) for v in values]
        return [[j for j, r in enumerate(ranks) if r == level] for level in sorted(set(ranks))]

    def set_groups(self, groups: Sequence[Sequence[int]]) -> None:
        with self._sync():
            if self.choice is not None:
                self.choice.value = next(label for label, g in PAIR.items() if g == [sorted(x) for x in groups])
            else:
                for level, group in enumerate(groups, 1):
                    for j in group:
                        self.ranks[j].value = str(level)
        self.on_change()

    def fill(self, record: dict) -> None:
        if record["ranking"]:  # a flagged prompt may have none
            self.set_groups([g if isinstance(g, list) else [g] for g in record["ranking"]])
        self.flag.value = "all_bad" in (record.get("flags") or [])
        self.comment.value = str(record.get("comment") or "")

    def rank_numbers(self) -> list[int]:
        """Each card's rank on screen, 0 where unset (K = 2: from the pairwise choice)."""
        if self.choice is not None:
            return list(PAIR_RANKS[self.choice.value])
        return [0 if tb.value == UNSET else int(tb.value) for tb in self.ranks]

    # ---- actions of the keyboard and drag view (the same widgets a click changes) -----------------------------
    def rank(self, card: Any, rank: Any) -> None:
        """Give answer `card` rank `rank` (0 clears it), as clicking that rank button does."""
        problem = rank_view.check_rank(card, rank, len(self.responses))
        if problem is not None:
            self.refuse(problem)
        elif self.choice is not None:  # K = 2: rank 1 makes this answer the better one, rank 2 the other
            self.choice.value = None if rank == 0 else ("A is better", "B is better")[card ^ (rank == 2)]
        else:
            self.ranks[card].value = UNSET if rank == 0 else str(rank)

    def apply_order(self, order: Any) -> None:
        """A dragged order (answer indices, best first) becomes the ranking, as clicking its ranks in turn does."""
        problem = rank_view.check_order(order, len(self.responses))
        if problem is not None:
            self.refuse(problem)
            self._push()  # the list goes back to the order on screen
            return
        self.set_groups([[j] for j in order])

    def act(self, name: str) -> None:
        """A key or button of the view: submit / skip / undo / back click that button; flag, tie."""
        if name in self.actions:
            self.actions[name]()
        elif name in self.buttons:
            self.buttons[name].click()  # the panel's own handler (a disabled button's handler explains why)
        elif name == "flag":
            self.flag.value = not self.flag.value
            self.say("Flagged: all answers are bad or unsafe (F again clears it)." if self.flag.value else "Unflagged.")
        elif name == "tie" and self.choice is not None:
            self.choice.value = "Tie"
        else:
            self.refuse("Tie is for two answers; with more, give answers the same rank (panel with ties=True).")

    def view_loaded(self) -> None:
        """The front end runs the keyboard view: drop the note that it did not load."""
        self.view_note.value = ""

    def refuse(self, message: str) -> None:
        """A view action that cannot apply: nothing changes, the status line says why (one line)."""
        self.say(message, error=True)
        self._view_error = True

    def _from_view(self, fn: Callable[[], None]) -> None:
        """Run a view action; a stale refusal on the status line goes once an action succeeds."""
        try:
            before, self._view_error = self._view_error, False
            fn()
            if before and not self._view_error and self._said[1]:
                self.say("")
        except Exception as e:  # never lose an error in the kernel's log
            self.say(f"{type(e).__name__}: {e}", error=True)

    def _push(self) -> None:
        """Send the state on screen to the keyboard view (one message; `order` is the list's order)."""
        if self.view is None:
            return
        ranks = self.rank_numbers()
        self._seq += 1
        state = {
            "seq": self._seq,
            "token": self._token,
            "answers": list(self.responses),
            "letters": list(LETTERS[: len(ranks)]),
            "ranks": ranks,
            "order": rank_view.display_order(ranks),
            "pair": self.choice is not None,
            "ties": self.ties,
            "complete": self.groups() is not None,
            "status": self._said[0],
            "error": self._said[1],
        }
        self._pushing = True
        try:
            with self.view.hold_sync():
                self.view.state, self.view.order = state, state["order"]
        finally:
            self._pushing = False

    # ---- state -------------------------------------------------------------------------------------------------
    def update(self, labelled: int, n: int, index: int | None, replacing: bool) -> None:
        groups = self.groups()
        self.progress.value = f"<b>{labelled} / {n}</b> labelled"
        self.bar.max, self.bar.value = max(n, 1), labelled
        submit = self.buttons["submit"]
        submit.disabled = index is None or (groups is None and not self.flag.value)
        submit.description = "Replace" if replacing else "Submit"
        self.buttons["back"].disabled = index == 0
        self.buttons["skip"].disabled = index is None
        ranks = self.rank_numbers()
        tied = ranks.count(1) > 1
        for j, card in enumerate(self._card_widgets()):
            card.layout.border = BORDER["best" if ranks[j] == 1 else "set" if ranks[j] else "unset"]
        for j, badge in enumerate(self.badges):
            badge.value = BEST.format("Tied best" if tied else "Best") if ranks[j] == 1 else ""
        if index is None:
            self.summary.value = ""
        elif groups is not None:
            self.summary.value = f"Your ranking: <b>{describe(groups)}</b> (best first)"
        elif self.flag.value:
            self.summary.value = "Flagged: all answers are bad or unsafe. Submit saves it without a ranking."
        elif self.ranks:
            ranked = sum(tb.value != UNSET for tb in self.ranks)
            self.summary.value = f"Give every answer a rank (1 = best): {ranked} of {len(self.ranks)} ranked"
        else:
            self.summary.value = "Which answer is better?"
        self._push()

    def _card_widgets(self) -> list[Any]:
        kids = list(self.cards.children)
        return list(kids[0].children) if self.choice is not None and kids else kids

    def say(self, message: str, ok: bool = False, error: bool = False) -> None:
        color = "#c62828" if error else "#2e7d32" if ok else "#333"
        self.status.value = f"<span style='color:{color}'>{html.escape(message)}</span>"
        self._said = (message, error)
        self._push()
