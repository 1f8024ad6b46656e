"""The ranking panel: a person orders K answers per prompt; every Submit appends one JSONL record.

Core ipywidgets (JupyterLab 4, Notebook 7, VS Code, Colab), plus a keyboard and drag view where anywidget runs.
In a notebook `%rank` returns at once and the answers are sampled in a background thread while the person labels
(ranking_sampler.py); in scripts, tests and headless runs each batch is sampled when its first prompt comes up. The
batches and seeds are the same either way.
Every button has a method that does the same thing (`submit`, `skip`, `back`, `undo`) for scripts and tests.
"""

from __future__ import annotations

import threading
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
from .ranking_sampler import background_default
from .ranking_sampling import BackgroundSampling, locked
from .ranking_store import PreferenceStore, new_id, now_iso

ALL_BAD = "all_bad"
NAME_NEEDED = "Type your name in the Labeler box first: it is saved with every ranking (asked once per file)"
BLANK_NAME = "a labeler name cannot be empty or only spaces: type your name in the Labeler box"


class RankingPanel(BackgroundSampling):
    """Rank K answers per prompt. `.preferences` holds every ranking in `file` (retractions applied).

    Sampling: with `background` (the default inside a Jupyter kernel, unless RLHF_MAGIC_HEADLESS=1) the panel shows
    at once with "Sampling answers for prompt 1 of N..." and a progress bar, and a thread samples the answers: the
    first open prompt alone, then the rest `prefetch` per batch, the prompt on screen first. Stop (or `stop()`)
    ends it at the next decode step; `close()` and re-running the `%rank` cell stop it too. `wait()` blocks until
    every answer is sampled; `submit()` and `current_responses` wait for the answers of the prompt on screen. A
    sampling error ends sampling with one line in the panel. The same seed gives the same answers with or without
    `background`.

    The kernel stays free while the thread samples (torch releases the GIL in its kernels). A cell that needs a
    model meanwhile waits for the batch in progress: the stage magics (%%sft, %%reward, %%ppo...) and %compare say
    so in one line, then run while the sampler waits for them; sampling called directly (`policy.generate(...)`)
    waits for that batch without a word.

    No record is written twice for one Submit: a Submit of what is already saved for the prompt (a double click,
    Enter twice, Replace with nothing changed) writes nothing, and nor does one that waited while another Submit
    saved the prompt.
    """

    def __init__(
        self,
        prompts: Any = None,
        policy: Any = None,
        *,
        config: RankConfig | None = None,
        session: Any = None,
        background: bool | None = None,
        **options: Any,
    ):
        """`options` are RankConfig's fields (`%rank?` lists them); they override `config`. `background`: sample in
        a thread while the panel is used (None: inside a Jupyter kernel unless RLHF_MAGIC_HEADLESS=1)."""
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
        check_room(self.policy, self.prompts if self._given is None else [], cfg.max_new_tokens)
        self.store = PreferenceStore(cfg.file)  # DataError for a missing folder or foreign records: nothing written
        self._answers: dict[int, list[str]] = {}
        self.index: int | None = None
        self._replacing: dict | None = None
        self._lock, self._waiting, self._just_saved, self._closed = threading.RLock(), None, False, False
        self.sampler = None
        name = cfg.labeler.strip() or self.store.last_labeler()  # given, or remembered from the file
        self.cards = Cards(self._guard(self._edited), cfg.title or "Rank the answers", name)
        self.sampler = self._sampler(background_default() if background is None else background)
        self.cards.on_button("submit", self._guard(self._on_submit_click))
        self.cards.on_button("skip", self._guard(self.skip))
        self.cards.on_button("back", self._guard(self.back))
        self.cards.on_button("undo", self._guard(self.undo))
        self.cards.on_labeler(self._guard(self._labeler_changed))
        self.cards.on_action("flag", self._guard(self.flag))  # F in the keyboard view (other keys click the buttons)
        self.goto(self._next_pending(-1, include_current=True))
        if self.index is not None and self._replacing is None:
            pair = (len(self.cards.responses) or self.k) == 2
            how = "Pick the better answer (or Tie)" if pair else "Rank every answer (1 = best)"
            self.cards.say(f"{how}, then Submit. Each Submit is saved to {self.store.path.name} at once.")
        if not self.labeler:
            self.cards.say(f"{NAME_NEEDED}.")
        elif not cfg.labeler.strip():
            self.cards.say(f"Labelling as {name}, the last labeler in {self.store.path.name}: not you? Type your name.")
        self._start_sampling()

    # ---- what scripts and simulated labelers use -------------------------------------------------------------
    @property
    def labeler(self) -> str:
        """Who is labelling: the name in the Labeler box ('' until one is given, and Submit asks for it)."""
        return self.cards.labeler.value.strip()

    @labeler.setter
    def labeler(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"labeler = {name!r}: {BLANK_NAME}")
        self.cards.labeler.value = name.strip()  # re-reads which prompts this labeler still has to rank

    @property
    def preferences(self) -> Preferences:
        return self.store.preferences()

    @property
    def current_prompt(self) -> str | None:
        return None if self.index is None else self.prompts[self.index]

    @property
    def current_responses(self) -> list[str]:
        """The answers on screen (waits while the shown prompt's answers are sampled in the background)."""
        self._await_answers()
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
        """Every prompt's answers (saved ones where labelled; samples the rest, or waits for the background
        sampler): reuse them in a second panel."""
        saved = {r["prompt"]: r["responses"] for r in self.store.refresh() if r.get("labeler") == self.labeler}
        return [list(saved[p]) if p in saved else self._sampled_answers(i) for i, p in enumerate(self.prompts)]

    def submit(self, ranking: Any = None, *, flag: bool | None = None, comment: str | None = None) -> dict:
        """Exactly what clicking the rank buttons and Submit does. `ranking`: indices best first, ties nested."""
        shown = self._await_answers()
        with self._lock:
            if self.index != shown:  # the panel moved on while this waited: another Submit saved the prompt
                return self._stale(shown)
            return self._submit(ranking, flag, comment)

    def _submit(self, ranking: Any, flag: bool | None, comment: str | None) -> dict:
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

    def flag(self, comment: str | None = None) -> dict:
        """Flag this prompt "all answers are bad or unsafe" and move on: a record with the flag and no ranking.
        `to_pairs()` and %%reward leave flagged prompts out unless include_flagged."""
        if self.index is None:
            raise DataError("every prompt is labelled; use back() to show an earlier prompt, then flag() it")
        if comment is not None:
            self.cards.comment.value = str(comment)
        self.cards.flag.value = True
        return self._submit_widgets(rank=False)

    @locked
    def skip(self) -> None:
        """Leave this prompt unlabelled for now (it comes back after the others, and on resume)."""
        nxt = self._next_pending(self.index if self.index is not None else -1)
        self.goto(nxt)
        if nxt is not None and nxt == self.index and self.cards.groups() is None:
            self.cards.say("This is the only prompt left to label.")

    @locked
    def back(self) -> None:
        """Show the previous prompt; a ranking already saved there is shown and can be replaced."""
        if self.index == 0:
            self.cards.say("This is the first prompt.")
            return
        self.goto(len(self.prompts) - 1 if self.index is None else self.index - 1)

    @locked
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

    @locked
    def goto(self, i: int | None) -> None:
        """Show prompt `i` (None: the all-done screen)."""
        self.index, self._replacing, self._waiting, self._just_saved = i, None, None, False
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
        if answers is None:  # sampled in the background: the cards come when they land (`_landed`)
            self._waiting = i
            self.cards.show_note(self._note(i))
            self._refresh()
            return
        self.cards.show(prompt, answers, i, len(self.prompts), self.ties or len(answers) == 2)
        if saved:
            self._replacing = saved
            self.cards.fill(saved)
            self.cards.say(f"Already labelled: {describe(saved)}. Submit replaces it; Skip moves on.")
        self._refresh()

    # ---- internals ---------------------------------------------------------------------------------------------
    def _on_submit_click(self) -> None:
        if self._just_saved and self.cards.groups() is None and not self.cards.flag.value:
            return  # the second click of a double click (or Enter twice): the first saved and moved on
        self._submit_widgets()

    def _stale(self, shown: int | None) -> dict:
        saved = None if shown is None else self.store.find(self.labeler, self.prompts[shown])
        if saved is None:
            raise DataError(f"submit: the panel left prompt {shown + 1} while this Submit waited; nothing was written")
        return saved

    def _unchanged(self, old: dict) -> dict:
        """A Submit of exactly what is saved: nothing is written; the panel moves on as after a save."""
        i = self.prompts.index(old["prompt"])
        self.goto(self._next_pending(i))
        what = "flagged" if old.get("ranking") is None else describe(old)
        self.cards.say(f"Prompt {i + 1} is already saved as {what}; nothing changed, so nothing was written.", ok=True)
        self._just_saved = True
        return old

    @locked
    def _submit_widgets(self, rank: bool = True) -> dict:
        groups, flagged = self.cards.groups() if rank else None, bool(self.cards.flag.value)
        if self.index is not None and not self.labeler:
            raise DataError(f"who is labelling? {NAME_NEEDED}; nothing was saved")
        if self.index is None or (groups is None and not flagged):
            raise DataError("the ranking is incomplete: give every answer a rank (or flag the prompt), then submit")
        prompt = self.prompts[self.index]
        old = self.store.find(self.labeler, prompt)  # also catches a ranking made in another panel meanwhile
        record = {
            "kind": RANKING,
            "id": new_id(),
            "prompt": prompt,
            "responses": list(self.cards.responses),
            "ranking": None if groups is None else format_ranking(groups),  # None: flagged, no ranking
            "labeler": self.labeler,
            "time": now_iso(),
            "flags": [ALL_BAD] if flagged else [],
            "comment": self.cards.comment.value.strip(),
            "policy": policy_name(self.policy),
        }
        if old is not None and all(old.get(f) == record[f] for f in ("responses", "ranking", "flags", "comment")):
            return self._unchanged(old)
        if old is not None:
            record["replaces"] = old["id"]
        try:
            self.store.append(record)
        except LabelWriteError as e:  # nothing changed on screen or on disk: the same Submit can be retried
            raise LabelWriteError(f"{e}; your ranking is still here: Submit again once that is fixed") from e
        self.goto(self._next_pending(self.index))
        verb = "Replaced" if old is not None else "Saved"
        self.cards.say(f"{verb} {describe(record)} for prompt {self.prompts.index(prompt) + 1}.", ok=True)
        self._just_saved = True
        return record

    def _labeler_changed(self) -> None:
        """Another labeler: show the first prompt (from here on) that this labeler has not ranked; a ranking in
        progress stays if this labeler has not ranked that prompt. An empty name is refused, the ranking kept."""
        if not self.labeler:
            self.cards.say(BLANK_NAME, error=True)
            return
        if self.index is None or self._replacing is not None or self.index not in self.pending:
            self.goto(self._next_pending(-1 if self.index is None else self.index, include_current=True))
        self._refresh()
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

    def _edited(self) -> None:
        self._just_saved = False
        self._refresh()

    def agreement(self) -> Any:
        """Agreement between the labelers in this file, with the prompts they disagree on most: a click on one
        shows it here to re-label (an `AgreementView`)."""
        from .agreement import AgreementView

        return AgreementView(self.preferences, panel=self)

    def _refresh(self) -> None:
        labelled = len(self.prompts) - len(self.pending)
        self.cards.update(labelled, len(self.prompts), self.index, self._replacing is not None)
        self._show_sampling()

    def _guard(self, fn: Callable[[], Any]) -> Callable[..., None]:
        """A widget callback that shows errors in the panel instead of losing them."""

        def handler(*_: Any) -> None:
            try:
                with self._lock:
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


def check_room(policy: Any, prompts: list[str], max_new_tokens: int) -> None:
    """max_new_tokens must fit the policy's context after the longest of all the prompts, not only after those of
    the first batch: refused when the panel opens, before anything is sampled or written."""
    lm = getattr(policy, "lm", None)
    if lm is None or not prompts:
        return
    from ..engine.generation import check_new_tokens, encode_prompts

    check_new_tokens(lm, encode_prompts(lm, prompts), max_new_tokens)
