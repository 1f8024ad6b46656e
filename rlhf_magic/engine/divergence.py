"""Divergence: a run whose numbers stop being finite, or whose finite numbers say it has gone off the rails.

NaN or inf in a loss, the weights, the rewards or the next-token probabilities always stops the run. A run that
stays finite but diverges raises an alarm (`Rules.check`, fed each step's metrics, says which):

- SFT and reward: the gradients vanish (their norm falls below VANISHED x its first while the loss stays above half
  its start: the outputs no longer depend on the weights, as when an overflow inside a norm layer zeroes the hidden
  states; an SFT model then makes a uniform guess, a reward model gives every answer the same score; a model that
  learned its data has small gradients because its loss is small), or the loss, the mean of the last WINDOW steps,
  climbs above max(LOSS_FACTOR x its first step, a ceiling). The ceiling for SFT is the loss of a uniform guess over
  the vocabulary, ln V (a model that knew something and knows nothing now); for a reward model LOSS_FACTOR x the
  loss of scoring every answer the same (where an untrained head starts).
- PPO: the value loss climbs VALUE_FACTOR times above its first minibatch (at least 1), the policy's entropy
  collapses to almost 0 or turns into a near-uniform guess over the vocabulary, or every answer is empty.

`Watch` keeps copies of the trainable weights at the last two accepted steps (on the CPU when they are large) and
turns an alarm into an "alarm" event and, with stop_on_divergence (always, for NaN or inf), a stop that puts the
last good weights back. The metrics of step k were measured on the weights of step k - 1, so an alarm goes back to
the weights of step k - 2; weights that are themselves not finite go back one step.
"""

from __future__ import annotations

import functools
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import RLHFError

WINDOW = 3  # SFT / reward: the loss alarm reads the mean of this many steps (one batch can be unlucky)
LOSS_FACTOR = 2.0
VANISHED = 1e-4
VALUE_FACTOR = 1e3
ENTROPY_FLOOR = 0.01  # nats per token: a policy that always samples the same token
NEAR_UNIFORM = 0.9  # x ln V: a policy that samples (almost) uniformly random tokens
SMALL_SNAPSHOT = 64 << 20  # bytes: copies of trainable weights up to this size stay on their device


class NonFiniteError(RLHFError, RuntimeError):
    """The model's next-token probabilities were not finite: its weights diverged. Raised before sampling draws, in
    place of torch.multinomial's RuntimeError. `value`: 'nan' or 'inf'."""

    def __init__(self, message: str, value: str):
        super().__init__(message)
        self.value = value


@dataclass
class Alarm:
    step: int
    text: str  # what happened, e.g. "training diverged at step 2: the weights became inf"
    fix: str
    finite: bool = True  # False: NaN or inf, which stop a run whatever stop_on_divergence says
    older: bool = True  # the step's metrics were measured on the weights of the step before: go back two snapshots

    def stopped(self, kept: int, noun: str) -> str:
        return f"{self.text}; the result keeps the {noun} of step {kept} ({self.fix})"

    def warning(self) -> str:
        return f"{self.text} ({self.fix}); stop_on_divergence = False, so training goes on"


def lr_fix(lr: float, default: float) -> str:
    return f"lower lr: it is {lr:g}" + (f", the default is {default:g}" if lr != default else ", the default")


