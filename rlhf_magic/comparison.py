"""Two policies side by side: answers to the same prompts, reward scores, blind A/B win rates (no torch here).

    cmp = compare(sft, ppo, prompts, reward=rm)   # one batched generate and one batched score per policy
    cmp.mean_scores                               # {"sft": -0.12, "ppo": 0.87}
    cmp.judge(0, "b"); cmp.judge(1, "tie")        # a person's (or a simulated labeler's) verdicts
    cmp.win_rate()                                # B's win rate over A with a 95% Wilson interval

A tie counts as half a win: rate = (wins + ties / 2) / judged, and the 95% interval is the Wilson score interval
of that rate over `judged` trials (with ties the successes are fractional and the interval is a little wide, as a
tie is less uncertain than a coin flip). "a" and "b" always mean sides A and B; policy names work too.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .config import CompareConfig
from .data import read_prompts
from .errors import ConfigError, DataError, calling
from .validation import build_config

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
HTML_ROWS = 50  # rows shown by _repr_html_ (to_pandas() has all)
SIMULATED = "sim:"  # judges whose names start with this are simulated labelers (rlhf_magic.labelers)


class Row(NamedTuple):
    prompt: str
    answer_a: str
    answer_b: str
    score_a: float | None
    score_b: float | None


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for `successes` out of `n` trials (95% for the default z)."""
    if n <= 0:
        raise ValueError("wilson_interval needs at least one trial")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


@dataclass(frozen=True)
class WinRate:
    """How often `policy` beat `opponent` in the judgements so far (a tie counts as half a win)."""

    policy: str
    opponent: str
    wins: int
    ties: int
    losses: int
    simulated: int = 0  # judgements made by a simulated labeler (a rule, not a person)

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def rate(self) -> float | None:
        """(wins + ties / 2) / judged, or None before the first judgement."""
        return (self.wins + self.ties / 2) / self.n if self.n else None

    @property
    def interval(self) -> tuple[float, float] | None:
        """The 95% Wilson score interval of `rate` (None before the first judgement)."""
        return wilson_interval(self.wins + self.ties / 2, self.n) if self.n else None

    def __str__(self) -> str:
        if not self.n:
            return f"{self.policy} vs {self.opponent}: no judgements yet"
        low, high = self.interval  # type: ignore[misc]
        text = (
            f"{self.policy} beats {self.opponent} {self.rate:.0%} of the time (95% CI {low:.0%}–{high:.0%}; "
            f"{_n(self.wins, 'win')}, {_n(self.ties, 'tie')}, {_n(self.losses, 'loss')}; a tie counts as half a win)"
        )
        if self.simulated:
            text += f"; {self.simulated} of {self.n} judgements are SIMULATED (a rule, not a person)"
        return text


