"""Reward-model training from K-way rankings, as numbered steps (InstructGPT: K answers, one forward pass)."""

from __future__ import annotations

import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import ops
from ..config import RewardConfig
from ..errors import ConfigError, DataError
from ..events import Callback, Emitter, StopControl
from . import divergence
from .adapters import add_adapter, train_only, use_adapter
from .handles import PolicyHandle
from .loop import TrainState, run_steps
from .models import LoadedModel
from .reward_model import RankingLoss, RewardHandle, answer_ids, make_head, right_pad
from .runtime import Runtime, in_runtime_scope, seed_everything
from .sft import resolve_start

NORM_PROMPTS, NORM_SAMPLES = 16, 2  # SFT answers scored for the normalisation: 2 per prompt, up to 16 prompts
SHOWN = 3
REPORT_MAX = 128  # with nothing held out, the closing report scores a sample of this many training prompts


@dataclass
class Item:
    """One ranked prompt, tokenized: K rows (prompt + answer + EOS) and the rank groups."""

    prompt: str
    responses: list[str]
    rows: list[list[int]]
    groups: list[list[int]]


@in_runtime_scope
def train_reward(
    cfg: RewardConfig,
    name: str,
    runtime: Runtime,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    policies: Any = None,
) -> RewardHandle:
    """`policies` (the session) resolves the policy names in the records, for the tokenizer check."""
    stop = stop or StopControl()
    emit = Emitter("reward", callbacks)
    seed_everything(cfg.seed)
    # 1. the rankings (checked before any model loads), then the backbone: the SFT weights, shared through LoRA
    prefs = drop_flagged(to_preferences(cfg.data), cfg.include_flagged, emit)  # says how many flagged it left out
    lm, init_from, parents = backbone(cfg, runtime)
    check_tokenizers(prefs, lm, cfg, policies)
    # 2. rankings -> tokenized items -> train / held-out split by prompt
    train, evals = split(load_items(prefs, lm.tokenizer, cfg.max_length), cfg.eval_fraction, cfg.seed)
    # 3. trainables: a fresh scalar head and the adapter (a copy of the SFT adapter), or every backbone weight
    head = make_head(lm.model.config.hidden_size, runtime.device, bias=False)
    adapter = add_adapter(lm, f"{name}-rm", cfg.lora, init_from=init_from) if cfg.lora else None
    lineage = (*parents, data_source(cfg.data, prefs))
    handle = RewardHandle(
        name, lm, head, runtime=runtime, adapter=adapter, config=cfg, parents=lineage, max_length=cfg.max_length
    )
    # 4. answers of the SFT policy for the normalisation, sampled before any weight moves
    norm = sample_sft(lm, init_from, runtime, [it.prompt for it in train], cfg.seed) if cfg.normalize else None
    # 5. optimizer, schedule, accelerate; each batch holds `batch_size` prompts with all their answers
    params = handle.trainable_parameters()
    train_only(lm.model, params)
    pad = lm.tokenizer.pad_token_id
    default_lr = 1e-4 if cfg.lora else 1e-5
    lr = cfg.lr or default_lr
    loss = RankingLoss(lm.model, head, cfg.margin)
    state = TrainState.build(runtime, loss, params, cfg=cfg, lr=lr, dataset=train, collate=lambda b: collate(b, pad))
    rules = _rules(cfg, lm, lr, default_lr)  # NaN, inf and blow-ups
    state.watch = divergence.watch(state.params, rules, emit=emit, stop=stop, cfg=cfg, acc=state.accelerator)
    emit.total = state.total_steps
    emit("start", payload={"config": cfg, "train": len(train), "eval": len(evals), "handle": handle})
    # 6. the loop, with held-out accuracy about six times a run; eval mode keeps every dropout off
    acc = state.accelerator  # with several processes each scores its share of the held-out prompts
    evaluate = (lambda: evaluate_items(handle, evals, cfg.batch_size, cfg.margin, acc)) if evals else None
    lm.model.eval()
    try:
        with stop.catch_interrupt(), use_adapter(lm, adapter):
            run_steps(state, emit, stop, handle.metrics, evaluate, tokens_of=lambda b: int(b["attention_mask"].sum()))
    finally:
        train_only(lm.model, [])
        state.close()
    # 7. normalise on the SFT answers, then show what the model learned
    norm_stats = normalize(handle, cfg.normalize, *norm) if norm else {}
    shown = evals or random.Random(cfg.seed).sample(train, min(REPORT_MAX, len(train)))
    final = report(handle, shown, cfg.batch_size, emit, state.accelerator)
    handle.metrics.summary.update({**_summary(handle, state, stop, final, bool(evals)), **norm_stats})
    handle.metrics.summary.update(state.watch.summary())
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir, overwrite=True)  # a re-run of the stage replaces its own output
    return handle