@dataclass
class Rules:
    """The alarms of one run. `vocab`: the model's output vocabulary; `uniform`: the loss of a uniform guess (SFT:
    ln V) or of equal scores (reward), None for PPO; `fix`: what to change, e.g. lr_fix(...)."""

    stage: str
    vocab: int
    fix: str
    uniform: float | None = None
    first: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    said: set[str] = field(default_factory=set)

    def start(self, key: str, value: float) -> None:
        """The first value of `key`, where the first step's own is not it (PPO: the value loss before any update)."""
        if math.isfinite(value):
            self.first.setdefault(key, value)

    def check(self, step: int, row: dict[str, float]) -> Alarm | None:
        """An alarm for this step's metrics, or None. Each finite rule alarms once a run."""
        bad = self._not_finite(step, row)
        if bad is not None:
            return bad
        for key, value in row.items():
            self.start(key, value)
        rules = self._ppo(row) if self.stage == "ppo" else self._supervised(row)
        for kind, text, fix in rules:
            if kind not in self.said:
                self.said.add(kind)
                return Alarm(step, f"training diverged at step {step}: {text}", fix)
        return None

    def _not_finite(self, step: int, row: dict[str, float]) -> Alarm | None:
        names = {
            "train/loss": "the loss",
            "eval/loss": "the held-out loss",
            "ppo/policy/loss": "the policy loss",
            "ppo/val/loss": "the value loss",
            "ppo/policy/entropy": "the policy's entropy",
        }
        for key, name in names.items():
            if key in row and not math.isfinite(row[key]):
                return Alarm(step, f"training diverged at step {step}: {name} became {row[key]:g}", self.fix, False)
        return None

    def _supervised(self, row: dict[str, float]) -> Iterator[tuple[str, str, str]]:
        loss, start, grad = row["train/loss"], self.first["train/loss"], row.get("train/grad_norm", math.nan)
        self.losses.append(loss)
        uniform = self.uniform if self.uniform is not None else math.log(self.vocab)
        if grad <= VANISHED * self.first.get("train/grad_norm", 0.0) and loss >= 0.5 * start:
            stuck = f"the gradients vanished and the loss is stuck at {loss:.4g}"
            if self.stage == "sft" and abs(loss - uniform) < 1e-3:
                stuck += f", a uniform guess over {self.vocab} tokens"
            elif self.stage == "reward" and abs(loss - uniform) < 1e-3:
                stuck += ": the reward model gives every answer the same score"
            yield "vanished", stuck, self.fix
        mean = statistics.fmean(self.losses[-WINDOW:])
        ceiling = max(LOSS_FACTOR * start, uniform if self.stage == "sft" else LOSS_FACTOR * uniform)
        if mean > ceiling:
            what = f"a uniform guess over {self.vocab} tokens" if self.stage == "sft" else "equal scores"
            yield "loss", f"the loss rose to {mean:.4g} (its start: {start:.4g}; {what}: {uniform:.4g})", self.fix

    def _ppo(self, row: dict[str, float]) -> Iterator[tuple[str, str, str]]:
        first, uniform = self.first, math.log(self.vocab)
        value, value0 = row.get("ppo/val/loss", 0.0), first.get("ppo/val/loss", 0.0)
        if value > VALUE_FACTOR * max(value0, 1.0):
            yield "value", f"the value loss exploded to {value:.2g} (its first: {value0:.2g})", self.fix
        ent, ent0 = row.get("ppo/policy/entropy"), first.get("ppo/policy/entropy")
        if ent is not None and ent0 is not None:
            if ent < ENTROPY_FLOOR and ent0 >= 10 * ENTROPY_FLOOR:
                text = f"the policy's entropy collapsed to {ent:.2g} nats per token (from {ent0:.2g})"
                yield "collapse", text, f"{self.fix}; or raise kl_coef"
            if ent >= NEAR_UNIFORM * uniform and ent0 <= 0.5 * uniform:
                text = (
                    f"the policy's entropy rose to {ent:.4g} nats per token (from {ent0:.2g}; a uniform guess over "
                    f"{self.vocab} tokens: {uniform:.4g}): it samples random tokens"
                )
                yield "uniform", text, self.fix
        length, length0 = row.get("ppo/response/length", 2.0), first.get("ppo/response/length", 2.0)
        if length <= 1.0 and length0 > 1.5:  # a length counts the EOS: 1 is an empty answer
            text = f"every answer is empty (from {length0:.3g} tokens on average)"
            fix = f"{self.fix}; or raise kl_coef, and check that the reward does not favour empty answers"
            yield "empty", text, fix


# ------------------------------------------------------------------------------------------------ the last good weights
class LastGood:
    """Copies of the trainable weights at the last two accepted steps, the newest last. Small sets (LoRA) stay on
    their device; large ones (full fine-tuning) live on the CPU."""

    def __init__(self, params: Sequence[torch.Tensor], step: int):
        self.params = [_local(p.detach()) for p in params]  # this process's shard where the weights are sharded
        size = sum(p.numel() * p.element_size() for p in self.params)
        self.device = None if size <= SMALL_SNAPSHOT else torch.device("cpu")
        self.kept: list[tuple[int, list[torch.Tensor]]] = []
        self.save(step)

    def save(self, step: int) -> None:
        spare = self.kept.pop(0)[1] if len(self.kept) == 2 else None
        copies = spare or [self._empty(p) for p in self.params]
        with torch.no_grad():
            for copy, p in zip(copies, self.params):
                copy.copy_(p.detach(), non_blocking=True)
        self.kept.append((step, copies))

    def restore(self, older: bool) -> int:
        """Puts back the older (or the newest) copy; returns its step."""
        step, copies = self.kept[0] if older else self.kept[-1]
        with torch.no_grad():
            for p, copy in zip(self.params, copies):
                p.copy_(copy)
        self.kept = [(step, copies)]
        return step

    def _empty(self, p: torch.Tensor) -> torch.Tensor:
        if self.device is None:
            return torch.empty_like(p, memory_format=torch.preserve_format)
        pin = p.device.type == "cuda"
        return torch.empty(p.shape, dtype=p.dtype, device=self.device, pin_memory=pin)


