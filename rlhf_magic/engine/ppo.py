"""PPO with a per-token KL penalty to the frozen SFT policy, on one shared base model.

Roles on one set of base weights: the policy is the SFT adapter plus a new PPO adapter stacked on it (or a new
adapter on a fully fine-tuned SFT model), the reference is the SFT adapter alone (or adapters off), the value
function is a head on the policy's own trunk (one forward gives logprobs and values), and a reward model trained
from the same SFT model is one more adapter.
"""

from __future__ import annotations

import copy
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..config import PPOConfig
from ..data import read_prompts
from ..errors import ConfigError
from ..events import Callback, Emitter, StopControl
from . import fastpath, ranks
from . import rollout as R
from .adapters import adapter_parameters, add_adapter, train_only, use_adapter
from .generation import encode_prompts
from .handles import PolicyHandle
from .loop import MAX_SKIPPED_STEPS, checkpointing, loss_scaler, make_optimizer, skip_reason, step_skipped
from .models import LoadedModel
from .modules import PolicyValue
from .ppo_monitor import Monitor, skipped_steps_warning, step_metrics
from .reward_model import RewardHandle, make_head
from .runtime import Runtime, in_runtime_scope, seed_everything


@dataclass
class PPOState:
    """What a resumed run needs: roles, value head, optimizer and KL controller state, progress."""

    roles: R.Roles
    value_head: nn.Linear
    trained: list[nn.Parameter]
    kl_ctl: Any
    step: int = 0
    optimizer_state: dict | None = None
    monitor: Monitor = field(default_factory=Monitor)


class PPOHandle(PolicyHandle):
    """A PPO policy: a policy handle plus the state that `resume = True` continues from."""

    def __init__(self, name: str, lm: LoadedModel, *, state: PPOState, **handle: Any):
        super().__init__(name, "ppo", lm, **handle)
        self.ppo = state

    def trainable_parameters(self) -> list[Any]:
        return list(self.ppo.trained)


@dataclass
class PPORun:
    """What every step of one run shares: the prepared module and optimizer, the roles and the settings."""

    module: PolicyValue
    optimizer: Any
    acc: Any
    state: PPOState
    cfg: PPOConfig
    emit: Emitter
    stop: StopControl
    share: float = 1.0  # the share of the layers that run with gradients (above a shared frozen prefix)
    skipped: int = 0  # optimizer steps skipped in a row (gradients not finite)

    @property
    def roles(self) -> R.Roles:
        return self.state.roles


@in_runtime_scope
def train_ppo(
    cfg: PPOConfig,
    name: str,
    runtime: Runtime,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    previous: PPOHandle | None = None,
) -> PPOHandle:
    stop = stop or StopControl()
    emit = Emitter("ppo", callbacks)
    seed_everything(cfg.seed)
    # 1. prompts, roles (policy / reference / value / reward on one base) and the trainable weights
    prompts = read_prompts(cfg.prompts)
    handle = previous if previous is not None else _new_handle(cfg, name, runtime)
    state, roles = handle.ppo, handle.ppo.roles
    train_only(roles.lm.model, state.trained)
    roles.depth = fastpath.prefix_depth(roles.lm.model, roles.adapters)  # after train_only: the trainables are known
    # 2. optimizer (restored on resume) and accelerate
    run = _prepare(cfg, runtime, state, emit, stop)
    emit.total = state.step + cfg.steps
    emit("start", state.step, payload={"config": cfg, "prompts": len(prompts), "handle": handle})
    order = _prompt_order(len(prompts), cfg.seed + state.step)
    try:
        with stop.catch_interrupt(), use_adapter(roles.lm, handle.adapter), fastpath.lean_layers(mlp=True):
            # 3. the loop: one rollout and its PPO epochs per step, metrics and warnings after each
            for _ in range(cfg.steps):
                batch = ranks.prompt_batch(prompts, order, state.step, cfg.batch_size, run.acc)
                row = ranks.reduce_row(run, ppo_step(run, batch))  # the mean over processes
                if row is None:
                    break
                for warning in state.monitor.check(row, cfg):  # on the whole batch's metrics
                    emit("warning", state.step + 1, payload=warning)
                state.step += 1
                handle.metrics.log(state.step, row)
                emit("step", state.step, row)
                if stop.requested:
                    break
    finally:
        train_only(roles.lm.model, [])
        state.optimizer_state = run.optimizer.state_dict()
        run.acc.free_memory()
    # 4. the result
    handle.metrics.summary.update(_summary(handle, stop))
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir)
    return handle


