"""DPO on K-way rankings, as numbered steps: the rankings train the policy directly (no reward model, no sampling).

Roles on one base model, as in PPO: the trained policy is a new LoRA adapter stacked on the policy's own adapter(s)
(a no-op at first, so the policy equals its reference at step 0), and the reference is the policy's own adapter(s)
(adapters off for a base model): no second copy of the model. `lora = False` trains a private full copy (a second
model) while the reference stays on the shared weights. A separate `reference` policy with the same tokenizer is
allowed too. Each answer's reference log-prob is computed once, before training, and reused every epoch.

A ranking of K answers is K rows of one forward pass: 'sigmoid' and 'ipo' form all C(K, 2) pair terms from those K
log-probs, 'plackett_luce' the listwise terms (ops_pref.py). Training runs in eval mode (no dropout), so the policy's
log-probs are comparable with the reference's.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .. import ops, ops_pref
from ..config import DPOConfig
from ..errors import ConfigError, DataError
from ..events import Callback, Emitter, StopControl
from . import divergence, memory
from .adapters import Adapters, adapter_parameters, add_adapter, merged_copy, train_only, use_adapter
from .generation import encode_prompts, left_pad
from .handles import PolicyHandle
from .loop import TrainState, run_steps
from .models import LoadedModel
from .modules import OverModel, response_logprobs
from .reward import data_source, drop_flagged, same_tokenizer, split, to_preferences
from .reward_model import right_pad
from .runtime import Runtime, in_runtime_scope, seed_everything
from .text import encode

REPORT_MAX = 128  # with nothing held out, the closing report measures a sample of this many training prompts


@dataclass
class Ranking:
    """One ranked prompt, tokenized: its prompt once, each answer + EOS, the rank groups, and (set once, before
    training) each answer's summed reference log-prob."""

    prompt: str
    responses: list[str]
    query: list[int]
    answers: list[list[int]]
    groups: list[list[int]]
    ref: list[float] = field(default_factory=list)


class DPOHandle(PolicyHandle):
    """A DPO policy: a policy handle whose trained weights are its new adapter (or its full copy)."""

    def __init__(self, name: str, lm: LoadedModel, *, trained: list[torch.nn.Parameter], **handle: Any):
        super().__init__(name, "dpo", lm, **handle)
        self.trained = trained

    def trainable_parameters(self) -> list[Any]:
        return list(self.trained)


@in_runtime_scope
def train_dpo(
    cfg: DPOConfig, name: str, runtime: Runtime, callbacks: Sequence[Callback] = (), stop: StopControl | None = None
) -> DPOHandle:
    """`cfg.policy` and `cfg.reference` are policy handles here (api.dpo resolves names and folders)."""
    stop = stop or StopControl()
    emit = Emitter("dpo", callbacks)
    seed_everything(cfg.seed)
    # 1. the rankings (checked before any model work), the policy to start from and its reference
    prefs = drop_flagged(to_preferences(cfg.data), cfg.include_flagged, emit)  # says how many flagged it left out
    pol, ref = cfg.policy, cfg.reference or cfg.policy
    check_reference(pol, ref)
    # 2. rankings -> tokenized answers (counting those cut by max_length) -> train / held-out split by prompt
    items, cut = load_rankings(prefs, pol.lm, cfg.max_length, chat=pol.chat)
    train, evals = split(items, cfg.eval_fraction, cfg.seed)
    check_memory(cfg, pol, train, runtime)
    # 3. each answer's reference log-prob, once, in eval mode (each process computes its share), before `prepare`
    #    shards the weights under FSDP2 / ZeRO-3: every process holds them whole here
    acc = runtime.accelerator(cfg.grad_accum)
    set_reference(ref, items, cfg.batch_size, runtime, acc)
    # 4. trainables: a new adapter stacked on the policy's own, or every weight of a private copy
    lm, adapter, params = trainables(cfg, name, pol, runtime)
    parents = (pol.name, data_source(cfg.data, prefs), *((ref.name,) if ref is not pol else ()))
    handle = DPOHandle(
        name, lm, trained=params, runtime=runtime, adapter=adapter, config=cfg, parents=parents, chat=pol.chat
    )
    # 5. optimizer, schedule, accelerate; each batch holds `batch_size` prompts with all their answers
    train_only(lm.model, params)
    default_lr = 1e-4 if cfg.lora else 5e-6
    lr = cfg.lr or default_lr
    loss = PreferenceLoss(lm.model, cfg.beta, cfg.loss)
    pad = lm.tokenizer.pad_token_id
    state = TrainState.build(runtime, loss, params, cfg=cfg, lr=lr, dataset=train, collate=lambda b: collate(b, pad))
    fix, uniform = divergence.lr_fix(lr, default_lr), start_loss(train, cfg)  # uniform: every implicit reward 0
    rules = divergence.Rules("dpo", divergence.vocab_size(lm.model), fix, uniform=uniform)
    state.watch = divergence.watch(state.params, rules, emit=emit, stop=stop, cfg=cfg, acc=state.accelerator)
    emit.total = state.total_steps
    emit("start", payload={"config": cfg, "train": len(train), "eval": len(evals), "handle": handle})
    if cut.count:
        emit("warning", payload=cut.note)
    # 6. the loop, with the held-out implicit-reward metrics about six times a run
    shown = evals or random.Random(cfg.seed).sample(train, min(REPORT_MAX, len(train)))
    measure = Measure(lm, adapter, shown, cfg=cfg, runtime=runtime, acc=state.accelerator)
    lm.model.eval()
    try:
        with stop.catch_interrupt(), use_adapter(lm, adapter):
            run_steps(state, emit, stop, handle.metrics, measure if evals else None, tokens_of=_n_tokens)
    finally:
        train_only(lm.model, [])
        state.close()
    # 7. the implicit rewards of the held-out answers, and the summary
    final = report(measure, state.step, emit, "eval" if evals else "train")
    handle.metrics.summary.update({**_summary(handle, state, stop, final, cut), **state.watch.summary()})
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir, overwrite=True)  # a re-run of the stage replaces its own output
    return handle