def first_bad(tensors: Sequence[torch.Tensor]) -> float | None:
    """nan or inf when some value of `tensors` is not finite (nan first), else None."""
    local = [_local(t.detach()) for t in tensors]
    local = [t for t in local if t.numel()]  # ZeRO-3 keeps empty placeholders
    if not local:
        return None
    peak = float(torch.nn.utils.get_total_norm(local, norm_type=math.inf))
    return None if math.isfinite(peak) else peak


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this process's shard, same storage


@dataclass
class Watch:
    """One run's divergence watch: `check` after each step's metrics, `weights_ok` after each update, `halt` for a
    stop found elsewhere (a NaN reward, non-finite sampling probabilities). `emit` and `stop` are the run's;
    `noun` names what the result keeps ("weights", "policy")."""

    rules: Rules
    good: LastGood
    emit: Callable[..., None]
    stop: Any
    enabled: bool = True  # stop_on_divergence
    noun: str = "weights"
    agree: Callable[[bool], bool] = bool  # True on every process when it is on one (see ranks.any_rank)
    said: list[str] = field(default_factory=list)
    kept: int | None = None  # after a divergence stop: the step whose weights the result has

    def check(self, step: int, row: dict[str, float]) -> bool:
        """True when the run must stop (the last good weights are back); else the step's weights are kept."""
        alarm = self.rules.check(step, row)
        if alarm is not None and (self.enabled or not alarm.finite):
            return self.halt(alarm)
        if alarm is not None:
            self.say(step, alarm.warning(), stopped=False)
        self.good.save(step)
        return False

    def weights_ok(self, step: int) -> bool:
        """After an update: False (the weights of the step before are back, the run stops) when one is not finite."""
        bad = first_bad(self.good.params)
        if not self.agree(bad is not None):  # every process stops together, or DDP would wait forever
            return True
        self.diverged(step, "the weights", "non-finite elsewhere" if bad is None else bad, older=False)
        return False

    def diverged(self, step: int, what: str, value: Any, *, older: bool = True) -> None:
        """`what` became `value` (nan, inf): stop with the weights of the step before, or with `older` the step
        before that (the weights of the step before gave the value)."""
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        text = f"training diverged at step {step}: {what} became {shown}"
        self.halt(Alarm(step, text, self.rules.fix, finite=False, older=older))

    def halt(self, alarm: Alarm) -> bool:
        """Put the last good weights back and stop the run with the alarm's line."""
        self.kept = self.good.restore(alarm.older)
        self.stopped(alarm.step, alarm.stopped(self.kept, self.noun))
        return True

    def stopped(self, step: int, line: str) -> None:
        """Stop the run with `line` (the weights stay as they are)."""
        self.stop.request(line, replace=True)
        self.say(step, line, stopped=True)

    def say(self, step: int, line: str, *, stopped: bool) -> None:
        """The 'alarm' event: the live view turns red and shows `line`."""
        self.said.append(line)
        self.emit("alarm", step, payload={"message": line, "stopped": stopped})

    def summary(self) -> dict[str, Any]:
        return {"divergence": self.said[0]} if self.said else {}


def watch(
    params: Sequence[torch.Tensor], rules: Rules, *, emit: Any, stop: Any, cfg: Any, acc: Any, step: int = 0
) -> Watch:
    """A Watch over `params` from `step`, stopping as `cfg.stop_on_divergence` says; `acc`: the accelerator whose
    processes decide together."""
    from .ranks import any_rank

    enabled = bool(getattr(cfg, "stop_on_divergence", True))
    noun = "policy" if rules.stage == "ppo" else "weights"
    return Watch(rules, LastGood(params, step), emit, stop, enabled, noun, agree=functools.partial(any_rank, acc))


def vocab_size(model: Any) -> int:
    """The width of the model's logits."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    width = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else 0  # not a ZeRO-3 placeholder
    return width or int(model.config.vocab_size)


# ------------------------------------------------------------------------------------------------ sampling
@contextmanager
def finite_logits(model: Any, temperature: float) -> Iterator[None]:
    """Inside, every next-token distribution the LM head gives (logits / temperature) must be finite, or
    NonFiniteError is raised before a token is drawn from it (torch.multinomial would raise on a CPU, and on a GPU
    assert in the device's code)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return
    scale = 1.0 / temperature if temperature > 0 else 1.0

    def check(module: Any, inputs: Any, output: torch.Tensor) -> None:
        last = output[:, -1].detach().float() * scale
        if not bool(torch.isfinite(last).all()):
            raise_non_finite(last)

    hook = head.register_forward_hook(check)
    try:
        yield
    finally:
        hook.remove()


def raise_non_finite(probs: torch.Tensor) -> None:
    bad = "nan" if bool(torch.isnan(probs).any()) else "inf"
    message = f"the model's next-token probabilities are {bad}: its weights diverged (train again with a lower lr)"
    raise NonFiniteError(message, bad)
