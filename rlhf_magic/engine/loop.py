"""The shared supervised loop (SFT, reward): accelerate-prepared module, AdamW, linear schedule, step events.

Like minGPT's `Trainer.run`: a small loop that reports through callbacks. A module's forward returns a loss, or
(loss, {metric: tensor}) for extra per-batch metrics such as accuracy.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..events import Emitter, StopControl
from . import fastpath
from .runtime import Runtime


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
        """`cfg`: the stage's settings (grad_accum, seed, batch_size, epochs, max_steps)."""
        acc = runtime.accelerator(cfg.grad_accum)
        gen = torch.Generator().manual_seed(cfg.seed)
        loader = DataLoader(list(dataset), batch_size=cfg.batch_size, shuffle=True, collate_fn=collate, generator=gen)
        per_epoch = max(1, math.ceil(len(loader) / acc.num_processes / cfg.grad_accum))
        total = cfg.max_steps or max(1, math.ceil(per_epoch * cfg.epochs))
        opt = make_optimizer(params, lr, runtime.device)
        sched = linear_schedule(opt, total)
        with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
            warnings.simplefilter("ignore", FutureWarning)
            module, opt, loader, sched = acc.prepare(module, opt, loader, sched)
        return cls(acc, module, opt, sched, loader, params, total, runtime.device)

    def close(self) -> None:
        self.accelerator.free_memory()


def run_steps(
    state: TrainState,
    emit: Emitter,
    stop: StopControl,
    metrics: Any,
    evaluate: Callable[[], dict[str, float]] | None,
    tokens_of: Callable[[Any], int],
) -> None:
    """Train until total_steps or a stop request; emit 'step' and 'eval' events."""
    acc = state.accelerator
    eval_every = max(1, math.ceil(state.total_steps / 6))  # about six held-out points a run: evals cost forwards
    sums: dict[str, torch.Tensor] = {}
    micro, tokens, t0 = 0, 0, time.monotonic()
    with fastpath.lean_layers():
        while state.step < state.total_steps and not stop.requested:
            for batch in state.loader:
                with acc.accumulate(state.module):
                    loss, extra = _split(state.module(**batch))
                    acc.backward(loss)
                    for k, v in {"train/loss": loss, **extra}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    micro, tokens = micro + 1, tokens + tokens_of(batch)
                    grad_norm = None
                    if acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(state.params, state.max_grad_norm)
                        if not torch.isfinite(grad_norm):
                            state.optimizer.zero_grad(set_to_none=True)
                            stop.request(
                                f"the gradients became {float(grad_norm)} at step {state.step + 1}; the "
                                f"result keeps the weights of step {state.step} (try a lower lr)"
                            )
                            return
                    state.optimizer.step()
                    state.scheduler.step()
                    state.optimizer.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                state.step += 1
                if acc.num_processes > 1:  # log the mean over processes, not the main process's share
                    sums = {k: acc.reduce(v, "mean") for k, v in sums.items()}
                row = {k: float(v) / micro for k, v in sums.items()}
                dt = time.monotonic() - t0
                row.update(
                    {
                        "train/lr": state.scheduler.get_last_lr()[0],
                        "train/tokens_per_s": tokens / dt,
                        "train/grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
                    }
                )
                if evaluate and (state.step % eval_every == 0 or state.step == state.total_steps):
                    row.update(evaluate())
                metrics.log(state.step, row)
                emit("step", state.step, row)
                sums, micro, tokens, t0 = {}, 0, 0, time.monotonic()
                if state.step >= state.total_steps or stop.requested:
                    break


def _split(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, tuple):
        return out[0], dict(out[1])
    return out, {}