def backbone(cfg: RewardConfig, runtime: Runtime) -> tuple[LoadedModel, str | None, tuple[str, ...]]:
    """(model, SFT adapter to copy, parents) as SFT resolves them; a stacked-adapter policy cannot seed LoRA."""
    lm, init_from, parents = resolve_start(cfg, runtime)
    if isinstance(init_from, list):
        raise ConfigError(
            f"model = {parents[0]}: a policy of stacked adapters (a PPO result) cannot seed one LoRA adapter; "
            f"start from its SFT policy, or set lora = False to train a merged copy"
        )
    return lm, init_from, parents


def _rules(cfg: RewardConfig, lm: LoadedModel, lr: float, default_lr: float) -> divergence.Rules:
    """Divergence alarms; equal scores give every pair the loss softplus(margin)."""
    equal = float(torch.nn.functional.softplus(torch.tensor(float(cfg.margin))))
    fix = divergence.lr_fix(lr, default_lr)
    return divergence.Rules("reward", divergence.vocab_size(lm.model), fix, uniform=equal)


def to_preferences(data: Any) -> Any:
    """Preferences, a RankingPanel, records (rankings or pairs), a Dataset, a DataFrame or a path -> Preferences."""
    from ..data import read_records
    from ..preferences import Preferences

    if hasattr(type(data), "preferences"):  # a RankingPanel hands over what was labelled
        data = data.preferences
    if isinstance(data, Preferences):
        return data.require()
    if isinstance(data, (str, Path)) and str(data).lower().endswith(".jsonl"):
        return Preferences.load(data)  # the panel's log: retractions and replacements applied
    if isinstance(data, (str, Path)):
        return Preferences.from_records(data, source=str(data))
    return Preferences.from_records([_json_ranking(r) for r in read_records(data, "data")])


def drop_flagged(prefs: Any, include: bool, emit: Emitter) -> Any:
    """The preferences to learn from: less the flagged prompts unless `include`, with a warning saying how many."""
    if include or not prefs.flagged:
        return prefs
    kept, keep = prefs.without_flagged(), "include_flagged = True keeps those with a ranking"
    if not kept.records:
        raise DataError(
            f"all {len(prefs)} ranked prompts are flagged (all answers bad or unsafe): nothing to learn; {keep}"
        )
    emit("warning", payload=f"left out {prefs.flagged} flagged prompt(s) (all answers bad or unsafe); {keep}")
    return kept


def _json_ranking(rec: dict) -> dict:
    """`Preferences.to_dataset()` stores each ranking as JSON text (ragged nesting); read it back as a list."""
    ranking = rec.get("ranking")
    if isinstance(ranking, str) and ranking.lstrip().startswith("["):
        try:
            return {**rec, "ranking": json.loads(ranking)}
        except json.JSONDecodeError:
            pass
    return rec


def same_tokenizer(a: Any, b: Any) -> bool:
    return a is b or (len(a) == len(b) and a.eos_token_id == b.eos_token_id and a.get_vocab() == b.get_vocab())


