"""Agreement at a glance: the rate between labelers with its 95% interval, and the prompts they disagree on most,
each one click from re-labelling it.

With a ranking panel bound (`panel.agreement()`, or `AgreementView(prefs, panel=panel)`), Re-label shows that prompt
in the panel (`panel.goto`); without one, it opens a small panel on that prompt's answers that appends to the same
file. The maths is `rlhf_magic.agreement`; this module only draws it (core ipywidgets).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from ..agreement import Agreement, PromptAgreement
from ..errors import DataError
from . import notebook_module

SHOWN = 5  # prompts listed, lowest agreement first


class AgreementView:
    """`prefs` (Preferences, a RankingPanel or an Agreement) -> summary, a table per two labelers, and the prompts
    labelers disagree on most with a Re-label button each. `relabel(prompt)` does what the button does."""

    def __init__(self, prefs: Any, panel: Any = None, *, top: int = SHOWN):
        W = notebook_module("ipywidgets")

        if panel is None and hasattr(type(prefs), "preferences"):  # a RankingPanel
            panel, prefs = prefs, prefs.preferences
        self.panel, self.source = panel, getattr(prefs, "source", None)
        self.agreement: Agreement = prefs if isinstance(prefs, Agreement) else prefs.agreement()
        self.W = W
        self.summary = W.HTML(f"<b>{html.escape(self.agreement.summary())}</b>")
        has_rows = self.agreement.rate is not None
        self.table = W.HTML(self.agreement.to_pandas().to_html(index=False, float_format=_pct) if has_rows else "")
        self.rows = [self._row(p) for p in self.agreement.disagreements(top)]
        self.status = W.HTML()
        self.out = W.Output()  # a re-labelling panel, when none is bound
        heading = [W.HTML("<b>Disagreed on most</b> (lowest agreement first)")] if self.rows else []
        self.root = W.VBox([self.summary, self.table, *heading, *self.rows, self.status, self.out])
        self.root.add_class("rlhf-agreement")

    def _row(self, item: PromptAgreement) -> Any:
        W = self.W
        ranks = "<br>".join(f"{html.escape(who)}: <b>{html.escape(r)}</b>" for who, r in item.rankings.items())
        text = W.HTML(
            f"<div style='white-space:pre-wrap'>{item.rate:.0%} agree on <b>{html.escape(item.prompt)}</b>"
            f"<br>{ranks}</div>",
            layout=W.Layout(width="70%"),
        )
        button = W.Button(description="Re-label", icon="pencil", tooltip=f"Re-label: {item.prompt[:80]}")
        button.add_class("rlhf-relabel")
        button.on_click(lambda _: self._click(item.prompt))
        return W.HBox([text, button], layout=W.Layout(align_items="center", margin="4px 0"))

    def _click(self, prompt: str) -> None:
        try:
            self.relabel(prompt)
        except DataError as e:
            self.say(str(e), error=True)

    def relabel(self, prompt: str) -> Any:
        """Show `prompt` for re-labelling: in the bound panel, else in a new panel on the same answers and file.
        Returns that panel."""
        item = next((p for p in self.agreement.per_prompt if p.prompt == prompt), None)
        if item is None:
            raise DataError(f"prompt {prompt[:60]!r} is not one that several labelers ranked; pick one listed here")
        if self.panel is not None:
            if prompt not in self.panel.prompts:
                raise DataError(f"prompt {prompt[:60]!r} is not among the bound panel's prompts; open a panel with it")
            self.panel.goto(self.panel.prompts.index(prompt))
            self.say(f"The panel shows {prompt[:60]!r}: rank it again and Submit (it replaces an earlier ranking).")
            return self.panel
        return self._open_panel(item)

    def _open_panel(self, item: PromptAgreement) -> Any:
        from .ranking import RankingPanel

        if not self.source or Path(self.source).suffix.lower() != ".jsonl":
            raise DataError("these preferences have no .jsonl file to add a ranking to; bind a panel: view(panel=...)")
        panel = RankingPanel(prompts=[item.prompt], responses=[item.responses], file=self.source, title="Re-label")
        panel.goto(0)  # even where this labeler ranked it already: Submit then replaces that ranking
        self.out.clear_output()
        with self.out:
            from IPython.display import display

            display(panel)
        self.say(f"Re-label {item.prompt[:60]!r} below; Submit replaces your earlier ranking, if any.")
        return panel

    def say(self, message: str, error: bool = False) -> None:
        color = "#c62828" if error else "#333"
        self.status.value = f"<span style='color:{color}'>{html.escape(message)}</span>"

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.root)

    def __repr__(self) -> str:
        return f"<AgreementView {self.agreement.summary()}>"


def _pct(v: float) -> str:
    return f"{v:.0%}"
