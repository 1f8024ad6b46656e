"""Simulated labelers: simple rules that rank answers when no person is there (tests, headless tutorials).

Their labels are SIMULATED. They encode the rule you pick ("shorter is better", "answers that mention X are
better"), not human judgement; their names start with "sim:" so the records say so.

    lab = labelers.prefers_shorter(noise=0.1)
    lab.rank("prompt", ["a long answer", "short"])   # -> [1, 0]
    lab.label(panel)                                # submits a ranking for every prompt left in the panel

`noise` is the share of prompts the labeler ranks at random instead of by its rule (0 = always the rule).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from .errors import ConfigError

Score = Callable[[str, str], float]  # (prompt, answer) -> higher is better


class Labeler:
    """Ranks answers by `score(prompt, answer)`, best first; equal scores tie (ties=True) or fall in random order.

    Its name always starts with "sim:" (given "alice", it is "sim:alice"): records show the labels are simulated."""

    def __init__(self, name: str, score: Score, noise: float = 0.0, seed: int = 0, ties: bool = False):
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not 0 <= noise <= 1:
            raise ConfigError(f"noise = {noise!r}: use a share of random rankings between 0 and 1")
        if not callable(score):
            raise ConfigError(f"score = {score!r} is not a function of (prompt, answer)")
        self.name = name if name.startswith("sim:") else f"sim:{name}"
        self.score, self.noise, self.ties = score, float(noise), bool(ties)
        self._rng = random.Random(seed)

    def rank(self, prompt: str, responses: Sequence[str], ties: bool | None = None) -> list[Any]:
        """A ranking in the panel's form: indices best first, a nested list for tied answers."""
        order = list(range(len(responses)))
        self._rng.shuffle(order)  # random order among equal scores (and the whole ranking when noisy)
        if self._rng.random() < self.noise:
            return order
        scores = {i: float(self.score(prompt, responses[i])) for i in order}
        order.sort(key=lambda i: -scores[i])  # stable: equal scores keep the shuffled order
        if not (self.ties if ties is None else ties):
            return order
        groups: list[list[int]] = []
        for i in order:
            if groups and scores[groups[-1][0]] == scores[i]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return [g[0] if len(g) == 1 else sorted(g) for g in groups]

    __call__ = rank

    def label(self, panel: Any, limit: int | None = None) -> int:
        """Rank every prompt still open in a RankingPanel (at most `limit`) through `panel.submit`.

        The panel's labeler becomes this labeler's name, so the records show the labels are simulated.
        Returns the number of rankings submitted."""
        if panel.labeler != self.name:
            panel.labeler = self.name
        if panel.index is not None and panel.index not in panel.pending:
            panel.skip()  # the panel shows a prompt already ranked (after Back): start at the next open one
        count = 0
        while panel.current_prompt is not None and not panel.done and (limit is None or count < limit):
            responses = panel.current_responses
            allow_ties = self.ties and (panel.ties or len(responses) == 2)
            panel.submit(self.rank(panel.current_prompt, responses, ties=allow_ties))
            count += 1
        return count

    def __repr__(self) -> str:
        return f"<simulated labeler {self.name!r} noise={self.noise:g}>"


def prefers_shorter(noise: float = 0.0, seed: int = 0, ties: bool = False, name: str | None = None) -> Labeler:
    """Shorter answers are better (by characters)."""
    return Labeler(name or "shorter", lambda _p, a: -len(a.strip()), noise, seed, ties)


def prefers_longer(noise: float = 0.0, seed: int = 0, ties: bool = False, name: str | None = None) -> Labeler:
    """Longer answers are better (by characters)."""
    return Labeler(name or "longer", lambda _p, a: len(a.strip()), noise, seed, ties)


def prefers_containing(
    text: str | Sequence[str],
    noise: float = 0.0,
    seed: int = 0,
    ties: bool = False,
    case_sensitive: bool = False,
    name: str | None = None,
) -> Labeler:
    """Answers that contain `text` (or more of several texts) are better; the rest tie or fall in random order."""
    words = [text] if isinstance(text, str) else list(text)
    if not words or not all(isinstance(w, str) and w for w in words):
        raise ConfigError(f"text = {text!r}: give a non-empty string (or a list of them)")
    fold = (lambda s: s) if case_sensitive else str.lower

    def score(_prompt: str, answer: str) -> float:
        return sum(fold(w) in fold(answer) for w in words)

    return Labeler(name or f"contains({', '.join(map(repr, words))})", score, noise, seed, ties)


def avoids(
    text: str | Sequence[str], noise: float = 0.0, seed: int = 0, ties: bool = False, name: str | None = None
) -> Labeler:
    """Answers that contain `text` are worse (e.g. a banned word)."""
    base = prefers_containing(text, 0.0, seed, ties)
    name = name or base.name.replace("sim:contains", "avoids", 1)
    return Labeler(name, lambda p, a: -base.score(p, a), noise, seed, ties)


def random_labeler(seed: int = 0, name: str | None = None) -> Labeler:
    """A labeler that ranks at random (a baseline: chance agreement is about 1/2 per pair)."""
    return Labeler(name or "random", lambda _p, _a: 0.0, 1.0, seed)


def from_function(score: Score, name: str = "custom", noise: float = 0.0, seed: int = 0, ties: bool = False) -> Labeler:
    """A labeler from your own `score(prompt, answer) -> number` (higher is better)."""
    return Labeler(name, score, noise, seed, ties)