def check_tokenizers(prefs: Any, lm: LoadedModel, cfg: RewardConfig, policies: Any) -> None:
    """The policy that wrote a record's answers (a session result, or the panel's policy) must share the backbone's
    tokenizer: PPO feeds that policy's token rows straight into this reward model."""
    panel_policy = getattr(cfg.data, "policy", None)
    other: dict[str, Any] = {}  # policy name -> its tokenizer when it differs, else None
    for i, rec in enumerate(prefs.records):
        name = rec.get("policy")
        if not isinstance(name, str) or not name:
            continue
        if name not in other:
            src = panel_policy if getattr(panel_policy, "name", None) == name else None
            if src is None and policies is not None and name in policies:
                src = policies[name]
            tok = getattr(src, "tokenizer", None)
            other[name] = None if tok is None or same_tokenizer(tok, lm.tokenizer) else tok
        if other[name] is not None:
            model = getattr(cfg.model, "name", cfg.model)
            raise DataError(
                f"record {i} (prompt {rec['prompt'][:40]!r}): its answers come from policy {name!r}, whose tokenizer "
                f"differs from that of model {model!r} ({len(other[name])} vs {len(lm.tokenizer)} tokens); PPO feeds "
                f"that policy's tokens to the reward model, so set model = {name} (or a model with the same tokenizer)"
            )


def data_source(data: Any, prefs: Any) -> str:
    """The preferences' name in the lineage: their file, or how many rankings were passed in memory."""
    if isinstance(data, (str, Path)):
        return str(data)
    return prefs.source or f"{len(prefs)} rankings"


def load_items(prefs: Any, tokenizer: Any, max_length: int) -> list[Item]:
    """Every ranked prompt with at least one comparison (all-tied rankings teach nothing and are skipped)."""
    items = [
        Item(r.prompt, list(r.responses), [answer_ids(tokenizer, r.prompt, a, max_length) for a in r.responses],
             [list(g) for g in r.groups])
        for r in prefs.ranked()
        if len(r.groups) > 1
    ]  # fmt: skip
    if not items:
        raise DataError("the preferences have no comparison to learn from: every ranking ties all its answers")
    return items


