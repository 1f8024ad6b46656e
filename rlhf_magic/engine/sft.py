"""Supervised fine-tuning, as numbered steps: model, data, trainables, optimizer, loop, result."""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..config import SFTConfig
from ..data import sft_chats
from ..errors import DataError
from ..events import Callback, Emitter, StopControl
from . import divergence
from .adapters import adapter_parameters, add_adapter, train_only, use_adapter
from .handles import PolicyHandle
from .loop import TrainState, run_steps
from .models import LoadedModel
from .modules import TokenLoss
from .runtime import Runtime, in_runtime_scope, seed_everything
from .text import IGNORE, Example, encode_chat

N_SAMPLES = 2


@in_runtime_scope
def train_sft(
    cfg: SFTConfig, name: str, runtime: Runtime, callbacks: Sequence[Callback] = (), stop: StopControl | None = None
) -> PolicyHandle:
    stop = stop or StopControl()
    emit = Emitter("sft", callbacks)
    seed_everything(cfg.seed)
    # 1. the model to start from, and where the trained weights will live
    lm, init_from, parents = resolve_start(cfg, runtime)
    # 2. data: chats -> tokens with response-only labels -> train / eval split
    train, evals, sample_prompts = prepare_data(cfg, lm)
    # 3. trainable weights: a new LoRA adapter on the shared base, or every weight of a private copy
    adapter = add_adapter(lm, name, cfg.lora, init_from=init_from) if cfg.lora else None
    params = adapter_parameters(lm, adapter) if adapter else list(lm.model.parameters())
    train_only(lm.model, params)
    handle = PolicyHandle(name, "sft", lm, runtime=runtime, adapter=adapter, config=cfg, parents=parents)
    before = handle.generate(sample_prompts, max_new_tokens=48) if sample_prompts else []
    # 4. optimizer, schedule and accelerate
    default_lr = 2e-4 if cfg.lora else 2e-5
    lr = cfg.lr or default_lr
    collate_fn = functools.partial(collate, pad_id=lm.tokenizer.pad_token_id)
    state = TrainState.build(runtime, TokenLoss(lm.model), params, cfg=cfg, lr=lr, dataset=train, collate=collate_fn)
    rules = divergence.Rules("sft", divergence.vocab_size(lm.model), divergence.lr_fix(lr, default_lr))
    state.watch = divergence.watch(state.params, rules, emit=emit, stop=stop, cfg=cfg, acc=state.accelerator)
    emit.total = state.total_steps
    emit("start", payload={"config": cfg, "train": len(train), "eval": len(evals), "handle": handle})
    # 5. the loop: one event per optimizer step, eval every ~10% and at the end
    evaluate = _evaluator(state, evals, cfg.batch_size, lm.tokenizer.pad_token_id) if evals else None
    lm.model.train()
    try:
        with stop.catch_interrupt(), use_adapter(lm, adapter):
            run_steps(state, emit, stop, handle.metrics, evaluate, tokens_of=_n_tokens)
    finally:
        lm.model.eval()
        train_only(lm.model, [])
        state.close()
    # 6. the result: before/after samples, summary, optional save
    try:
        after = handle.generate(sample_prompts, max_new_tokens=48) if sample_prompts else []
    except KeyboardInterrupt:  # an interrupt after the loop skips the samples, never the trained result
        after = []
    if before and after:
        emit(
            "samples",
            payload={
                "title": "before / after SFT",
                "rows": [{"prompt": p, "before": b, "after": a} for p, b, a in zip(sample_prompts, before, after)],
            },
        )
    handle.metrics.summary.update({**_summary(handle, state, stop), **state.watch.summary()})
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir, overwrite=True)  # a re-run of the stage replaces its own output
    return handle


