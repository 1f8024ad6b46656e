"""Agreement between labelers who ranked the same answers to the same prompt (pure maths, no widgets).

For each prompt (and answer set) that two or more labelers ranked, each answer pair that two labelers both ranked
is one comparison; they agree when both put the same answer first, or both call it a tie. A labeler's latest
ranking counts, and answers are matched by text (two labelers may have seen them in another order). Prompts
flagged without a ranking are not compared.

The prompt is the unit: the pairs of one prompt share its answers, so they are not independent. A prompt's
agreement is the share of its comparisons that agree; `rate` is the mean over prompts, and its 95% interval is
Wilson's score interval with n = the number of prompts, as if each prompt were one yes/no trial. A prompt's share
lies in [0, 1], so it spreads at most as much as a yes/no trial would: the interval errs wide, never narrow.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .tables import ranking_text

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
NO_OVERLAP = "no prompt was ranked by two labelers on the same answers"


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion `p` observed on `n` units."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class PromptAgreement:
    """One prompt that several labelers ranked: its answers (as the first of them saw them), the share of
    comparisons that agree, and each labeler's ranking in letters of those answers ("B > A > C = D")."""

    prompt: str
    responses: list[str]
    rate: float
    compared: int
    rankings: dict[str, str]


@dataclass(frozen=True)
class Agreement:
    """Pairwise agreement between labelers (the module docstring says how it is counted).

    `rate` (None when no prompt was ranked twice) is the mean over prompts of each prompt's share of agreeing
    comparisons, `interval` its 95% Wilson interval over `prompts` prompts; `by_labelers` and `intervals` the same
    for each two labelers; `per_prompt` lists the compared prompts, those labelers disagree on most first.
    """

    rate: float | None
    compared: int
    agreed: int
    prompts: int
    by_labelers: dict[tuple[str, str], float]
    interval: tuple[float, float] | None = None
    intervals: dict[tuple[str, str], tuple[float, float]] = field(default_factory=dict)
    counts: dict[tuple[str, str], int] = field(default_factory=dict)  # prompts each two labelers both ranked
    per_prompt: list[PromptAgreement] = field(default_factory=list)

    def disagreements(self, n: int = 5) -> list[PromptAgreement]:
        """The `n` prompts with the lowest agreement (ties: in prompt order), below full agreement only."""
        return [p for p in self.per_prompt if p.rate < 1][:n]

    def to_pandas(self) -> Any:
        """One row for all labelers, then one per two labelers: prompts, agreement and its 95% interval."""
        import pandas as pd

        rows = []
        if self.rate is not None and self.interval is not None:
            rows.append(("all", self.prompts, self.rate, *self.interval))
        for pair, rate in self.by_labelers.items():
            rows.append((" ~ ".join(pair), self.counts.get(pair, 0), rate, *self.intervals[pair]))
        return pd.DataFrame(rows, columns=["labelers", "prompts", "agreement", "low (95%)", "high (95%)"])

    def _repr_html_(self) -> str:
        import html

        if self.rate is None:
            return f"<p>Agreement: {NO_OVERLAP}.</p>"
        table = self.to_pandas().to_html(index=False, float_format=lambda v: f"{v:.0%}")
        worst = "".join(
            f"<li>{p.rate:.0%} agree on <b>{html.escape(p.prompt)}</b>: "
            + "; ".join(f"{html.escape(who)}: {html.escape(r)}" for who, r in p.rankings.items())
            + "</li>"
            for p in self.disagreements()
        )
        head = f"<p>{html.escape(self.summary())}</p>"
        return head + table + (f"<p>Disagreed on most:</p><ul>{worst}</ul>" if worst else "")

    def summary(self) -> str:
        """One line: the rate, its interval, and what it was counted on."""
        if self.rate is None or self.interval is None:
            return f"Agreement: {NO_OVERLAP}"
        low, high = self.interval
        return (
            f"Agreement {self.rate:.0%} (95% interval {low:.0%} to {high:.0%}, Wilson over {self.prompts} prompts; "
            f"{self.agreed} of {self.compared} answer pairs)"
        )

    def __repr__(self) -> str:
        if self.rate is None:
            return f"Agreement({NO_OVERLAP})"
        low, high = self.interval or (0.0, 1.0)
        pairs = ", ".join(f"{a}~{b}: {v:.0%}" for (a, b), v in self.by_labelers.items())
        return (
            f"Agreement({self.rate:.1%} [95%: {low:.1%}..{high:.1%}] over {self.prompts} prompts, "
            f"{self.agreed}/{self.compared} pairs; {pairs})"
        )


def relations(responses: Sequence[str], groups: Sequence[Sequence[int]]) -> dict[tuple[str, str], int]:
    """For each two different answer texts (sorted): -1 if the first is better, 1 if worse, 0 for a tie."""
    pos = {i: g for g, group in enumerate(groups) for i in group}
    out: dict[tuple[str, str], int] = {}
    for i, j in itertools.combinations(range(len(responses)), 2):
        ti, tj = responses[i], responses[j]
        if ti == tj:
            continue
        (a, pa), (b, pb) = sorted([(ti, pos[i]), (tj, pos[j])])
        out.setdefault((a, b), (pa > pb) - (pa < pb))
    return out


def _letters(responses: Sequence[str], reference: Sequence[str], groups: Sequence[Sequence[int]]) -> str:
    """A ranking in letters of the `reference` order of the same answers."""
    where = {text: i for i, text in reversed(list(enumerate(reference)))}
    return ranking_text([[where[responses[i]] for i in g] for g in groups])


def agreement(items: Sequence[Any]) -> Agreement:
    """`Agreement` over ranked items (objects with prompt, responses, groups and labeler, e.g. `Ranked`)."""
    latest: dict[tuple[str, tuple[str, ...]], dict[str, Any]] = {}
    for item in items:
        if item.groups:  # a flagged prompt without a ranking compares nothing
            latest.setdefault((item.prompt, tuple(sorted(item.responses))), {})[item.labeler] = item
    per_labelers: dict[tuple[str, str], list[float]] = {}
    per_prompt: list[PromptAgreement] = []
    agreed = compared = 0
    for by_labeler in latest.values():
        if len(by_labeler) < 2:
            continue
        rel = {who: relations(it.responses, it.groups) for who, it in by_labeler.items()}
        hits = total = 0
        for a, b in itertools.combinations(sorted(by_labeler), 2):
            shared = rel[a].keys() & rel[b].keys()
            same = sum(rel[a][pair] == rel[b][pair] for pair in shared)
            if shared:
                per_labelers.setdefault((a, b), []).append(same / len(shared))
            hits, total = hits + same, total + len(shared)
        if not total:
            continue
        agreed, compared = agreed + hits, compared + total
        first = by_labeler[min(by_labeler)]
        rankings = {who: _letters(it.responses, first.responses, it.groups) for who, it in sorted(by_labeler.items())}
        per_prompt.append(PromptAgreement(first.prompt, list(first.responses), hits / total, total, rankings))
    rates = [p.rate for p in per_prompt]
    rate = sum(rates) / len(rates) if rates else None
    return Agreement(
        rate=rate,
        compared=compared,
        agreed=agreed,
        prompts=len(per_prompt),
        by_labelers={k: sum(v) / len(v) for k, v in per_labelers.items()},
        interval=None if rate is None else wilson(rate, len(rates)),
        intervals={k: wilson(sum(v) / len(v), len(v)) for k, v in per_labelers.items()},
        counts={k: len(v) for k, v in per_labelers.items()},
        per_prompt=sorted(per_prompt, key=lambda p: p.rate),  # stable: prompt order among equal rates
    )
