"""The ranking panel's answers, sampled in batches fixed when the panel opens: in a background thread while the person
labels (a notebook with a front end), or when a prompt comes up (scripts, tests, headless runs).

The batches: the first open prompt alone, so its answers show as soon as they can, then the other open prompts in
order, `prefetch` per batched call; a batch is seeded with seed + the index of its first prompt. A seed therefore
gives the same answers in the background or not, whatever order the batches run in (a prompt the person jumps to is
sampled next).

One user of the models at a time: each batch holds the engine's MODEL_LOCK, which sampling takes anyway, and a stage
run from a magic takes it through `model_turn` (one line says when it waits). Stop ends sampling between two decode
steps where the engine samples (generation.stoppable), else after the batch in progress.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Draw = Callable[[list[int], int | None], list[list[str]]]  # (prompt indices, seed) -> answers per prompt
THREAD_NAME = "rlhf-rank-sampler"
JOIN_TIMEOUT_S = 10.0


def plan(order: Sequence[int], prefetch: int) -> list[list[int]]:
    """The batches for prompts `order`: the first alone, then the rest in order, `prefetch` per batch."""
    order = list(order)
    rest = order[1:]
    return ([order[:1]] if order else []) + [rest[i : i + prefetch] for i in range(0, len(rest), prefetch)]


def background_default() -> bool:
    """Sample in the background inside a Jupyter kernel (a front end shows the panel), unless RLHF_MAGIC_HEADLESS=1."""
    if os.environ.get("RLHF_MAGIC_HEADLESS") == "1":
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def one_line(error: BaseException) -> str:
    """An error in one line: the package's own errors as they are, others with their type."""
    from ..errors import RLHFError

    text = str(error).strip().splitlines()
    text = text[0] if text else ""
    return text if isinstance(error, RLHFError) and text else f"{type(error).__name__}: {text}".rstrip(": ")


def _engine() -> Any:
    from ..engine import generation  # the lock and stop hook live with sampling (imports torch)

    return generation


def _say(message: str) -> None:
    print(message)


@contextlib.contextmanager
def model_turn(say: Callable[[str], Any] | None = None) -> Iterator[None]:
    """Around a stage run from a magic: a ranking panel sampling in the background finishes the batch in progress
    first (`say`, default print, one line while this waits), then waits for the stage to end."""
    lock = _engine().MODEL_LOCK
    if not lock.acquire(blocking=False):
        busy = [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]
        who = "a ranking panel is sampling answers" if busy else "another thread is using a model"
        (say or _say)(
            f"Waiting: {who}; this cell runs once its current batch ends (Stop in the panel ends its sampling)."
        )
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


class Sampler:
    """Answers for prompt indices, batch by batch. `notify()` runs on the sampler's thread after every batch and once
    when the thread ends (also after a stop or an error)."""

    def __init__(
        self,
        draw: Draw,
        order: Sequence[int],
        *,
        prefetch: int,
        seed: int | None,
        notify: Callable[[], None],
        background: bool,
    ):
        self.draw, self.seed, self.notify, self.background = draw, seed, notify, background
        self.batches = plan(order, prefetch)
        self.answers: dict[int, list[str]] = {}
        self.error: BaseException | None = None  # what ended background sampling, if it failed
        self.thread: threading.Thread | None = None
        self.ended = False  # the background thread is done (set just before its last notify())
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._want: list[int] = []  # prompts the panel waits for: their batches go first

    # ---- state -------------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(map(len, self.batches))

    @property
    def sampled(self) -> int:
        return sum(j in self.answers for b in self.batches for j in b)

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def complete(self) -> bool:
        return self.sampled == self.total

    def has(self, i: int) -> bool:
        return i in self.answers

    def batch_of(self, i: int) -> list[int]:
        with self._cond:
            for b in self.batches:
                if i in b:
                    return b
            self.batches.append([i])  # a prompt the plan did not hold (another labeler's open prompt)
            self._cond.notify_all()
            return [i]

    # ---- sampling ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Sample every batch in a daemon thread (ends when all are sampled, on stop(), or at the first error)."""
        self.thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self.thread.start()

    def get(self, i: int) -> list[str] | None:
        """Prompt i's answers. In the background: None until its batch lands (it goes next). Otherwise its batch is
        sampled now, in this thread, and errors are raised. None once stopped."""
        if i in self.answers:
            return self.answers[i]
        batch = self.batch_of(i)
        if not self.background:
            if self.stopped:
                return None
            self._sample(batch)
            return self.answers[i]
        with self._cond:
            self._want = [i, *[j for j in self._want if j != i]]
            restart = self.ended and not self.stopped and self.error is None  # a prompt the finished plan lacked
            if restart:
                self.ended = False
        if restart:
            self.start()
        return None

    def wait(self, i: int | None = None, timeout: float | None = None) -> bool:
        """Block until prompt i's answers (every planned prompt's, for None) exist: True, or False when sampling
        ended without them (stopped, failed) or `timeout` passed. Without a thread, the missing batches are sampled
        now."""
        todo = [i] if i is not None else [j for b in self.batches for j in b]
        if not self.background:
            return all(self.get(j) is not None for j in todo)
        with self._cond:
            self._cond.wait_for(lambda: all(j in self.answers for j in todo) or self.ended, timeout)
            return all(j in self.answers for j in todo)

    def stop(self) -> None:
        """No more batches; a batch in progress ends at its next decode step (engine policies) or when it returns."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Wait for the thread to end (True when it has)."""
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)
        return not self.running

    def _next(self) -> list[int] | None:
        with self._cond:
            todo = [b for b in self.batches if not all(j in self.answers for j in b)]
            wanted = [b for i in self._want for b in todo if i in b]
            return (wanted or todo or [None])[0]

    def _loop(self) -> None:
        try:
            while not self.stopped:
                batch = self._next()
                if batch is None:
                    break
                self._sample(batch)
                self.notify()
        except Exception as e:  # any error ends sampling: shown as one line by the panel
            if not self.stopped:  # a stop that interrupted a batch is not an error
                self.error = e
        finally:
            with self._cond:
                self.ended = True
                self._cond.notify_all()
            self.notify()

    def _sample(self, batch: list[int]) -> None:
        seed = None if self.seed is None else self.seed + batch[0]
        engine = _engine()
        with engine.MODEL_LOCK, engine.stoppable(self._stop.is_set):
            if self.stopped:  # stopped while waiting for the lock
                raise engine.SamplingStopped("sampling stopped")
            out = self.draw(batch, seed)
        with self._cond:
            self.answers.update(zip(batch, out))
            self._cond.notify_all()


def policy_draw(policy: Any, prompts: list[str], k: int, sampling: dict[str, Any]) -> Draw:
    """`policy.sample` as a Draw: K answers (strings) for each prompt of a batch, or a one-line DataError."""
    from ..errors import DataError

    def draw(batch: list[int], seed: int | None) -> list[list[str]]:
        out = policy.sample([prompts[j] for j in batch], k, seed=seed, **sampling)
        if len(out) != len(batch) or any(len(a) != k for a in out):
            got = [len(a) for a in out]
            raise DataError(f"the policy returned {got} answers for {len(batch)} prompt(s), expected {k} each")
        return [[str(a) for a in answers] for answers in out]

    return draw