def resolve_start(cfg: Any, runtime: Runtime) -> tuple[LoadedModel, str | None, tuple[str, ...]]:
    """(model to train on, adapter to copy first, parents). Full fine-tuning gets a private copy (fp32 master weights);
    a model named by a string is refused before loading when the stage cannot fit in memory, one in memory (a
    handle, a cached model) before training starts."""
    from .memory import Workload, check_training

    src, revision = cfg.model, getattr(cfg, "revision", None)
    if isinstance(src, PolicyHandle):
        if revision is not None:
            from ..errors import ConfigError

            raise ConfigError(f"revision = {revision!r} applies to a hub model id, not to the policy {src.name!r}")
        check_training(cfg, src.lm.model, runtime, label=f"model = {src.name!r}", copy=not cfg.lora)
        if not cfg.lora:
            import copy

            from .adapters import merged_copy

            lm = src.lm  # full fine-tuning from a LoRA result starts from its merged weights
            model = merged_copy(lm, src.adapter) if src.adapter else copy.deepcopy(lm.model)
            private = LoadedModel(lm.spec, model.to(runtime.weight_dtype(master=True)), lm.tokenizer, lm.source)
            return private, None, (src.name,)
        return src.lm, src.adapter, (src.name,)
    if not isinstance(src, str):
        raise DataError(f"model = {src!r} is not valid; expected a model name, a checkpoint path or a policy handle")
    kw = {"revision": revision, "workload": Workload.of(cfg)}
    lm = runtime.load(src, **kw) if cfg.lora else runtime.load_fresh(src, **kw)
    check_training(cfg, lm.model, runtime, label=f"model = {src!r}")  # a cached model skipped the check at load
    return lm, None, (src,)


def prepare_data(cfg: Any, lm: LoadedModel) -> tuple[list[Example], list[Example], list[str]]:
    chats = sft_chats(cfg.data)
    examples = [encode_chat(lm.tokenizer, c, cfg.max_length) for c in chats]
    kept = [(c, e) for c, e in zip(chats, examples) if any(t != IGNORE for t in e.labels[1:])]
    if not kept:
        raise DataError(f"no example has answer tokens within max_length = {cfg.max_length}; raise max_length")
    order = list(range(len(kept)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = round(cfg.eval_fraction * len(kept)) if len(kept) >= 4 else 0
    ev, tr = order[:n_eval], order[n_eval:]
    prompt_src = ev or tr
    prompts = [_last_user(kept[i][0]) for i in prompt_src[:N_SAMPLES]]
    return [kept[i][1] for i in tr], [kept[i][1] for i in ev], [p for p in prompts if p]


def _last_user(chat: list[dict[str, str]]) -> str:
    users = [m["content"] for m in chat if m["role"] == "user"]
    return users[-1] if users else ""


def collate(batch: list[Example], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ids, mask and labels (IGNORE on padding)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _n_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["attention_mask"].sum())


def _evaluator(state: TrainState, evals: list[Example], batch_size: int, pad: int) -> Any:
    """The eval loss per answer token. With several processes each scores its own share of `evals` (on the module
    without its DDP wrapper: shares may differ in batches, and no pass may wait for the other processes) and the
    token-weighted sums are added up across processes: the same value as one process on all of them."""
    acc = state.accelerator
    rank, n_proc = acc.process_index, acc.num_processes
    share = evals[rank::n_proc]

    def evaluate() -> dict[str, float]:
        module = state.module if n_proc == 1 else acc.unwrap_model(state.module)
        module.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(share), batch_size):
                batch = {k: v.to(state.device) for k, v in collate(share[i : i + batch_size], pad).items()}
                k = int((batch["labels"][:, 1:] != IGNORE).sum())
                total += float(module(**batch)) * k
                n += k
        module.train()
        if n_proc > 1:
            sums = acc.reduce(torch.tensor([total, n], dtype=torch.float64, device=acc.device), "sum")
            total, n = float(sums[0]), int(sums[1])
        return {"eval/loss": total / max(n, 1)}

    return evaluate


def _summary(handle: PolicyHandle, state: TrainState, stop: StopControl) -> dict[str, Any]:
    m = handle.metrics
    out: dict[str, Any] = {"steps": state.step, "train/loss": m.last("train/loss", math.nan)}
    if m.last("eval/loss") is not None:
        out["eval/loss"] = m.last("eval/loss")
    out["seconds"] = round(time.monotonic() - state.started, 1)
    if stop.requested:
        out["stopped"] = stop.reason
    return out