class Comparison:
    """Answers of policies A and B to the same prompts, their reward scores, and blind judgements."""

    def __init__(
        self,
        prompts: Sequence[str],
        answers_a: Sequence[str],
        answers_b: Sequence[str],
        scores_a: Sequence[float] | None = None,
        scores_b: Sequence[float] | None = None,
        *,
        names: tuple[str, str] = ("A", "B"),
        reward: str | None = None,
    ):
        n = len(prompts)
        if len(answers_a) != n or len(answers_b) != n:
            raise DataError(f"got {len(answers_a)} and {len(answers_b)} answers for {n} prompts; give one each")
        if (scores_a is None) != (scores_b is None) or (scores_a is not None and len(scores_a) != n):
            raise DataError(f"give both policies' scores, one per prompt ({n} prompts), or none")
        name_a, name_b = (str(x) for x in names)
        if name_a == name_b:
            name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
        self.names: tuple[str, str] = (name_a, name_b)
        self.reward = reward
        sa, sb = ([None] * n if s is None else list(s) for s in (scores_a, scores_b))
        self.rows: list[Row] = [Row(*r) for r in zip(prompts, answers_a, answers_b, sa, sb)]
        self._verdicts: dict[int, tuple[str, str]] = {}  # row -> (winner, judge)

    @property
    def scored(self) -> bool:
        return bool(self.rows) and self.rows[0].score_a is not None

    @property
    def mean_scores(self) -> dict[str, float] | None:
        """The mean reward score per policy name (None when no reward was given)."""
        if not self.scored:
            return None
        columns = zip(*[(r.score_a, r.score_b) for r in self.rows])
        return {name: sum(col) / len(self.rows) for name, col in zip(self.names, columns)}  # type: ignore[arg-type]

    def side(self, who: str) -> str:
        """'a' or 'b' for a side letter (either case) or a policy name."""
        key = str(who)
        if key.lower() in ("a", "b"):
            return key.lower()
        if key in self.names:
            return "ab"[self.names.index(key)]
        raise ConfigError(f"{who!r} is neither side: use 'a', 'b', {self.names[0]!r} or {self.names[1]!r}")

    def judge(self, i: int, winner: str, by: str = "person") -> None:
        """Record that the answer of `winner` ('a', 'b' or 'tie') is better for prompt `i` (a new verdict replaces
        an old one). `by` names the judge; simulated labelers' names start with 'sim:'."""
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.rows):
            raise DataError(f"judge: row {i!r} does not exist; use 0 to {len(self.rows) - 1}")
        verdict = "tie" if str(winner).lower() == "tie" else self.side(winner)
        self._verdicts[i] = (verdict, str(by))

    @property
    def judgements(self) -> dict[int, str]:
        """Row index -> 'a', 'b' or 'tie'."""
        return {i: v for i, (v, _) in sorted(self._verdicts.items())}

    @property
    def judges(self) -> dict[int, str]:
        """Row index -> who judged it."""
        return {i: by for i, (_, by) in sorted(self._verdicts.items())}

    def winner_name(self, i: int) -> str | None:
        """The name of row i's winner, 'tie', or None while unjudged."""
        v = self.judgements.get(i)
        return v if v in (None, "tie") else self.names["ab".index(v)]  # type: ignore[arg-type]

    def win_rate(self, policy: str | None = None) -> WinRate:
        """`policy`'s win rate over the other (default: B over A), with counts and a 95% Wilson interval."""
        me = "ab".index("b" if policy is None else self.side(policy))
        verdicts = [v for v, _ in self._verdicts.values()]
        won = [verdicts.count("a"), verdicts.count("b")]
        sim = sum(by.startswith(SIMULATED) for _, by in self._verdicts.values())
        return WinRate(self.names[me], self.names[1 - me], won[me], verdicts.count("tie"), won[1 - me], sim)

    def __len__(self) -> int:
        return len(self.rows)

    def to_pandas(self) -> Any:
        """One row per prompt: prompt, answer_a, answer_b (score_a, score_b with a reward; winner once judged).
        `df.attrs["policies"]` maps 'a' and 'b' to the policy names."""
        import pandas as pd

        df = pd.DataFrame([r._asdict() for r in self.rows])
        if not self.scored:
            df = df.drop(columns=["score_a", "score_b"])
        if self._verdicts:
            df["winner"] = [self._verdicts[i][0] if i in self._verdicts else None for i in range(len(self.rows))]
        df.attrs["policies"] = {"a": self.names[0], "b": self.names[1]}
        return df

    def summary(self) -> list[str]:
        a, b = self.names
        lines = [f"A = {a} vs B = {b}: {len(self.rows)} prompt(s)" + (f", reward {self.reward}" if self.reward else "")]
        means = self.mean_scores
        if means is not None:
            lines.append(f"mean reward: {a} {means[a]:.4g}, {b} {means[b]:.4g} (B − A = {means[b] - means[a]:+.4g})")
        if self._verdicts:
            lines.append(str(self.win_rate()))
        return lines

    def __repr__(self) -> str:
        return "\n".join(["<Comparison " + self.summary()[0] + ">", *self.summary()[1:]])

    def _repr_html_(self) -> str:
        return comparison_html(self)