def split(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out whole prompts (every answer of a prompt lands on the same side); at least one prompt trains."""
    prompts = sorted({it.prompt for it in items})
    random.Random(seed).shuffle(prompts)
    n_eval = min(round(fraction * len(prompts)), len(prompts) - 1) if len(prompts) >= 4 else 0
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


def item_scores(handle: RewardHandle, items: list[Item], batch_size: int, acc: Any = None) -> list[torch.Tensor]:
    """Raw scores of every answer, one tensor per item. With several processes (`acc`) each scores its own share
    and the shares are summed into one vector (zeros elsewhere), so every process gets every score."""
    rank, n_proc = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    if n_proc > 1:
        sizes = [len(it.rows) for it in items]
        starts = [sum(sizes[:i]) for i in range(len(items))]
        full = torch.zeros(sum(sizes), dtype=torch.float64)
        for i, s in zip(range(rank, len(items), n_proc), item_scores(handle, items[rank::n_proc], batch_size)):
            full[starts[i] : starts[i] + sizes[i]] = s.double()
        return list(acc.reduce(full.to(acc.device), "sum").cpu().float().split(sizes))
    out: list[torch.Tensor] = []
    pad, device = handle.lm.tokenizer.pad_token_id, handle.runtime.device
    for i in range(0, len(items), batch_size):
        chunk = items[i : i + batch_size]
        ids, mask = right_pad([row for it in chunk for row in it.rows], pad)
        scores = handle.raw_scores(ids.to(device), mask.to(device)).cpu()
        out += list(torch.split(scores, [len(it.rows) for it in chunk]))
    return out


def evaluate_items(
    handle: RewardHandle, items: list[Item], batch_size: int, margin: float, acc: Any = None
) -> dict[str, float]:
    """Held-out loss and pairwise accuracy. With several processes (`acc`) each scores its own share of the items
    and the sums (each prompt weighs 1) are added up across processes: the same values as one process on all."""
    rank, n_proc = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    if n_proc == 1:
        scores = torch.cat(item_scores(handle, items, batch_size))
        pairs = ops.ranking_pairs([it.groups for it in items], sizes=[len(it.rows) for it in items])
        return {
            "eval/loss": float(ops.pairwise_ranking_loss(scores, *pairs, margin=margin)),
            "eval/accuracy": float(ops.pairwise_accuracy(scores, *pairs)),
        }
    share = items[rank::n_proc]
    sums = torch.zeros(3, dtype=torch.float64)  # loss and accuracy times the share's weight, the weight
    if share:
        part = evaluate_items(handle, share, batch_size, margin)
        weight = float(len(share))  # every prompt's pairs weigh 1 in all
        sums = torch.tensor([part["eval/loss"] * weight, part["eval/accuracy"] * weight, weight], dtype=torch.float64)
    sums = acc.reduce(sums.to(acc.device), "sum")
    return {"eval/loss": float(sums[0] / sums[2]), "eval/accuracy": float(sums[1] / sums[2])}


def sample_sft(
    lm: LoadedModel, adapter: str | None, runtime: Runtime, prompts: list[str], seed: int
) -> tuple[list[str], list[str]]:
    """(prompts, answers) sampled from the SFT policy, i.e. the weights training starts from, on training prompts."""
    sft = PolicyHandle("sft", "sft", lm, runtime=runtime, adapter=adapter)
    unique = sorted(set(prompts))
    chosen = random.Random(seed).sample(unique, min(NORM_PROMPTS, len(unique)))
    answers = sft.sample(chosen, NORM_SAMPLES, max_new_tokens=48, temperature=0.7, seed=seed)
    return [p for p in chosen for _ in range(NORM_SAMPLES)], [a for group in answers for a in group]


def normalize(handle: RewardHandle, mode: bool | str, prompts: list[str], answers: list[str]) -> dict[str, float]:
    """Shift (and with 'gain', scale) scores so the SFT policy's answers score mean 0 (and std 1)."""
    handle.mean, handle.gain = 0.0, 1.0
    raw = handle.score(prompts, answers)
    handle.mean = statistics.fmean(raw)
    if mode == "gain" and len(raw) > 1:
        handle.gain = 1.0 / max(statistics.stdev(raw), 1e-6)
    return {"norm/mean": handle.mean, "norm/gain": handle.gain, "norm/samples": len(raw)}


def report(handle: RewardHandle, items: list[Item], batch_size: int, emit: Emitter, acc: Any = None) -> float:
    """A histogram of chosen vs rejected scores and the most and least preferred answers; returns the accuracy.
    With several processes (`acc`) each scores its share of the items."""
    raw = item_scores(handle, items, batch_size, acc)
    scores = [(s - handle.mean) * handle.gain for s in raw]
    chosen, rejected = [], []
    for it, s in zip(items, scores):
        for gi, better in enumerate(it.groups):
            for worse in it.groups[gi + 1 :]:
                chosen += [float(s[b]) for b in better for _ in worse]
                rejected += [float(s[w]) for _ in better for w in worse]
    title = f"scores of chosen vs rejected answers ({len(chosen)} pairs)"
    emit("histogram", payload={"title": title, "xlabel": "reward", "series": {"chosen": chosen, "rejected": rejected}})
    flat = sorted(
        ((float(s[i]), it.prompt, a) for it, s in zip(items, scores) for i, a in enumerate(it.responses)),
        key=lambda t: t[0],
    )
    ends = [("top", list(reversed(flat[-SHOWN:]))), ("bottom", flat[:SHOWN])]
    rows = [
        {"rank": f"{side} {k + 1}", "score": sc, "prompt": p, "answer": a}
        for side, picked in ends
        for k, (sc, p, a) in enumerate(picked)
    ]
    emit("samples", payload={"title": "most and least preferred answers", "rows": rows})
    pairs = ops.ranking_pairs([it.groups for it in items], sizes=[len(it.rows) for it in items])
    return float(ops.pairwise_accuracy(torch.cat(raw), *pairs))


def _summary(handle: RewardHandle, state: TrainState, stop: StopControl, final: float, held: bool) -> dict[str, Any]:
    """`eval/accuracy` is measured on every held-out prompt at the end (with none held out, `train/accuracy` on up to
    REPORT_MAX training prompts)."""
    m = handle.metrics
    out: dict[str, Any] = {"steps": state.step}
    if held:
        out["eval/accuracy"] = final
    out.update({"train/loss": m.last("train/loss"), "train/accuracy": final if not held else m.last("train/accuracy")})
    out["seconds"] = round(time.monotonic() - state.started, 1)
    if stop.requested:
        out["stopped"] = stop.reason
    return out
