"""The widgets of the ranking panel: prompt, one card per answer with rank buttons, flag, buttons, status.

Every interactive element carries an `rlhf-...` CSS class (stable selectors for browser tests). Without ties,
picking a rank another card holds swaps the two, and the last free rank fills itself in, so a complete
ranking takes K-1 clicks. K = 2 is a pairwise choice: A is better / Tie / B is better.
"""

from __future__ import annotations

import contextlib
import html
from collections.abc import Callable, Iterator, Sequence
from typing import Any

LETTERS = "ABCDEFGHI"
UNSET = "–"
PAIR = {"A is better": [[0], [1]], "Tie": [[0, 1]], "B is better": [[1], [0]]}
BORDER = {"unset": "1px dashed #bbb", "set": "1px solid #888", "best": "2px solid #2e7d32"}
# the chosen rank stands out (front ends that drop <style> in widget HTML still show ipywidgets' own highlight)
CSS = (
    "<style>.rlhf-rank .mod-active, .rlhf-choice .mod-active"
    "{background:#1565c0 !important;color:#fff !important;font-weight:bold}</style>"
)


def describe(obj: Any) -> str:
    """'A > C = B > D' for a record (its `ranking`) or a list of rank groups."""
    groups = obj["ranking"] if isinstance(obj, dict) else obj
    groups = [g if isinstance(g, list) else [g] for g in groups]
    return " > ".join(" = ".join(LETTERS[i] for i in sorted(g)) for g in groups)


def _answer_html(text: str) -> str:
    body = html.escape(text) if text.strip() else "<i style='color:#888'>(empty answer)</i>"
    return f"<div style='white-space:pre-wrap;line-height:1.4'>{body}</div>"


class Cards:
    """The panel's widget tree; `RankingPanel` owns the logic and calls `show`, `update` and `say`."""

    def __init__(self, on_change: Callable[[], None], title: str, labeler: str):
        import ipywidgets as W

        self.W, self.on_change = W, on_change
        self.responses: list[str] = []
        self.ties = False
        self.ranks: list[Any] = []  # one ToggleButtons per card (K > 2)
        self.choice: Any = None  # the pairwise ToggleButtons (K = 2)
        self._syncing = False
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
        self.comment = self._tag(W.Text(placeholder="optional comment", layout=W.Layout(width="340px")), "comment")
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
        self.root = self._tag(
            W.VBox(
                [
                    W.HTML(CSS),
                    head,
                    self.prompt,
                    self.cards,
                    self.summary,
                    W.HBox([self.flag, self.comment]),
                    buttons,
                    self.status,
                    self.log,
                ]
            ),
            "ranking-panel",
        )

    @staticmethod
    def _tag(widget: Any, name: str) -> Any:
        widget.add_class(f"rlhf-{name}")
        return widget

    def on_button(self, name: str, fn: Callable[..., None]) -> None:
        self.buttons[name].on_click(fn)

    def on_labeler(self, fn: Callable[..., None]) -> None:
        self.labeler.observe(fn, names="value")

    # ---- building ----------------------------------------------------------------------------------------------
    def show(self, prompt: str, responses: Sequence[str], i: int, n: int, ties: bool) -> None:
        """Cards for one prompt, nothing ranked yet."""
        W = self.W
        self._clear()
        self.responses, self.ties = list(responses), ties
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
                tb = W.ToggleButtons(options=options, value=UNSET, style={"button_width": "30px"})
                tb.add_class("rlhf-rank")
                tb.observe(lambda change, j=j: self._on_rank(j, change), names="value")
                self.ranks.append(self._tag(tb, f"rank-{j}"))
            self.cards.children = [self._card(j, a, self.ranks[j]) for j, a in enumerate(responses)]

    def _card(self, j: int, answer: str, rank: Any) -> Any:
        W = self.W
        head = [W.HTML(f"<b style='font-size:1.15em'>{LETTERS[j]}</b>")] + ([rank] if rank is not None else [])
        text = self._tag(W.HTML(_answer_html(answer)), f"answer-{j}")
        card = W.VBox([W.HBox(head), text], layout=W.Layout(border=BORDER["unset"], padding="4px 10px", margin="4px"))
        if rank is None:
            card.layout.width = "50%"
        return self._tag(card, "card")

    def show_note(self, message_html: str) -> None:
        """No cards, just a message (all done, or answers that could not be sampled)."""
        self._clear()
        self.responses = []
        self.prompt.value = f"<div style='font-size:1.1em'>{message_html}</div>"

    def _clear(self) -> None:
        old = [*self.ranks, self.choice]
        self.ranks, self.choice = [], None
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
        self.set_groups([g if isinstance(g, list) else [g] for g in record["ranking"]])
        self.flag.value = "all_bad" in (record.get("flags") or [])
        self.comment.value = str(record.get("comment") or "")

    # ---- state -------------------------------------------------------------------------------------------------
    def update(self, labelled: int, n: int, index: int | None, replacing: bool) -> None:
        groups = self.groups()
        self.progress.value = f"<b>{labelled} / {n}</b> labelled"
        self.bar.max, self.bar.value = max(n, 1), labelled
        submit = self.buttons["submit"]
        submit.disabled = index is None or groups is None
        submit.description = "Replace" if replacing else "Submit"
        self.buttons["back"].disabled = index == 0
        self.buttons["skip"].disabled = index is None
        for j, card in enumerate(self._card_widgets()):
            card.layout.border = self._border(j, groups)
        if index is None:
            self.summary.value = ""
        elif groups is not None:
            self.summary.value = f"Your ranking: <b>{describe(groups)}</b> (best first)"
        elif self.ranks:
            ranked = sum(tb.value != UNSET for tb in self.ranks)
            self.summary.value = f"Give every answer a rank (1 = best): {ranked} of {len(self.ranks)} ranked"
        else:
            self.summary.value = "Which answer is better?"

    def _card_widgets(self) -> list[Any]:
        kids = list(self.cards.children)
        return list(kids[0].children) if self.choice is not None and kids else kids

    def _border(self, j: int, groups: list[list[int]] | None) -> str:
        if groups is not None and j in groups[0]:
            return BORDER["best"]
        if self.ranks and self.ranks[j].value != UNSET:
            return BORDER["set"]
        return BORDER["unset"] if groups is None else BORDER["set"]

    def say(self, message: str, ok: bool = False, error: bool = False) -> None:
        color = "#c62828" if error else "#2e7d32" if ok else "#333"
        self.status.value = f"<span style='color:{color}'>{html.escape(message)}</span>"