def comparison_html(cmp: Comparison, limit: int = HTML_ROWS) -> str:
    """A header (policies, mean scores, win rate) and a table of the first `limit` rows."""
    a, b = (html.escape(n) for n in cmp.names)
    head = "".join(f"<div>{html.escape(line)}</div>" for line in cmp.summary()[1:])
    cols = ["#", "prompt", f"A: {a}", f"B: {b}"] + (["score A", "score B"] if cmp.scored else [])
    cols += ["judged"] if cmp.judgements else []
    cell = "<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{}</td>"
    body = []
    for i, r in enumerate(cmp.rows[:limit]):
        tds = [str(i), html.escape(r.prompt), _answer(r.answer_a), _answer(r.answer_b)]
        if cmp.scored:
            best = max(r.score_a, r.score_b)  # type: ignore[type-var]
            tds += [f"<b>{s:.3g}</b>" if s == best and r.score_a != r.score_b else f"{s:.3g}" for s in r[3:]]
        tds += [html.escape(cmp.winner_name(i) or "")] if cmp.judgements else []
        body.append("<tr>" + "".join(cell.format(t) for t in tds) + "</tr>")
    hidden = len(cmp.rows) - limit
    more = f"<div style='color:#666'>… {hidden} more (to_pandas() has all)</div>" if hidden > 0 else ""
    th = "".join(f"<th style='text-align:left'>{c}</th>" for c in cols)
    title = f"<b>A = {a}</b> vs <b>B = {b}</b> · {len(cmp.rows)} prompt(s)"
    title += f" · reward {html.escape(cmp.reward)}" if cmp.reward else ""
    return f"<div class='rlhf-compare'>{title}{head}<table><tr>{th}</tr>{''.join(body)}</table>{more}</div>"


def _answer(text: str) -> str:
    return html.escape(text) if text.strip() else "<i style='color:#888'>(empty answer)</i>"


# ---- compare() ---------------------------------------------------------------------------------------------------
def compare(
    a: Any,
    b: Any,
    prompts: Any,
    reward: Any = None,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = 0,
) -> Comparison:
    """Both policies answer `prompts` (one batched call each); `reward` (a reward handle or a callable
    f(prompts, responses) -> scores) scores both (one batched call each). Greedy unless temperature > 0."""
    for side, policy in (("A", a), ("B", b)):
        check_policy(policy, side)
    prompts = read_prompts(prompts)
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    cfg = build_config(CompareConfig, sampling)  # the same checks as %compare's options
    sampling = {key: getattr(cfg, key) for key in sampling}
    score = reward_function(reward)
    names = (name_of(a, "A"), name_of(b, "B"))
    answers = [_generate(p, prompts, sampling, n) for p, n in ((a, names[0]), (b, names[1]))]
    scores = [_score(score, prompts, ans, n) for ans, n in zip(answers, names)] if score else [None, None]
    rname = None if score is None else name_of(reward, "reward")
    return Comparison(prompts, *answers, *scores, names=names, reward=rname)


def check_policy(policy: Any, side: str) -> None:
    if not callable(getattr(policy, "generate", None)):
        raise ConfigError(
            f"policy {side} = {_short(policy)} is not a policy (no .generate); pass an %%sft/%%dpo/%%ppo/%%grpo result"
        )


def reward_function(reward: Any) -> Callable[[list[str], list[str]], Any] | None:
    """The reward's scoring function: a handle's `.reward` (what PPO optimised; else its `.score`), or the callable
    itself."""
    score = getattr(reward, "reward", None)
    score = score if callable(score) else getattr(reward, "score", None)
    score = score if callable(score) else reward
    if score is not None and not callable(score):
        raise ConfigError(f"reward = {_short(reward)} is not a reward: pass a %%reward result or f(prompts, responses)")
    return score


def name_of(obj: Any, default: str) -> str:
    return str(getattr(obj, "name", None) or getattr(obj, "__name__", None) or default)


def _generate(policy: Any, prompts: list[str], sampling: dict[str, Any], name: str) -> list[str]:
    out = policy.generate(prompts, **sampling)
    if isinstance(out, str) or not isinstance(out, Sequence) or len(out) != len(prompts):
        raise DataError(f"policy {name} returned {_short(out)} for {len(prompts)} prompts; expected one answer each")
    return [str(x) for x in out]


def _score(score: Callable[..., Any], prompts: list[str], answers: list[str], name: str) -> list[float]:
    with calling("reward", score):  # one line naming the function, the exception and its line; %tb has the rest
        out = score(list(prompts), list(answers))
    try:
        values = [float(x) for x in out]
    except (TypeError, ValueError):
        raise DataError(f"reward returned {_short(out)} for {name}'s answers; expected a list of numbers") from None
    if len(values) != len(prompts):
        raise DataError(f"reward returned {len(values)} scores for {len(prompts)} answers of {name}; expected one each")
    bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
    if bad is not None:
        raise DataError(f"reward returned {values[bad]} for {name}'s answer to prompt {bad}; scores must be finite")
    return values


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}es" if noun.endswith("s") else f"{count} {noun}s"


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
