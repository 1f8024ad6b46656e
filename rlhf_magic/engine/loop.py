"""The shared supervised loop (SFT, reward): accelerate-prepared module, AdamW, linear schedule, step events.

Like minGPT's `Trainer.run`: a small loop that reports through callbacks. A module's forward returns a loss, or
(loss, {metric: tensor}) for extra per-batch metrics such as accuracy.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..errors import ConfigError
from ..events import Emitter, StopControl
from . import fastpath, ranks, sharding
from .divergence import Watch
from .patching import patched
from .runtime import Runtime

# Optimizer steps skipped in a row (non-finite gradients) before a run stops. Under fp16 each skip halves the loss
# scale: 10 take torch's initial 2**16 down to 64, far below where a healthy run settles.
MAX_SKIPPED_STEPS = 10
_ATTN = "_attn_implementation_internal"  # where a transformers config keeps the attention implementation's name


def make_optimizer(params: list[torch.nn.Parameter], lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; fused where torch supports it (much faster than the default on a CPU)."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            pass
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def linear_schedule(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm up over ~5% of the steps, then decay linearly to 10% of the peak."""
    warm = max(1, round(0.05 * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.1, 1.0 - 0.9 * (step - warm) / max(1, total - warm))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass
class TrainState:
    accelerator: Any
    module: torch.nn.Module
    optimizer: Any
    scheduler: Any
    loader: Any
    params: list[torch.nn.Parameter]
    total_steps: int
    device: torch.device
    max_grad_norm: float = 1.0
    step: int = 0
    started: float = field(default_factory=time.monotonic)
    gradient_checkpointing: bool = False
    skipped: int = 0  # optimizer steps skipped in a row
    watch: Watch | None = None  # divergence: set by the stage before run_steps

    @classmethod
    def build(
        cls,
        runtime: Runtime,
        module: torch.nn.Module,
        params: list[torch.nn.Parameter],
        *,
        cfg: Any,
        lr: float,
        dataset: Sequence[Any],
        collate: Callable,
    ) -> TrainState:
        """`cfg`: the stage's settings (grad_accum, seed, batch_size, epochs, max_steps, gradient_checkpointing)."""
        acc = runtime.accelerator(cfg.grad_accum)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(list(dataset), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
        per_epoch = max(1, math.ceil(len(loader) / acc.num_processes / cfg.grad_accum))
        total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        opt = make_optimizer(params, lr, runtime.device)
        sched = linear_schedule(opt, total)
        with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
            warnings.simplefilter("ignore", FutureWarning)
            module, opt, loader, sched = sharding.prepare(acc, module, opt, loader, sched)
        params = sharding.trained(acc, module, params)  # FSDP2: the sharded parameters get the gradients
        state = cls(acc, module, opt, sched, loader, params, total, runtime.device)
        state.gradient_checkpointing = bool(getattr(cfg, "gradient_checkpointing", False))
        return state

    def close(self) -> None:
        sharding.release(self.accelerator, self.module)  # the handle samples, scores and saves whole weights
        self.accelerator.free_memory()


def run_steps(
    state: TrainState,
    emit: Emitter,
    stop: StopControl,
    metrics: Any,
    evaluate: Callable[[], dict[str, float]] | None,
    tokens_of: Callable[[Any], int],
) -> None:
    """Train until total_steps or a stop request; emit 'step' and 'eval' events. Gradients that are not finite stop
    the run, keeping the weights of the step before (of the step before that where those give a non-finite loss
    too); under fp16 the loss scaler skips such a step and lowers its scale, and only MAX_SKIPPED_STEPS skips in a
    row stop the run. `state.watch` checks the weights after each update and each step's metrics: a divergence
    stops the run with the last good weights (see divergence.py)."""
    acc, watch = state.accelerator, state.watch
    assert watch is not None, "set state.watch before run_steps"
    eval_every = max(1, math.ceil(state.total_steps / 6))  # about six held-out points a run: evals cost forwards
    sums: dict[str, torch.Tensor] = {}
    micro, tokens, t0 = 0, 0, time.monotonic()
    with fastpath.lean_layers(), checkpointing(_hf_model(state.module), state.gradient_checkpointing):
        while state.step < state.total_steps and not stop.requested:
            for batch in state.loader:
                with acc.accumulate(state.module):
                    loss, extra = _split(state.module(**batch))
                    acc.backward(loss)
                    for k, v in {"train/loss": loss, **extra}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    micro, tokens = micro + 1, tokens + tokens_of(batch)
                    grad_norm = optimizer_step(state)
                if not acc.sync_gradients:
                    continue
                if _skipped(state, grad_norm, stop, batch):  # the weights did not move: nothing to report
                    if stop.requested:
                        return
                    sums, micro, tokens, t0 = {}, 0, 0, time.monotonic()
                    continue
                if not watch.weights_ok(state.step + 1):  # a weight became nan or inf: the step before is back
                    return
                state.step += 1
                row = _row(state, sums, micro, tokens / (time.monotonic() - t0), grad_norm)
                if evaluate and (state.step % eval_every == 0 or state.step == state.total_steps):
                    with sharding.whole_weights(acc, state.module):  # each process scores its own share
                        row.update(evaluate())
                metrics.log(state.step, row)
                emit("step", state.step, row)
                if watch.check(state.step, row):  # diverged: the last good weights are back
                    state.step = watch.kept
                    return
                sums, micro, tokens, t0 = {}, 0, 0, time.monotonic()
                if state.step >= state.total_steps or stop.requested:
                    break


def optimizer_step(state: TrainState) -> torch.Tensor | None:
    """Clip, step, schedule and zero the gradients (accelerate acts only at the last micro-batch of an accumulation).
    Under fp16 the loss scaler itself skips a step whose gradients overflowed, then lowers its scale; without one, a
    non-finite gradient norm skips the step here. Returns the gradient norm (None between accumulation steps)."""
    acc = state.accelerator
    grad_norm = acc.clip_grad_norm_(state.params, state.max_grad_norm) if acc.sync_gradients else None
    finite = grad_norm is None or bool(torch.isfinite(grad_norm))
    if finite or loss_scaler(acc) is not None:
        state.optimizer.step()
    if finite:  # a skipped step leaves the schedule alone too
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def loss_scaler(accelerator: Any) -> Any:
    """The accelerator's GradScaler (fp16 mixed precision), else None."""
    return getattr(accelerator, "scaler", None)


def step_skipped(grad_norm: torch.Tensor | None) -> bool:
    """Whether the optimizer step left the weights alone: its (unscaled) gradients were not finite. Under fp16 that
    is the scaler's own test; accelerate's `step_was_skipped` cannot tell, as a fused optimizer skips the update
    inside its step. No norm (DeepSpeed clips and steps inside its engine): not skipped here."""
    return grad_norm is not None and not bool(torch.isfinite(grad_norm))


def skip_reason(accelerator: Any, count: int, kept: str) -> str:
    """Why a run stops after `count` skipped optimizer steps in a row; `kept`: which weights the result has."""
    scaler = loss_scaler(accelerator)
    if scaler is None:
        what, advice = "were not finite", "try a lower lr"
    else:
        what, advice = f"overflowed fp16 (loss scale now {scaler.get_scale():g})", "try a lower lr, or bf16 / fp32"
    return f"the gradients {what} in {count} optimizer steps in a row; the result keeps {kept} ({advice})"


def _skipped(state: TrainState, grad_norm: torch.Tensor | None, stop: StopControl, batch: Any) -> bool:
    """Whether this optimizer step was skipped; requests the stop that follows: at once without a loss scaler (going
    back one more step where the weights give a non-finite loss on this batch too), after MAX_SKIPPED_STEPS in a
    row with one."""
    acc, watch, step = state.accelerator, state.watch, state.step + 1
    skipped = grad_norm is not None and step_skipped(grad_norm)
    state.skipped = state.skipped + 1 if skipped else 0
    loss = _loss_on(state, batch) if skipped and loss_scaler(acc) is None else 0.0
    if not math.isfinite(loss):  # the weights of the step before gave it: back one more step
        watch.diverged(step, "the loss", loss)
        state.step = watch.kept
    elif skipped and loss_scaler(acc) is None:
        reason = f"the gradients became {float(grad_norm)} at step {step}; the result keeps the weights of step "
        watch.stopped(step, f"{reason}{state.step} (try a lower lr)")
    elif state.skipped >= MAX_SKIPPED_STEPS:
        watch.stopped(step, skip_reason(acc, state.skipped, f"the weights of step {state.step}"))
    return skipped


def _loss_on(state: TrainState, batch: Any) -> float:
    """The loss the weights give on `batch` (nan where another process's is not finite): after a one-off non-finite
    gradient it is finite, and the run keeps these weights; weights that diverged give nan or inf."""
    module = state.accelerator.unwrap_model(state.module)
    with torch.no_grad():
        loss = float(_split(module(**batch))[0])
    elsewhere = ranks.any_rank(state.accelerator, not math.isfinite(loss))
    return math.nan if elsewhere and math.isfinite(loss) else loss


def _row(
    state: TrainState, sums: dict[str, torch.Tensor], micro: int, tokens_per_s: float, grad_norm: Any
) -> dict[str, float]:
    acc = state.accelerator
    if acc.num_processes > 1:  # log the mean over processes, not the main process's share; the job's throughput
        sums = {k: acc.reduce(v, "mean") for k, v in sums.items()}
        rate = torch.tensor(tokens_per_s, dtype=torch.float64, device=acc.device)
        tokens_per_s = float(acc.reduce(rate, "sum"))
    row = {k: float(v) / micro for k, v in sums.items()}
    row.update(
        {
            "train/lr": state.scheduler.get_last_lr()[0],
            "train/tokens_per_s": tokens_per_s,
            "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
        }
    )
    return row


def _split(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}


# ------------------------------------------------------------------------------------------------ checkpointing
@contextlib.contextmanager
def checkpointing(model: Any, enabled: bool) -> Iterator[None]:
    """Inside, when `enabled`, the HF model's decoder layers checkpoint their activations (recomputed in backward, not
    kept) in every forward that records gradients, through transformers' own gradient checkpointing. A layer
    checkpoints only while its own `training` flag is set: the flag of each layer (not of its children, whose dropout
    stays as the mode says) is raised for such forwards, so a stage that trains in eval mode (reward) checkpoints
    too; the recompute sees the same flags. Afterwards every flag and setting is as before: generation and the
    other stages do not checkpoint."""
    if not enabled:
        yield
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if model is not None else []
    if not layers or not getattr(model, "supports_gradient_checkpointing", False):
        name = type(model).__name__
        raise ConfigError(f"gradient_checkpointing = True: {name} does not support it; set it to False")
    kept = [(m, m.gradient_checkpointing, vars(m).get("_gradient_checkpointing_func")) for m in _flagged(model)]
    modes = [layer.training for layer in layers]
    had_hooks = bool(getattr(model, "_require_grads_hooks", None))
    configs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")}
    kwargs = {"use_reentrant": False, "context_fn": functools.partial(_recompute_as_forward, list(configs.values()))}
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(kwargs)
    if not had_hooks:  # inputs that require grad are for reentrant checkpointing only; they cost backward passes
        model.disable_input_require_grads()  # through the frozen layers below the lowest adapter
    hooks = [layer.register_forward_pre_hook(_raise_training_flag) for layer in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for layer, mode in zip(layers, modes):
            layer.training = mode
        for m, on, func in kept:
            m.gradient_checkpointing = on
            if func is None:
                vars(m).pop("_gradient_checkpointing_func", None)
            else:
                m._gradient_checkpointing_func = func


def _flagged(model: Any) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]


def _raise_training_flag(layer: torch.nn.Module, args: Any) -> None:
    if torch.is_grad_enabled():
        layer.training = True


def _recompute_as_forward(configs: list[Any]) -> tuple[Any, Any]:
    """torch checkpoint's `context_fn`, called at each layer's forward: the recompute in backward runs under the
    attention implementation that this forward saw (the fast path's packed rows switch it for their forward only)."""
    seen = [(c, getattr(c, _ATTN, None)) for c in configs]
    return contextlib.nullcontext(), _attention_as(seen)


@contextlib.contextmanager
def _attention_as(seen: list[tuple[Any, Any]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for config, name in seen:
            if getattr(config, _ATTN, None) != name:
                stack.enter_context(patched(config, _ATTN, name))
        yield


def _hf_model(module: torch.nn.Module) -> Any:
    """The transformers model inside a (prepared) training module."""
    found = (m for m in module.modules() if hasattr(m, "supports_gradient_checkpointing"))
    return next(found, None)