def _prepare(cfg: PPOConfig, runtime: Runtime, state: PPOState, emit: Emitter, stop: StopControl) -> PPORun:
    lr = cfg.lr or (1e-4 if cfg.lora else 3e-6)
    acc = runtime.accelerator(1)
    optimizer = make_optimizer(state.trained, lr, runtime.device)
    if state.optimizer_state:
        optimizer.load_state_dict(state.optimizer_state)
    with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
        warnings.simplefilter("ignore", FutureWarning)
        module, optimizer = acc.prepare(PolicyValue(state.roles.lm.model, state.value_head), optimizer)
    share = fastpath.trained_share(state.roles.lm.model, state.roles.depth)
    return PPORun(module, optimizer, acc, state, cfg, emit, stop, share)


def ppo_step(run: PPORun, prompts: list[str]) -> dict[str, float] | None:
    """One rollout and its updates. Returns the step's metrics, or None when the rewards were not finite."""
    roles, state, cfg = run.roles, run.state, run.cfg
    t0 = time.monotonic()
    run.module.eval()  # generation and scoring; dropout is off anyway
    # 1-3. sample; the policy's logprobs (and values) come from the decode steps where the fast path keeps them
    seed = ranks.sampling_seed(cfg.seed, state.step, run.acc)  # each process samples its own answers
    ro = R.generate(roles, prompts, cfg, seed=seed, capture=_capture(run, prompts))
    if ro.hidden is not None:
        with torch.no_grad():
            ro.values = state.value_head(ro.hidden.float()).squeeze(-1)
        ro.hidden = None
    t_gen = time.monotonic() - t0
    # 4-6. reference logprobs and scores
    R.share_prefix(roles, ro)
    ro.ref_logprobs = R.reference_logprobs(roles, ro, cfg.temperature)
    R.score(roles, ro, cfg.missing_eos_penalty)
    bad = R.first_bad_score(ro.scores)
    if ranks.any_rank(run.acc, bad is not None):  # every process stops together, or DDP would wait forever
        where = f"{float(ro.scores[bad])} for answer {bad} ({ro.texts[bad][:60]!r})" if bad is not None else ""
        run.stop.request(
            f"the reward was {where or 'not finite in another process'}; the result keeps the policy of step "
            f"{state.step}"
        )
        run.emit("warning", state.step, payload=run.stop.reason)
        return None
    # 7-8 and the PPO epochs (the prepared module's forward runs under accelerate's autocast)
    run.module.train()
    kl_coef = state.kl_ctl.value
    with fastpath.update(run.acc), checkpointing(roles.lm.model, cfg.gradient_checkpointing):
        stats = update(run, ro)
    state.kl_ctl.update(float((ro.kl.sum(1)).mean()), len(prompts))
    row = step_metrics(ro, stats, kl_coef, cfg, time.monotonic() - t0, t_gen)
    run.emit("samples", state.step + 1, payload=_samples(ro))
    notes = skipped_steps_warning(stats, scaled=loss_scaler(run.acc) is not None)
    if run.skipped >= MAX_SKIPPED_STEPS:  # skipped steps left the weights alone
        run.stop.request(skip_reason(run.acc, run.skipped, "the policy from before them"))
        notes.append(run.stop.reason)
    for warning in notes:
        run.emit("warning", state.step + 1, payload=warning)
    return row


