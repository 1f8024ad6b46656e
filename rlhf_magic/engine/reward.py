"""Reward-model training from K-way rankings, as numbered steps (InstructGPT: K answers, one forward pass)."""

from __future__ import annotations

import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import ops
from ..config import RewardConfig
from ..errors import DataError
from ..events import Callback, Emitter, StopControl
from .adapters import add_adapter, train_only, use_adapter
from .handles import PolicyHandle
from .loop import TrainState, run_steps
from .reward_model import RankingLoss, RewardHandle, answer_ids, make_head, right_pad
from .runtime import Runtime, seed_everything
from .sft import resolve_start

NORMALIZE_PROMPTS = 16
SHOWN = 3


@dataclass
class Item:
    """One ranked prompt, tokenized: K rows (prompt + answer + EOS) and the rank groups."""

    prompt: str
    responses: list[str]
    rows: list[list[int]]
    groups: list[list[int]]


def train_reward(
    cfg: RewardConfig, name: str, runtime: Runtime, callbacks: Sequence[Callback] = (), stop: StopControl | None = None
) -> RewardHandle:
    stop = stop or StopControl()
    emit = Emitter("reward", callbacks)
    seed_everything(cfg.seed)
    # 1. the backbone: the SFT weights (a new adapter copied from the SFT adapter, or a private full copy)
    lm, init_from, parents = resolve_start(cfg, runtime)
    # 2. rankings -> tokenized items -> train / held-out split by prompt
    train, evals = split(load_items(cfg.data, lm.tokenizer, cfg.max_length), cfg.eval_fraction, cfg.seed)
    # 3. trainables: the adapter (or every backbone weight) and a fresh scalar head
    adapter = add_adapter(lm, f"{name}-rm", cfg.lora, init_from=init_from) if cfg.lora else None
    head = make_head(lm.model.config.hidden_size, runtime.device)
    handle = RewardHandle(name, lm, adapter, head, cfg, (*parents, *_data_parent(cfg.data)), runtime, cfg.max_length)
    params = handle.trainable_parameters()
    train_only(lm.model, params)
    # 4. optimizer, schedule, accelerate; each batch holds `batch_size` prompts with all their answers
    lr = cfg.lr or (1e-4 if cfg.lora else 1e-5)
    pad = lm.tokenizer.pad_token_id
    state = TrainState.build(
        runtime,
        RankingLoss(lm.model, head, cfg.margin),
        params,
        lr,
        cfg.grad_accum,
        cfg.seed,
        train,
        cfg.batch_size,
        lambda b: collate(b, pad),
        cfg.epochs,
        cfg.max_steps,
    )
    emit.total = state.total_steps
    emit("start", payload={"config": cfg, "train": len(train), "eval": len(evals), "handle": handle})
    # 5. the loop, with held-out accuracy every ~10% of the steps
    evaluate = (lambda: evaluate_items(handle, evals, cfg.batch_size, cfg.margin)) if evals else None
    lm.model.train()
    try:
        with stop.catch_interrupt(), use_adapter(lm, adapter):
            run_steps(state, emit, stop, handle.metrics, evaluate, tokens_of=lambda b: int(b["attention_mask"].sum()))
    finally:
        lm.model.eval()
        train_only(lm.model, [])
        state.close()
    # 6. normalise on answers sampled from the SFT policy, then show what the model learned
    if cfg.normalize:
        normalize(handle, cfg, [it.prompt for it in train], emit)
    report(handle, evals or train, cfg.batch_size, emit)
    handle.metrics.summary.update(_summary(handle, state, stop))
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir)
    return handle


def to_preferences(data: Any) -> Any:
    from ..preferences import Preferences

    data = getattr(data, "preferences", data)  # a RankingPanel hands over what was labelled
    if isinstance(data, (str, Path)) and str(data).endswith(".jsonl"):
        return Preferences.load(data)
    return Preferences.from_records(data)


def load_items(data: Any, tokenizer: Any, max_length: int) -> list[Item]:
    """Every ranked prompt with at least one comparison (all-tied rankings teach nothing and are skipped)."""
    items = [
        Item(
            r.prompt,
            list(r.responses),
            [answer_ids(tokenizer, r.prompt, a, max_length) for a in r.responses],
            [list(g) for g in r.groups],
        )
        for r in to_preferences(data).ranked()
        if len(r.groups) > 1
    ]
    if not items:
        raise DataError("the preferences have no comparison to learn from (every ranking is a single tie)")
    return items


