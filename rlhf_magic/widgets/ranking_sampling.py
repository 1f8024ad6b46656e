"""The ranking panel's side of background sampling: the sampling strip (progress bar, Stop), the note a prompt shows
while its answers are sampled, and the panel methods that start, wait for, stop and show the sampler's work.

Threads: the sampler's thread calls `_landed` after each batch; every method that changes what the panel shows runs
under the panel's lock (`locked`), so a click, a script and the sampler never change the widgets at once.
"""

from __future__ import annotations

import functools
import html
from collections.abc import Callable
from typing import Any

from ..errors import DataError
from . import notebook_module
from .ranking_options import policy_name
from .ranking_sampler import Sampler, one_line, policy_draw


def locked(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A panel method that runs under the panel's lock (the background sampler updates the panel too)."""

    @functools.wraps(fn)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return fn(self, *args, **kwargs)

    return run


class BackgroundSampling:
    """RankingPanel's sampling methods (the panel holds `sampler`, `cards`, `_lock`, `_waiting` and `goto`)."""

    sampler: Sampler | None
    _waiting: int | None
    _closed: bool

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every open prompt's answers are sampled (without a background thread: sample them now).
        True when they are; False when Stop ended sampling first or `timeout` passed; a sampling error is raised."""
        if self.sampler is None:
            return True
        done = self.sampler.wait(timeout=timeout)
        self._show_ready()
        if self.sampler.error is not None:
            raise self.sampler.error
        return done

    def stop(self) -> None:
        """End background sampling now (at the next decode step of an rlhf-magic policy, else after the batch in
        progress). Prompts with answers can still be ranked; the others say why they have none."""
        if self.sampler is not None and not self.sampler.stopped:
            self.sampler.stop()
            with self._lock:
                if self._waiting is not None:
                    self.goto(self._waiting)
                self._refresh()

    def close(self) -> None:
        """Stop sampling (its thread ends) and close the panel's widgets."""
        self.stop()
        if self.sampler is not None:
            self.sampler.join()
        with self._lock:
            self._closed = True
            close_tree(self.cards.root)

    def _answers_for(self, i: int) -> list[str] | None:
        """Prompt i's answers: given, kept from an undone record, or sampled (None: the background thread samples
        them next). Without a thread, the batch is sampled here, with a note on screen meanwhile."""
        if i in self._answers:
            return self._answers[i]
        if self._given is not None:
            self._answers[i] = list(self._given[i])
            return self._answers[i]
        if not self.sampler.background and not self.sampler.has(i) and not self.sampler.stopped:
            # the next prompt, no cards: the previous prompt's answers never sit under it while these are sampled
            self.cards.show_note(self._note(i))
            self._refresh()
        return self.sampler.get(i)

    def _sampler(self, background: bool) -> Sampler | None:
        if self._given is not None:
            return None
        draw = policy_draw(self.policy, self.prompts, self.k, self.sampling)
        sampler = Sampler(
            draw, self.pending, prefetch=self.prefetch, seed=self.seed, notify=self._landed, background=background
        )
        view = SamplingView()
        view.stop.on_click(self._guard(self.stop))
        root = self.cards.root
        kids = list(root.children)
        at = kids.index(self.cards.prompt) if self.cards.prompt in kids else 1
        root.children = [*kids[:at], view.root, *kids[at:]]  # above the prompt
        self._view = view
        return sampler

    def _start_sampling(self) -> None:
        """The last step of opening the panel: the background thread starts."""
        if self.sampler is not None and self.sampler.background:
            from .uipoll import poll_ui_events

            poll_ui_events(self._view.stop)  # Stop is heard even while another cell waits for this sampler's batch
            self.sampler.start()

    def _landed(self) -> None:
        """From the sampler's thread, after each batch and at its end: show the answers (or why there are none)."""
        try:
            with self._lock:
                if self._closed:
                    return
                self._show_ready()
                if self.sampler.ended and self.sampler.error is not None:
                    self.cards.say(f"Sampling failed: {one_line(self.sampler.error)}", error=True)
                self._refresh()
        except Exception as e:  # a widget that failed: one line, never the sampler's thread
            self.cards.say(f"{type(e).__name__}: {e}", error=True)

    @locked
    def _show_ready(self) -> None:
        """Show the waiting prompt's cards once its answers exist (or its note once sampling ended without them)."""
        i = self._waiting
        if i is not None and not self._closed and (self.sampler.has(i) or self.sampler.ended or self.sampler.stopped):
            self.goto(i)

    def _await_answers(self) -> int | None:
        """The prompt on screen, once its answers are on screen (waits for the background sampler)."""
        i = self.index
        if i is not None and self._waiting == i:
            self.sampler.wait(i)
            self._show_ready()
        return i

    def _sampled_answers(self, i: int) -> list[str]:
        answers = self._answers_for(i)
        if answers is None:
            self.sampler.wait(i)
            answers = self.sampler.answers.get(i)
        if answers is None:
            why = one_line(self.sampler.error) if self.sampler.error is not None else "sampling was stopped"
            raise DataError(f"prompt {i + 1} has no answers: {why}")
        return answers

    def _note(self, i: int) -> str:
        return waiting_note(self.sampler, i, self.prompts[i], len(self.prompts), str(policy_name(self.policy)))

    def _show_sampling(self) -> None:
        if self.index is not None and not self.cards.responses:
            self.cards.summary.value = ""  # no answers on screen yet: nothing to rank
        if self.sampler is not None:
            self._view.update(self.sampler, str(policy_name(self.policy)))


class SamplingView:
    """The panel's sampling strip: how many prompts have answers, a progress bar, and Stop. Hidden when done."""

    def __init__(self) -> None:
        W = notebook_module("ipywidgets")

        self.bar = W.IntProgress(value=0, min=0, max=1, layout=W.Layout(width="160px"))
        self.text = W.HTML()
        self.stop = W.Button(description="Stop sampling", icon="stop", tooltip="Stop sampling answers")
        self.root = W.HBox([self.bar, self.text, self.stop], layout=W.Layout(align_items="center", grid_gap="12px"))
        for widget, name in [(self.root, "sampling"), (self.bar, "sampling-bar"), (self.text, "sampling-text"),
                             (self.stop, "stop")]:  # fmt: skip
            widget.add_class(f"rlhf-{name}")

    def update(self, sampler: Sampler | None, source: str) -> None:
        """Show the state of background sampling (nothing without it, or once every answer is there)."""
        if sampler is None or not sampler.background or (sampler.complete and sampler.error is None):
            self.root.layout.display = "none"
            return
        done, total = sampler.sampled, sampler.total
        ended = sampler.ended
        if sampler.error is not None:
            text = f"<span style='color:#c62828'>Sampling failed: {html.escape(one_line(sampler.error))}</span>"
        elif sampler.stopped:
            text = f"Sampling stopped: {done} of {total} prompts have answers."
        elif ended:
            text = f"{done} of {total} prompts have answers."
        else:
            text = f"Sampling answers from {html.escape(source)} in the background: {done} of {total} prompts ready…"
        self.bar.max, self.bar.value = max(total, 1), done
        self.bar.layout.display = "none" if ended or sampler.stopped else None
        self.stop.layout.display = "none" if ended or sampler.stopped else None
        self.text.value = text
        self.root.layout.display = None

    def close(self) -> None:
        for w in (self.bar, self.text, self.stop, self.root):
            w.close()


def waiting_note(sampler: Sampler, i: int, prompt: str, n: int, source: str) -> str:
    """The panel's note for prompt i while it has no answers: being sampled, or why there will be none."""
    head = f"Prompt {i + 1} of {n}: <b>{html.escape(prompt)}</b><br>"
    if sampler.error is not None and sampler.ended:
        return head + (
            f"<span style='color:#c62828'>No answers: sampling failed ({html.escape(one_line(sampler.error))})."
            "</span> Skip moves on to prompts that have answers."
        )
    if sampler.stopped:
        return head + "No answers: sampling was stopped first. Skip moves on to prompts that have answers."
    others = len(sampler.batch_of(i)) - 1
    ahead = f" (in one batch with {others} more prompt{'s' if others > 1 else ''})" if others else ""
    return head + f"Sampling answers for prompt {i + 1} of {n}{ahead} from {html.escape(source)}…"


def close_tree(widget: Any) -> None:
    """Close a widget and every widget inside it (their front-end views go)."""
    for child in getattr(widget, "children", None) or ():
        close_tree(child)
    widget.close()