def check_reference(pol: PolicyHandle, ref: PolicyHandle) -> None:
    """The reference scores the policy's own token rows, so both need one tokenizer."""
    if ref is pol or same_tokenizer(ref.tokenizer, pol.tokenizer):
        return
    raise ConfigError(
        f"reference = {ref.name}: its tokenizer differs from that of policy {pol.name} ({len(ref.tokenizer)} vs "
        f"{len(pol.tokenizer)} tokens); DPO scores the same tokens under both, so use a reference with the policy's "
        f"tokenizer, or leave reference unset (the policy as it starts)"
    )


class Cut(NamedTuple):
    """How many answers did not fit max_length with their prompt, and the one line that says so."""

    count: int
    note: str


def load_rankings(prefs: Any, lm: LoadedModel, max_length: int, *, chat: bool = True) -> tuple[list[Ranking], Cut]:
    """Every ranked prompt with at least one comparison (all-tied rankings teach nothing and are skipped), and the
    answers that do not fit max_length with their prompt. A long prompt loses its start (down to one token); an
    answer that still does not fit loses its end, EOS included."""
    tok = lm.tokenizer
    items, cut, total, longest = [], 0, 0, 0
    for r in prefs.ranked():
        if len(r.groups) < 2:
            continue
        query = encode_prompts(lm, [r.prompt], max_prompt_tokens=1 << 30, chat=chat)[0] or [tok.eos_token_id]
        answers = [[*encode(tok, a), tok.eos_token_id] for a in r.responses]
        widest = max(map(len, answers))
        query = query[-max(1, max_length - widest) :]
        room = max_length - len(query)
        over = [len(a) for a in answers if len(a) > room]
        cut, total, longest = cut + len(over), total + len(answers), max([longest, *over])
        groups = [list(g) for g in r.groups]
        items.append(Ranking(r.prompt, list(r.responses), query, [a[:room] for a in answers], groups))
    if not items:
        raise DataError("the preferences have no comparison to learn from: every ranking ties all its answers")
    note = (
        f"{cut} of {total} answers do not fit max_length = {max_length} with their prompt and were cut at the end "
        f"(EOS too; the longest has {longest} tokens): raise max_length to train on whole answers"
    )
    return items, Cut(cut, note if cut else "")


def check_memory(cfg: DPOConfig, pol: PolicyHandle, train: list[Ranking], runtime: Runtime) -> None:
    """Refuse, before training, a batch (all K answers of `batch_size` prompts) that cannot fit."""
    rows = cfg.batch_size * max(len(r.answers) for r in train)
    width = max(len(r.query) + max(map(len, r.answers)) for r in train)
    lora = cfg.lora
    work = memory.Workload(
        "lora" if lora else "full",
        rows,
        width,
        lora.r if lora else 0,
        lora.layers if lora else None,
        cfg.gradient_checkpointing,
        logits=False,
    ).under(runtime)
    memory.check_work(work, pol.lm.model, runtime.device, label=f"DPO on {pol.name!r}", copy=not lora)