def split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out whole prompts (every answer of a prompt lands on the same side)."""
    prompts = sorted({it.prompt for it in items})
    random.Random(seed).shuffle(prompts)
    n_eval = round(fraction * len(prompts)) if len(prompts) >= 4 else 0
    held = set(prompts[:n_eval])
    return [it for it in items if it.prompt not in held], [it for it in items if it.prompt in held]


def collate(items: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """All answers of the batch's prompts as rows, plus the (winner, loser, weight) pairs over those rows."""
    ids, mask = right_pad([row for it in items for row in it.rows], pad_id)
    pairs = ops.ranking_pairs([it.groups for it in items], sizes=[len(it.rows) for it in items])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "winners": pairs.winners,
        "losers": pairs.losers,
        "weights": pairs.weights,
    }


@torch.no_grad()
def item_scores(handle: RewardHandle, items: list[Item], batch_size: int) -> list[torch.Tensor]:
    """Raw scores of every answer, one tensor per item."""
    out: list[torch.Tensor] = []
    pad, device = handle.lm.tokenizer.pad_token_id, handle.runtime.device
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids, mask = right_pad([row for it in chunk for row in it.rows], pad)
        scores = handle.raw_scores(ids.to(device), mask.to(device)).cpu()
        out += list(torch.split(scores, [len(it.rows) for it in chunk]))
    return out


def evaluate_items(handle: RewardHandle, items: list[Item], batch_size: int, margin: float) -> dict[str, float]:
    was_training = handle.lm.model.training
    handle.lm.model.eval()
    try:
        scores = torch.cat(item_scores(handle, items, batch_size))
    finally:
        handle.lm.model.train(was_training)
    pairs = ops.ranking_pairs([it.groups for it in items], sizes=[len(it.rows) for it in items])
    return {
        "eval/loss": float(ops.pairwise_ranking_loss(scores, *pairs, margin=margin)),
        "eval/accuracy": float(ops.pairwise_accuracy(scores, *pairs)),
    }


def normalize(handle: RewardHandle, cfg: RewardConfig, prompts: list[str], emit: Emitter) -> None:
    """Shift (and with 'gain', scale) scores so answers sampled from the SFT policy score mean 0 (std 1)."""
    src = (
        cfg.model
        if isinstance(cfg.model, PolicyHandle)
        else PolicyHandle("base", "base", handle.lm, None, None, (), handle.runtime)
    )
    chosen = sorted(set(prompts))[:NORMALIZE_PROMPTS]
    answers = src.generate(chosen, max_new_tokens=48, temperature=0.7, seed=cfg.seed)
    handle.mean, handle.gain = 0.0, 1.0
    raw = handle.score(chosen, answers)
    handle.mean = statistics.fmean(raw)
    if cfg.normalize == "gain" and len(raw) > 1:
        handle.gain = 1.0 / max(statistics.stdev(raw), 1e-6)
    handle.metrics.summary.update({"norm/mean": handle.mean, "norm/gain": handle.gain, "norm/samples": len(raw)})


def report(handle: RewardHandle, items: list[Item], batch_size: int, emit: Emitter) -> None:
    """A histogram of chosen vs rejected scores, and the most and least preferred answers."""
    scores = [(s - handle.mean) * handle.gain for s in item_scores(handle, items, batch_size)]
    chosen, rejected = [], []
    for it, s in zip(items, scores):
        for gi, better in enumerate(it.groups):
            for worse in it.groups[gi + 1 :]:
                chosen += [float(s[b]) for b in better for _ in worse]
                rejected += [float(s[w]) for _ in better for w in worse]
    emit(
        "histogram",
        payload={
            "title": "scores of chosen vs rejected answers",
            "xlabel": "reward",
            "series": {"chosen": chosen, "rejected": rejected},
        },
    )
    flat = sorted(
        ((float(s[i]), it.prompt, a) for it, s in zip(items, scores) for i, a in enumerate(it.responses)),
        key=lambda t: t[0],
    )
    rows = [
        {"rank": f"top {k + 1}", "score": sc, "prompt": p, "answer": a}
        for k, (sc, p, a) in enumerate(reversed(flat[-SHOWN:]))
    ]
    rows += [
        {"rank": f"bottom {k + 1}", "score": sc, "prompt": p, "answer": a} for k, (sc, p, a) in enumerate(flat[:SHOWN])
    ]
    emit("samples", payload={"title": "most and least preferred answers", "rows": rows})


def _data_parent(data: Any) -> tuple[str, ...]:
    if isinstance(data, (str, Path)):
        return (str(data),)
    src = getattr(data, "source", None) or getattr(getattr(data, "preferences", None), "source", None)
    return (str(src),) if src else ("preferences",)


def _summary(handle: RewardHandle, state: TrainState, stop: StopControl) -> dict[str, Any]:
    m = handle.metrics
    out: dict[str, Any] = {
        "steps": state.step,
        "train/loss": m.last("train/loss"),
        "train/accuracy": m.last("train/accuracy"),
    }
    if m.last("eval/accuracy") is not None:
        out["eval/accuracy"] = m.last("eval/accuracy")
    if stop.requested:
        out["stopped"] = stop.reason
    return out