def update(run: PPORun, ro: R.Rollout) -> dict[str, list[float]]:
    """num_ppo_epochs passes over the rollout in minibatches; each minibatch is one optimizer step, computed in
    micro-batches whose gradients add up to the minibatch's.

    When one micro-batch holds the whole batch, epoch 1 reuses its own forward pass as the rollout's logprobs and
    values (the weights have not changed yet), which saves a full forward pass."""
    cfg, n = run.cfg, ro.input_ids.shape[0]
    mbs = min(cfg.mini_batch_size, n)
    micro = min(micro_batch_size(cfg, run.acc.device, run.share, ro.input_ids.shape[1]), mbs)
    micro = -(-mbs // -(-mbs // micro))  # chunks of even size: 8 answers at most 7 a chunk run as 4 + 4, not 7 + 1
    merged = micro >= n
    if not merged:
        _old_logprobs_and_values(run, ro, micro)
        R.advantages(ro, cfg, run.state.kl_ctl.value)
    stats: dict[str, list[float]] = {}
    for epoch in range(cfg.num_ppo_epochs):
        perm = torch.arange(n) if merged else torch.randperm(n)
        for start in range(0, n, mbs):
            idx = perm[start : start + mbs]
            _minibatch(run, ro, idx, micro=micro, first=merged and epoch == 0, entropy=epoch == 0, stats=stats)
            if run.skipped >= MAX_SKIPPED_STEPS:
                return stats
    return stats


def _minibatch(
    run: PPORun, ro: R.Rollout, idx: torch.Tensor, *, micro: int, first: bool, entropy: bool, stats: dict
) -> None:
    """One optimizer step over the minibatch `idx`; each chunk's loss is weighted by its share of the tokens,
    so the summed gradients equal those of the minibatch's masked-mean loss."""
    cfg, acc = run.cfg, run.acc
    total = ro.mask[idx].sum().clamp_min(1)
    rows: dict[str, float] = {}
    for chunk in idx.split(micro):
        with acc.autocast(), fastpath.chunk(acc.device):
            lp, v, ent = R.policy_forward(run.module, _rows(ro, chunk), cfg.temperature, entropy=entropy)
        if first:  # the weights have not moved yet: this forward is the rollout's own
            ro.logprobs, ro.values = lp.detach(), v.detach().float()
            R.advantages(ro, cfg, run.state.kl_ctl.value)
        mask, share = ro.mask[chunk], float(ro.mask[chunk].sum() / total)
        pg = ops.clipped_surrogate_loss(lp, ro.logprobs[chunk], ro.advantages[chunk], mask, cfg.cliprange)
        vf_loss, vf_clip = ops.clipped_value_loss(
            v.float(), ro.values[chunk], ro.returns[chunk], mask, cfg.cliprange_value
        )
        acc.backward((pg.loss + cfg.vf_coef * vf_loss) * share)
        _add_chunk_stats(rows, share, pg, vf_loss, vf_clip)
        if ent is not None:
            rows["policy/entropy"] = rows.get("policy/entropy", 0.0) + float(ops.masked_mean(ent, mask)) * share
    _optimizer_step(run, rows)
    for key, val in rows.items():
        stats.setdefault(key, []).append(val)


def _optimizer_step(run: PPORun, rows: dict[str, float]) -> None:
    """Clip and step. Under fp16 the loss scaler skips a step whose gradients overflowed (and lowers its scale);
    without one, a step whose gradient norm is not finite is skipped here. Skips are counted, never silent."""
    grad_norm = run.acc.clip_grad_norm_(run.state.trained, run.cfg.max_grad_norm)
    skipped = step_skipped(grad_norm)
    if not skipped or loss_scaler(run.acc) is not None:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped = run.skipped + 1 if skipped else 0
    rows["skipped_steps"] = float(skipped)
    if not skipped:
        rows["grad_norm"] = float(grad_norm)


def _add_chunk_stats(rows: dict[str, float], share: float, pg: Any, vf_loss: Any, vf_clip: Any) -> None:
    for key, val in {
        "policy/loss": pg.loss,
        "policy/clipfrac": pg.clipfrac,
        "policy/approxkl": pg.approx_kl,
        "val/loss": vf_loss,
        "val/clipfrac": vf_clip,
    }.items():
        rows[key] = rows.get(key, 0.0) + float(val.detach()) * share
    rows["policy/ratio_max"] = max(rows.get("policy/ratio_max", 0.0), float(pg.ratio_max))


@torch.no_grad()
def _old_logprobs_and_values(run: PPORun, ro: R.Rollout, micro: int) -> None:
    """Step 3 by forward passes in chunks, where sampling did not keep the policy's logprobs and values."""
    if ro.logprobs is not None:
        return
    with run.acc.autocast():
        for idx in torch.arange(ro.input_ids.shape[0]).split(micro):
            lp, v, _ = R.policy_forward(run.module, _rows(ro, idx), run.cfg.temperature, entropy=False)
            ro.logprobs = lp if ro.logprobs is None else torch.cat([ro.logprobs, lp])
            ro.values = v.float() if ro.values is None else torch.cat([ro.values, v.float()])


def micro_batch_size(cfg: PPOConfig, device: Any, trained_share: float = 1.0, row_tokens: int = 0) -> int:
    """Answers per forward/backward chunk: cfg.micro_batch_size, else what the CPU fast path keeps in bounded
    memory (rows of `row_tokens` tokens, `trained_share` of the layers with gradients), else the whole minibatch."""
    if cfg.micro_batch_size:
        return cfg.micro_batch_size
    return fastpath.chunk_rows(device, trained_share, row_tokens) or cfg.mini_batch_size


def _capture(run: PPORun, prompts: list[str]) -> bool:
    """Whether sampling keeps the policy's logprobs and hidden states: where the update will run in chunks (else
    epoch 1's forward gives them for free)."""
    cfg, acc = run.cfg, run.acc
    width = max(map(len, encode_prompts(run.roles.lm, prompts))) + cfg.max_new_tokens  # the longest possible row
    chunked = min(micro_batch_size(cfg, acc.device, run.share, width), cfg.mini_batch_size) < len(prompts)
    mixed = getattr(acc, "mixed_precision", "no")
    return fastpath.capture_while_sampling(acc.device, chunked=chunked, mixed_precision=mixed)


def _rows(ro: R.Rollout, idx: torch.Tensor) -> R.Rollout:
    rows = R.Rollout([], [], ro.input_ids[idx], ro.attention_mask[idx], ro.start, ro.mask[idx], ro.has_eos[idx])
    if ro.prefix is not None:
        rows.prefix = (ro.prefix[0], ro.prefix[1][idx])
    return rows


def _samples(ro: R.Rollout, n: int = 4) -> dict[str, Any]:
    kl = ro.kl.sum(1)
    return {
        "title": "latest samples",
        "rows": [
            {"prompt": p, "answer": t, "score": float(s), "KL": float(k)}
            for p, t, s, k in list(zip(ro.prompts, ro.texts, ro.scores, kl))[:n]
        ],
    }


def _prompt_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------------------------------- setup
def _new_handle(cfg: PPOConfig, name: str, runtime: Runtime) -> PPOHandle:
    """Roles on one base: a PPO adapter on top of the SFT policy; the SFT policy itself is the reference."""
    pol: PolicyHandle = cfg.policy
    if cfg.lora:
        lm, ref_lm = pol.lm, pol.lm
        new = add_adapter(lm, f"{name}-ppo", cfg.lora)
        policy = [*_as_list(pol.adapter), new]
        trained = adapter_parameters(lm, new)
    else:
        from .adapters import merged_copy

        model = copy.deepcopy(merged_copy(pol.lm, pol.adapter)).to(runtime.weight_dtype(master=True))
        lm = LoadedModel(pol.lm.spec, model, pol.lm.tokenizer, pol.lm.source)  # fp32 master weights: all train
        ref_lm, policy, trained = pol.lm, None, list(lm.model.parameters())
    reference = pol.adapter
    value_head = _value_head(cfg.reward, lm, runtime)
    roles = R.Roles(lm, policy, reference, ref_lm, _scorer(cfg.reward, pol, lm, runtime), runtime.autocast)
    roles.bf16_weights = runtime.precision == "bf16"
    rm = cfg.reward if isinstance(cfg.reward, RewardHandle) and cfg.reward.lm is lm else None
    roles.adapters = (*_as_list(policy), *(_as_list(reference) if ref_lm is lm else []), *_as_list(rm and rm.adapter))
    from .kl_control import AdaptiveKLController, FixedKLController

    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl
        else FixedKLController(cfg.kl_coef)
    )
    state = PPOState(roles, value_head, trained + list(value_head.parameters()), kl_ctl)
    parents = (pol.name, getattr(cfg.reward, "name", getattr(cfg.reward, "__name__", "reward")))
    return PPOHandle(name, lm, state=state, runtime=runtime, adapter=policy, config=cfg, parents=parents)