def trainables(
    cfg: DPOConfig, name: str, pol: PolicyHandle, runtime: Runtime
) -> tuple[LoadedModel, Adapters, list[torch.nn.Parameter]]:
    """(model, the policy's adapters, what trains): a new adapter stacked on the policy's own, or with `lora =
    False` every weight of a private fp32 copy of the policy (its adapters merged in)."""
    if cfg.lora:
        new = add_adapter(pol.lm, f"{name}-dpo", cfg.lora)
        own = [pol.adapter] if isinstance(pol.adapter, str) else list(pol.adapter or [])
        return pol.lm, [*own, new] if own else new, adapter_parameters(pol.lm, new)
    model = merged_copy(pol.lm, pol.adapter)
    model = copy.deepcopy(model) if model is pol.lm.model else model
    lm = LoadedModel(pol.lm.spec, model.to(runtime.weight_dtype(master=True)), pol.lm.tokenizer, pol.lm.source)
    return lm, None, list(lm.model.parameters())


# ------------------------------------------------------------------------------------------------ batches
def rows(batch: Sequence[Ranking]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt of each row, answer of each row): every answer of the batch's rankings is one row."""
    return [r.query for r in batch for _ in r.answers], [a for r in batch for a in r.answers]


def padded(batch: Sequence[Ranking], pad_id: int) -> dict[str, Any]:
    """Rows as [prompt left-padded | answer right-padded]: the answers start at one column, `start`, so the LM head
    runs on the answer columns only."""
    queries, answers = rows(batch)
    q_ids, q_mask = left_pad(queries, pad_id, torch.device("cpu"))
    a_ids, a_mask = right_pad(answers, pad_id)
    return {
        "input_ids": torch.cat([q_ids, a_ids], 1),
        "attention_mask": torch.cat([q_mask, a_mask], 1),
        "start": q_ids.shape[1],
        "response_mask": a_mask,
    }


def collate(batch: list[Ranking], pad_id: int) -> dict[str, Any]:
    """The padded rows, each answer's reference log-prob, the (better, worse) pairs and the listwise terms."""
    groups, sizes = [r.groups for r in batch], [len(r.answers) for r in batch]
    pairs = ops.ranking_pairs(groups, sizes)
    terms = ops_pref.listwise_terms(groups, sizes)
    return {
        **padded(batch, pad_id),
        "ref_logps": torch.tensor([x for r in batch for x in r.ref], dtype=torch.float32),
        "winners": pairs.winners,
        "losers": pairs.losers,
        "weights": pairs.weights,
        "answers": terms.answers,
        "pool": terms.pool,
        "prompts": terms.prompts,
    }


def _n_tokens(batch: dict[str, Any]) -> int:
    return int(batch["attention_mask"].sum())


