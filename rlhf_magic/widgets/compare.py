"""The compare panel: two policies' answers side by side, or a blind A/B test with randomised sides.

Core ipywidgets only. `blind=False` shows the table of answers with reward scores and per-policy means.
`blind=True` shows one prompt at a time with the two answers on Left/Right (which policy is on which side is
shuffled, balanced and fixed by `seed`) and buttons "Left is better", "Tie", "Right is better"; when every pair is
judged it reveals the sides and shows B's win rate over A with a 95% interval (not before: a live rate would hint
which side was which). `pick(side)` does what the buttons do; `judge_with(labeler)` lets a simulated labeler from
`rlhf_magic.labelers` judge every remaining pair, and the panel says that those judgements are simulated.
"""

from __future__ import annotations

import functools
import html
import random
import traceback
from collections.abc import Callable
from typing import Any

from ..comparison import Comparison, compare, comparison_html
from ..config import CompareConfig
from ..data import read_prompts
from ..errors import ConfigError, DataError, RLHFError
from ..preferences import parse_ranking
from ..validation import with_options
from . import notebook_module

CHOICES = {"left": "Left is better", "tie": "Tie", "right": "Right is better"}
CARD = "1px solid #bbb"


def balanced_sides(count: int, seed: int | None) -> list[str]:
    """Which policy ('a' or 'b') is on the left for each of `count` pairs: half each, shuffled by `seed`."""
    rng = random.Random(seed)
    sides = ["a", "b"] * (count // 2) + ([rng.choice("ab")] if count % 2 else [])
    rng.shuffle(sides)
    return sides


def verdict(answer: Any) -> str:
    """A labeler's answer for a pair shown as [left, right]: a ranking ([0, 1], [1, 0], [[0, 1]]) or a side."""
    if isinstance(answer, str) and answer.lower() in CHOICES:
        return answer.lower()
    groups = parse_ranking(answer, 2, "labeler")
    return "tie" if len(groups) == 1 else "left" if groups[0] == [0] else "right"


def simulated_name(labeler: Any) -> str:
    name = str(getattr(labeler, "name", None) or getattr(labeler, "__name__", None) or "custom")
    return name if name.startswith("sim:") else f"sim:{name}"


class ComparePanel:
    """Policies A and B on the same prompts. `.comparison` holds the answers, scores and judgements."""

    def __init__(
        self,
        a: Any,
        b: Any,
        prompts: Any = None,
        reward: Any = None,
        *,
        config: CompareConfig | None = None,
        session: Any = None,
        **options: Any,
    ):
        """`options` are CompareConfig's fields (`%compare?` lists them); they override `config`."""
        given = {k: v for k, v in (("prompts", prompts), ("reward", reward)) if v is not None}
        cfg = with_options(CompareConfig, config, {**given, **options}, "%compare")
        if cfg.prompts is None:
            raise ConfigError("%compare needs prompts=..., a list of prompt strings (or records with a `prompt` field)")
        if callable(cfg.labeler) and not cfg.blind:
            raise ConfigError("labeler = <simulated labeler> judges the blind mode; add blind=True")
        self.config = cfg
        blind, labeler, seed = cfg.blind, cfg.labeler, cfg.seed
        sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": seed}
        a, b, reward = (session[x] if isinstance(x, str) and session is not None else x for x in (a, b, cfg.reward))
        chosen, note = _subset(read_prompts(cfg.prompts), cfg.n, seed)
        self.comparison: Comparison = compare(a, b, chosen, reward, **sampling)
        self.blind = blind
        self.on_left = balanced_sides(len(chosen), seed)  # the policy shown on the left, per pair
        self.person = labeler.strip() if isinstance(labeler, str) and labeler.strip() else "person"
        self._sim = labeler if callable(labeler) else None
        self.index: int | None = 0 if blind else None
        self._build()
        if blind:
            self._goto(0)
            self.say(note or "Which answer is better? The sides are shuffled; the policies are revealed at the end.")
            if self._sim is not None:
                self.judge_with(self._sim)
        else:
            self.table.value = comparison_html(self.comparison)
            self.say(note)

    # ---- what scripts, tests and simulated labelers use ---------------------------------------------------------
    @property
    def current_prompt(self) -> str | None:
        return None if self.index is None or not self.blind else self.comparison.rows[self.index].prompt

    @property
    def current_answers(self) -> tuple[str, str] | None:
        """(left, right) for the pair on screen."""
        if self.index is None or not self.blind:
            return None
        row = self.comparison.rows[self.index]
        return (row.answer_a, row.answer_b) if self.on_left[self.index] == "a" else (row.answer_b, row.answer_a)

    @property
    def pending(self) -> list[int]:
        judged = self.comparison.judgements
        return [i for i in range(len(self.comparison)) if i not in judged]

    @property
    def done(self) -> bool:
        return not self.pending

    def win_rate(self, policy: str | None = None) -> Any:
        return self.comparison.win_rate(policy)

    def pick(self, side: str) -> str:
        """Exactly what the buttons do: 'left', 'right' or 'tie' for the pair on screen. Returns 'a', 'b' or 'tie'."""
        key = str(side).lower()
        if key not in CHOICES:
            raise ConfigError(f"pick({side!r}): use 'left', 'right' or 'tie'")
        shown = self.index
        winner = self._record(key, self.person)
        if self.index is not None:
            self.say(f"Saved: {CHOICES[key]} for pair {shown + 1}.", ok=True)  # type: ignore[operator]
        return winner

    def judge_with(self, labeler: Any = None) -> int:
        """A simulated labeler (rlhf_magic.labelers) judges every remaining pair. Returns how many it judged."""
        self._need_blind("judge_with()")
        labeler = self._sim if labeler is None else labeler
        if labeler is None or not callable(labeler):
            raise ConfigError(
                f"judge_with({labeler!r}): give a simulated labeler, e.g. rlhf_magic.labelers.prefers_shorter()"
            )
        name, count = simulated_name(labeler), 0
        while self.index is not None:
            self._record(verdict(labeler(self.current_prompt, list(self.current_answers or ()))), name)
            count += 1
        self.say(
            f"{name} judged {count} pair(s). These judgements are SIMULATED by a rule, not made by a person.", ok=True
        )
        return count

    # ---- internals ---------------------------------------------------------------------------------------------
    def _need_blind(self, what: str) -> None:
        if not self.blind:
            raise ConfigError(f"{what} is for the blind mode: open the panel with blind=True")

    def _record(self, side: str, by: str) -> str:
        self._need_blind("pick()")
        if self.index is None:
            raise DataError("every pair is judged; panel.comparison.win_rate() has the result")
        i, left = self.index, self.on_left[self.index]
        winner = "tie" if side == "tie" else left if side == "left" else "ab"[left == "a"]
        self.comparison.judge(i, winner, by=by)
        pending = self.pending
        self._goto(next((j for j in pending if j > i), pending[0] if pending else None))
        return winner

    def _build(self) -> None:
        W = notebook_module("ipywidgets")

        self.W = W
        self.status = _tag(W.HTML(), "status")
        self.log = _tag(W.Output(), "log")
        self.table = _tag(W.HTML(), "table")
        self.buttons: dict[str, Any] = {}
        if not self.blind:
            self.root = _tag(W.VBox([self.table, self.status, self.log]), "compare-panel")
            return
        self.progress = _tag(W.HTML(), "progress")
        self.bar = _tag(W.IntProgress(value=0, min=0, max=max(len(self.comparison), 1)), "progress-bar")
        self.bar.layout.width = "160px"
        self.prompt = _tag(W.HTML(), "prompt")
        self.answers = {side: _tag(W.HTML(), f"answer-{side}") for side in ("left", "right")}
        cards = [
            _tag(W.VBox([W.HTML(f"<b>{side.title()}</b>"), self.answers[side]]), "compare-card")
            for side in ("left", "right")
        ]
        for card in cards:
            card.layout.width, card.layout.border, card.layout.padding = "50%", CARD, "4px 10px"
        for side, label in CHOICES.items():
            self.buttons[side] = _tag(W.Button(description=label), side)
            self.buttons[side].on_click(self._guard(functools.partial(self.pick, side)))
        self.result = _tag(W.HTML(), "result")
        head = W.HBox([W.HTML("<b>Blind comparison</b>"), self.bar, self.progress])
        head.layout.align_items = "center"
        body = [head, self.prompt, W.HBox(cards), W.HBox(list(self.buttons.values()))]
        self.root = _tag(W.VBox([*body, self.status, self.result, self.table, self.log]), "compare-panel")

    def _goto(self, i: int | None) -> None:
        self.index = i
        n, judged = len(self.comparison), len(self.comparison.judgements)
        self.progress.value = f"<b>{judged} / {n}</b> judged"
        self.bar.value = judged
        for button in self.buttons.values():
            button.disabled = i is None
        if i is None:
            self.prompt.value = f"<b>Done: all {n} pair(s) judged.</b> The sides are revealed below."
            for w in self.answers.values():
                w.value = ""
            self.result.value = f"<div style='font-size:1.1em'>{html.escape(str(self.comparison.win_rate()))}</div>"
            self.table.value = comparison_html(self.comparison)
            self.say("Done. panel.comparison has every answer and judgement (win_rate(), to_pandas()).", ok=True)
            return
        row = self.comparison.rows[i]
        self.prompt.value = (
            f"<div style='color:#666'>Pair {i + 1} of {n}</div>"
            f"<div style='white-space:pre-wrap;font-size:1.1em;margin:4px 0 8px'><b>{html.escape(row.prompt)}</b></div>"
        )
        for side, text in zip(("left", "right"), self.current_answers or ("", "")):
            body = html.escape(text) if text.strip() else "<i style='color:#888'>(empty answer)</i>"
            self.answers[side].value = f"<div style='white-space:pre-wrap;line-height:1.4'>{body}</div>"

    def say(self, message: str, ok: bool = False, error: bool = False) -> None:
        color = "#c62828" if error else "#2e7d32" if ok else "#333"
        self.status.value = f"<span style='color:{color}'>{html.escape(message)}</span>" if message else ""

    def _guard(self, fn: Callable[[], Any]) -> Callable[..., None]:
        """A widget callback that shows errors in the panel instead of losing them."""

        def handler(*_: Any) -> None:
            try:
                fn()
            except RLHFError as e:
                self.say(str(e), error=True)
            except Exception as e:
                self.say(f"{type(e).__name__}: {e} (details below)", error=True)
                with self.log:
                    traceback.print_exc()

        return handler

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.root)

    def __repr__(self) -> str:
        a, b = self.comparison.names
        mode = f"blind, {len(self.comparison.judgements)}/{len(self.comparison)} judged" if self.blind else "table"
        return f"<ComparePanel A={a!r} B={b!r} {len(self.comparison)} prompt(s), {mode}>"


def _tag(widget: Any, name: str) -> Any:
    widget.add_class(f"rlhf-{name}")
    return widget


def _subset(prompts: list[str], n: int | None, seed: int | None) -> tuple[list[str], str]:
    """A random sample of `n` prompts (seeded; original order kept), and a note when there are fewer than n."""
    if n is None:
        return prompts, ""
    if n >= len(prompts):
        return prompts, f"n = {n} but there are {len(prompts)} prompt(s): using them all." if n > len(prompts) else ""
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep], ""