def _as_list(adapter: Any) -> list[str]:
    if adapter is None:
        return []
    return [adapter] if isinstance(adapter, str) else list(adapter)


def _value_head(reward: Any, lm: LoadedModel, runtime: Runtime) -> nn.Linear:
    """Where the reward model shares the hidden size: its normalised head, score = (raw - mean) * gain, so the
    first values are on the scale of the scores; else initialised like a reward head."""
    head = make_head(lm.model.config.hidden_size, runtime.device)
    if isinstance(reward, RewardHandle) and reward.head.weight.shape == head.weight.shape:
        with torch.no_grad():
            head.weight.copy_(reward.head.weight * reward.gain)
            head.bias.copy_((reward.head.bias - reward.mean) * reward.gain)
    return head


def _scorer(reward: Any, pol: PolicyHandle, lm: LoadedModel, runtime: Runtime) -> Any:
    """Score token rows directly when the reward model shares the tokenizer; a callable gets the texts."""
    if isinstance(reward, RewardHandle):
        if reward.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise ConfigError(
                f"reward model {reward.name!r} uses a different tokenizer than policy {pol.name!r}, so "
                f"its scores would need re-tokenised text; train the reward model from this policy, or "
                f"pass reward = lambda p, r: {reward.name}.score(p, r)"
            )
        same_base = reward.lm is lm  # then the rollout's shared frozen prefix is valid for it too
        return lambda prompts, texts, ids, mask, prefix: reward.score_tokens(ids, mask, prefix if same_base else None)
    if callable(reward):
        return R.callable_scorer(reward, runtime.device)
    raise ConfigError(
        f"reward = {reward!r} is not valid; expected a reward handle or a callable f(prompts, responses) -> list[float]"
    )


def _summary(handle: PPOHandle, stop: StopControl) -> dict[str, Any]:
    m = handle.metrics
    out: dict[str, Any] = {"steps": handle.ppo.step}
    for key in ("ppo/objective/scores", "ppo/objective/kl", "ppo/objective/rlhf_reward"):
        if m.last(key) is not None:
            out[key] = m.last(key)
    out["seconds"] = round(sum(m["ppo/time/step_s"]), 1) if m.last("ppo/time/step_s") is not None else 0.0
    if stop.requested:
        out["stopped"] = stop.reason
    return out
