"""The ranking panel: a person orders K answers per prompt; every Submit appends one JSONL record.

Core ipywidgets only (JupyterLab 4, Notebook 7, VS Code, Colab). Answers are sampled lazily, one batched call of
K per prompt when it is shown, so the first prompt appears after one call instead of len(prompts) calls.
Every button has a method that does the same thing (`submit`, `skip`, `back`, `undo`) for scripts and tests.
"""

from __future__ import annotations

import html
import traceback
from collections.abc import Callable
from typing import Any

from ..config import RankConfig
from ..data import read_prompts
from ..errors import ConfigError, DataError, LabelWriteError, RLHFError
from ..preferences import RANKING, Preferences, format_ranking, parse_ranking
from ..validation import with_options
from .ranking_cards import Cards, describe
from .ranking_options import check_responses, policy_name, resolve_policy, unique
from .ranking_store import PreferenceStore, new_id, now_iso

ALL_BAD = "all_bad"


class RankingPanel:
    """Rank K answers per prompt. `.preferences` holds every ranking in `file` (retractions applied)."""

    def __init__(
        self,
        prompts: Any = None,
        policy: Any = None,
        *,
        config: RankConfig | None = None,
        session: Any = None,
        **options: Any,
    ):
        """`options` are RankConfig's fields (`%rank?` lists them); they override `config`."""
        given = {k: v for k, v in (("prompts", prompts), ("policy", policy)) if v is not None}
        cfg = with_options(RankConfig, config, {**given, **options}, "%rank")
        if cfg.prompts is None:
            raise ConfigError("%rank needs prompts=..., a list of prompt strings (or records with a `prompt` field)")
        self.config = cfg
        self.prompts = unique(read_prompts(cfg.prompts))
        self.k = 4 if cfg.k is None else cfg.k
        self.policy = resolve_policy(cfg.policy, session, cfg.responses is None)
        self._given = check_responses(cfg.responses, self.prompts, cfg.k)
        self.ties, self.seed, self.prefetch = cfg.ties, cfg.seed, cfg.prefetch
        self.sampling = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p}
        self.store = PreferenceStore(cfg.file)  # DataError for a missing folder or foreign records: nothing written
        self._answers: dict[int, list[str]] = {}
        self.index: int | None = None
        self._replacing: dict | None = None
        self.cards = Cards(self._guard(self._refresh), cfg.title or "Rank the answers", cfg.labeler)
        self.cards.on_button("submit", self._guard(self._submit_widgets))
        self.cards.on_button("skip", self._guard(self.skip))
        self.cards.on_button("back", self._guard(self.back))
        self.cards.on_button("undo", self._guard(self.undo))
        self.cards.on_labeler(self._guard(self._labeler_changed))
        self.goto(self._next_pending(-1, include_current=True))
        if self.index is not None and self._replacing is None:
            how = (
                "Pick the better answer (or Tie)" if len(self.cards.responses) == 2 else "Rank every answer (1 = best)"
            )
            self.cards.say(f"{how}, then Submit. Each Submit is saved to {self.store.path.name} at once.")

    # ---- what scripts and simulated labelers use -------------------------------------------------------------
    @property
    def labeler(self) -> str:
        return self.cards.labeler.value.strip() or "anonymous"

    @labeler.setter
    def labeler(self, name: str) -> None:
        self.cards.labeler.value = name  # re-reads which prompts this labeler still has to rank

    @property
    def preferences(self) -> Preferences:
        return self.store.preferences()

    @property
    def current_prompt(self) -> str | None:
        return None if self.index is None else self.prompts[self.index]

    @property
    def current_responses(self) -> list[str]:
        return list(self.cards.responses)

    @property
    def pending(self) -> list[int]:
        done = self.store.labelled(self.labeler)
        return [i for i, p in enumerate(self.prompts) if p not in done]

    @property
    def done(self) -> bool:
        return not self.pending

    @property
    def responses(self) -> list[list[str]]:
        """Every prompt's answers (saved ones where labelled; samples the rest): reuse them in a second panel."""
        saved = {r["prompt"]: r["responses"] for r in self.store.refresh() if r.get("labeler") == self.labeler}
        return [list(saved[p]) if p in saved else self._answers_for(i) for i, p in enumerate(self.prompts)]

    def submit(self, ranking: Any = None, *, flag: bool | None = None, comment: str | None = None) -> dict:
        """Exactly what clicking the rank buttons and Submit does. `ranking`: indices best first, ties nested."""
        if self.index is None:
            raise DataError("every prompt is labelled; use back() or undo() to change an earlier ranking")
        if ranking is not None:
            groups = parse_ranking(ranking, len(self.cards.responses), "submit")
            if any(len(g) > 1 for g in groups) and not self.cards.ties:
                raise DataError(f"submit: ranking {ranking!r} has a tie, but this panel has ties=False")
            self.cards.set_groups(groups)
        if flag is not None:
            self.cards.flag.value = bool(flag)
        if comment is not None:
            self.cards.comment.value = str(comment)
        return self._submit_widgets()

    def skip(self) -> None:
        """Leave this prompt unlabelled for now (it comes back after the others, and on resume)."""
        nxt = self._next_pending(self.index if self.index is not None else -1)
        self.goto(nxt)
        if nxt is not None and nxt == self.index and self.cards.groups() is None:
            self.cards.say("This is the only prompt left to label.")

    def back(self) -> None:
        """Show the previous prompt; a ranking already saved there is shown and can be replaced."""
        if self.index == 0:
            self.cards.say("This is the first prompt.")
            return
        self.goto(len(self.prompts) - 1 if self.index is None else self.index - 1)

    def undo(self) -> dict | None:
        """Retract this labeler's newest ranking (a retraction record; the file is never rewritten)."""
        ours = set(self.prompts)
        target = next(
            (r for r in reversed(self.store.refresh()) if r.get("labeler") == self.labeler and r["prompt"] in ours),
            None,
        )
        if target is None:
            self.cards.say("Nothing to undo.")
            return None
        try:
            self.store.retract(target, self.labeler, "undo")
        except LabelWriteError as e:
            raise LabelWriteError(f"{e}; nothing was undone") from e
        i = self.prompts.index(target["prompt"])
        self._answers[i] = list(target["responses"])
        self.goto(i)
        self.cards.fill(target)  # the retracted ranking, pre-filled: fix it and Submit again
        self.cards.say(f"Undone: {describe(target)}. Change it and Submit again, or Skip.")
        return target

    def goto(self, i: int | None) -> None:
        """Show prompt `i` (None: the all-done screen)."""
        self.index, self._replacing = i, None
        if i is None:
            self.cards.show_note(
                f"<b>Done: {_count(len(self.prompts), 'prompt')} labelled.</b> Back shows earlier ones; "
                f"the panel's <code>.preferences</code> has every ranking in the file."
            )
            self._refresh()
            return
        prompt = self.prompts[i]
        saved = self.store.find(self.labeler, prompt)
        try:
            answers = list(saved["responses"]) if saved else self._answers_for(i)
        except Exception:
            # never leave the previous prompt's answers on screen under this prompt: nothing can be submitted
            self.cards.show_note(f"Prompt {i + 1}: could not get answers (see the error below). Skip moves on.")
            self._refresh()
            raise
        self.cards.show(prompt, answers, i, len(self.prompts), self.ties or len(answers) == 2)
        if saved:
            self._replacing = saved
            self.cards.fill(saved)
            self.cards.say(f"Already labelled: {describe(saved)}. Submit replaces it; Skip moves on.")
        self._refresh()

    # ---- internals ---------------------------------------------------------------------------------------------
    def _submit_widgets(self) -> dict:
        groups = self.cards.groups()
        if self.index is None or groups is None:
            raise DataError("the ranking is incomplete: give every answer a rank before you submit")
        prompt = self.prompts[self.index]
        old = self.store.find(self.labeler, prompt)  # also catches a ranking made in another panel meanwhile
        record = {
            "kind": RANKING,
            "id": new_id(),
            "prompt": prompt,
            "responses": list(self.cards.responses),
            "ranking": format_ranking(groups),
            "labeler": self.labeler,
            "time": now_iso(),
            "flags": [ALL_BAD] if self.cards.flag.value else [],
            "comment": self.cards.comment.value.strip(),
            "policy": policy_name(self.policy),
        }
        if old is not None:
            record["replaces"] = old["id"]
        try:
            self.store.append(record)
        except LabelWriteError as e:  # nothing changed on screen or on disk: the same Submit can be retried
            raise LabelWriteError(f"{e}; your ranking is still here: Submit again once that is fixed") from e
        self.goto(self._next_pending(self.index))
        verb = "Replaced" if old is not None else "Saved"
        self.cards.say(f"{verb} {describe(record)} for prompt {self.prompts.index(prompt) + 1}.", ok=True)
        return record

    def _labeler_changed(self) -> None:
        """Another labeler: show the first prompt (from here on) that this labeler has not ranked."""
        here = -1 if self.index is None else self.index
        self.goto(self._next_pending(here, include_current=True))
        self.cards.say(f"Labelling as {self.labeler}: {len(self.pending)} prompt(s) left.")

    def _next_pending(self, after: int, include_current: bool = False) -> int | None:
        """The first unlabelled prompt after `after`, wrapping around; `after` itself only if it is the last."""
        pending = self.pending
        if not pending:
            return None
        later = [i for i in pending if i > after or (include_current and i == after)]
        rest = [i for i in pending if i < after]
        order = later + rest + ([after] if after in pending else [])
        return order[0]

    def _answers_for(self, i: int) -> list[str]:
        if i in self._answers:
            return self._answers[i]
        if self._given is not None:
            self._answers[i] = list(self._given[i])
            return self._answers[i]
        # One batched call for this prompt and the next open ones (up to `prefetch`): a decode step reads the
        # weights once whatever the rows, so later prompts cost little more.
        later = [j for j in self.pending if j > i and j not in self._answers]
        chunk = [i, *later[: self.prefetch - 1]]
        # the next prompt, no cards: the previous prompt's answers never sit under it while these are sampled
        ahead = f" (and {len(chunk) - 1} more prompt(s) ahead)" if len(chunk) > 1 else ""
        self.cards.show_note(
            f"Prompt {i + 1} of {len(self.prompts)}: <b>{html.escape(self.prompts[i])}</b><br>"
            f"Sampling {self.k} answers{ahead} from {html.escape(policy_name(self.policy))}…"
        )
        self._refresh()
        seed = None if self.seed is None else self.seed + i  # the same answers on a rerun from the same point
        out = self.policy.sample([self.prompts[j] for j in chunk], self.k, seed=seed, **self.sampling)
        if len(out) != len(chunk) or any(len(a) != self.k for a in out):
            got = [len(a) for a in out]
            raise DataError(f"the policy returned {got} answers for {len(chunk)} prompt(s), expected {self.k} each")
        for j, answers in zip(chunk, out):
            self._answers[j] = [str(a) for a in answers]
        return self._answers[i]

    def _refresh(self) -> None:
        labelled = len(self.prompts) - len(self.pending)
        self.cards.update(labelled, len(self.prompts), self.index, self._replacing is not None)

    def _guard(self, fn: Callable[[], Any]) -> Callable[..., None]:
        """A widget callback that shows errors in the panel instead of losing them."""

        def handler(*_: Any) -> None:
            try:
                fn()
            except RLHFError as e:
                self.cards.say(str(e), error=True)
            except Exception as e:
                self.cards.say(f"{type(e).__name__}: {e} (details below)", error=True)
                with self.cards.log:
                    traceback.print_exc()

        return handler

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.cards.root)

    def __repr__(self) -> str:
        done = len(self.prompts) - len(self.pending)
        return f"<RankingPanel {done}/{len(self.prompts)} labelled by {self.labeler!r} -> {self.store.path}>"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"all {n} {noun}s"