class PreferenceLoss(OverModel):
    """All K answers of each prompt in one forward pass; the DPO loss from their summed log-prob ratios."""

    def __init__(self, model: Any, beta: float, loss: str):
        super().__init__()
        self.model, self.beta, self.loss = model, beta, loss

    def forward(  # type: ignore[no-untyped-def]
        self, input_ids, attention_mask, *, start, response_mask, ref_logps, winners, losers, weights, **terms
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        lp = response_logprobs(self.model, input_ids, attention_mask, start).logprobs
        logratios = ops_pref.sequence_logps(lp, response_mask) - ref_logps
        pairs = ops.RankingPairs(winners, losers, weights)
        listwise = ops_pref.Listwise(terms["answers"], terms["pool"], terms["prompts"])
        loss = ops_pref.dpo_loss(logratios, pairs, beta=self.beta, loss=self.loss, listwise=listwise)
        stats = ops_pref.reward_metrics(logratios.detach(), pairs, self.beta)
        return loss, {f"train/{k}": v for k, v in stats.items()}


# ------------------------------------------------------------------------------------------------ log-probs
@torch.no_grad()
def answer_logps(
    lm: LoadedModel, adapter: Adapters, items: list[Ranking], *, batch_size: int, runtime: Runtime, acc: Any = None
) -> list[torch.Tensor]:
    """The summed log-prob of every answer under `lm` with `adapter`(s) active, in eval mode: one tensor per
    ranking. With several processes (`acc`) each computes its own share and every process gets every value."""
    rank, n_proc = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    sizes = [len(r.answers) for r in items]
    if n_proc > 1:
        starts = [sum(sizes[:i]) for i in range(len(items))]
        full = torch.zeros(sum(sizes), dtype=torch.float64)
        mine = answer_logps(lm, adapter, items[rank::n_proc], batch_size=batch_size, runtime=runtime)
        for i, lp in zip(range(rank, len(items), n_proc), mine):
            full[starts[i] : starts[i] + sizes[i]] = lp.double()
        return list(acc.reduce(full.to(acc.device), "sum").cpu().float().split(sizes))
    out: list[torch.Tensor] = []
    device, was_training = runtime.device, lm.model.training
    lm.model.eval()
    try:
        with use_adapter(lm, adapter), runtime.autocast():
            for i in range(0, len(items), batch_size):
                b = padded(items[i : i + batch_size], lm.tokenizer.pad_token_id)
                ids, mask, answer_mask = (b[k].to(device) for k in ("input_ids", "attention_mask", "response_mask"))
                lp = response_logprobs(lm.model, ids, mask, b["start"]).logprobs
                out += list(ops_pref.sequence_logps(lp, answer_mask).cpu().split(sizes[i : i + batch_size]))
    finally:
        lm.model.train(was_training)
    return out


def set_reference(ref: PolicyHandle, items: list[Ranking], batch_size: int, runtime: Runtime, acc: Any) -> None:
    """Each answer's reference log-prob, computed once on the reference's weights and kept on the item."""
    for item, lp in zip(items, answer_logps(ref.lm, ref.adapter, items, batch_size=batch_size, runtime=runtime,
                                            acc=acc)):  # fmt: skip
        item.ref = lp.tolist()


def start_loss(items: list[Ranking], cfg: DPOConfig) -> float:
    """The loss where every implicit reward is 0 (policy = reference): the divergence alarm's reference point."""
    groups, sizes = [r.groups for r in items], [len(r.answers) for r in items]
    zeros = torch.zeros(sum(sizes))
    pairs, terms = ops.ranking_pairs(groups, sizes), ops_pref.listwise_terms(groups, sizes)
    return float(ops_pref.dpo_loss(zeros, pairs, beta=cfg.beta, loss=cfg.loss, listwise=terms))


class Measure:
    """The loss and implicit-reward metrics of a fixed set of rankings under the current policy (each process
    computes its share); the last measurement is kept for the closing report."""

    def __init__(
        self, lm: LoadedModel, adapter: Adapters, items: list[Ranking], *, cfg: DPOConfig, runtime: Runtime, acc: Any
    ):
        self.lm, self.adapter, self.items, self.cfg, self.runtime, self.acc = lm, adapter, items, cfg, runtime, acc
        groups, sizes = [r.groups for r in items], [len(r.answers) for r in items]
        self.pairs, self.terms = ops.ranking_pairs(groups, sizes), ops_pref.listwise_terms(groups, sizes)
        self.ref = torch.tensor([x for r in items for x in r.ref], dtype=torch.float32)
        self.logratios: torch.Tensor | None = None

    def __call__(self, prefix: str = "eval") -> dict[str, float]:
        kw = {"batch_size": self.cfg.batch_size, "runtime": self.runtime, "acc": self.acc}
        logps = torch.cat(answer_logps(self.lm, self.adapter, self.items, **kw))
        self.logratios = logps - self.ref
        cfg = self.cfg
        loss = ops_pref.dpo_loss(self.logratios, self.pairs, beta=cfg.beta, loss=cfg.loss, listwise=self.terms)
        stats = ops_pref.reward_metrics(self.logratios, self.pairs, cfg.beta)
        return {f"{prefix}/loss": float(loss), **{f"{prefix}/{k}": float(v) for k, v in stats.items()}}


def report(measure: Measure, step: int, emit: Emitter, prefix: str) -> dict[str, float]:
    """The implicit rewards of the held-out (else a sample of the training) answers after training: a histogram of
    the better vs the worse answer of every pair, and the metrics for the summary."""
    final = measure(prefix)
    rewards = measure.cfg.beta * measure.logratios
    chosen, rejected = rewards[measure.pairs.winners].tolist(), rewards[measure.pairs.losers].tolist()
    title = f"implicit rewards of better vs worse answers ({len(chosen)} pairs, {prefix})"
    emit("histogram", step, payload={"title": title, "xlabel": "beta * log(pi / pi_ref)",
                                     "series": {"chosen": chosen, "rejected": rejected}})  # fmt: skip
    return final


def _summary(handle: DPOHandle, state: TrainState, stop: StopControl, final: dict, cut: Cut) -> dict[str, Any]:
    """The last training loss, the closing report's metrics (held-out, else on training prompts), the answers cut."""
    out: dict[str, Any] = {"steps": state.step, "train/loss": handle.metrics.last("train/loss")}
    out.update({k: v for k, v in final.items() if k != "train/loss"})
    if cut.count:
        out["truncated"] = cut.count
    out["seconds"] = round(time.monotonic() - state.started, 1)
    if stop.requested:
        out["stopped"] = stop.reason
    return out
