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
from ..events import Callback, Emitter, StopControl
from . import divergence, fastpath, memory, ranks, sharding
from . import rollout as R
from .adapters import adapter_parameters, add_adapter, train_only, use_adapter
from .generation import encode_prompts
from .handles import PolicyHandle
from .loop import MAX_SKIPPED_STEPS, checkpointing, loss_scaler, make_optimizer, skip_reason, step_skipped
from .models import LoadedModel
from .modules import PolicyValue
from .ppo_monitor import Monitor, add_chunk_stats, sample_rows, skipped_steps_warning, step_metrics
from .reward_model import RewardHandle
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
    watch: divergence.Watch | None = None  # NaN, inf and divergence alarms; the last good policy

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
    memory.check_ppo(cfg, prompts, runtime, previous)  # the update fits: refused before anything is set up
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
                if run.watch.check(state.step, row) or stop.requested:
                    break
    finally:
        train_only(roles.lm.model, [])
        state.optimizer_state = run.optimizer.state_dict()
        if run.watch.kept is not None:  # diverged: a resumed run goes on from the last good policy, Adam afresh
            state.step, state.optimizer_state = run.watch.kept, None
        sharding.release(run.acc, run.module)  # FSDP2: the whole trained weights, back in the model's parameters
        run.acc.free_memory()
    # 4. the result
    handle.metrics.summary.update({**_summary(handle, stop), **run.watch.summary()})
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir, overwrite=True)  # a re-run of the stage replaces its own output
    return handle


def _prepare(cfg: PPOConfig, runtime: Runtime, state: PPOState, emit: Emitter, stop: StopControl) -> PPORun:
    default_lr, acc = 1e-4 if cfg.lora else 3e-6, runtime.accelerator(1)
    lr = cfg.lr or default_lr
    optimizer = make_optimizer(state.trained, lr, runtime.device)
    if state.optimizer_state:
        optimizer.load_state_dict(state.optimizer_state)
    with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
        warnings.simplefilter("ignore", FutureWarning)
        module, optimizer = sharding.prepare(
            acc, PolicyValue(state.roles.lm.model, state.value_head), optimizer, batch_size=cfg.mini_batch_size
        )
    share = fastpath.trained_share(state.roles.lm.model, state.roles.depth)
    rules = divergence.Rules("ppo", divergence.vocab_size(state.roles.lm.model), divergence.lr_fix(lr, default_lr))
    trained = sharding.trained(acc, module, state.trained)  # under FSDP2: the sharded weights the optimizer steps
    watch = divergence.watch(trained, rules, emit=emit, stop=stop, cfg=cfg, acc=acc, step=state.step)
    return PPORun(module, optimizer, acc, state, cfg, emit, stop, share, watch=watch)


def ppo_step(run: PPORun, prompts: list[str]) -> dict[str, float] | None:
    """One rollout and its updates. Returns the step's metrics, or None when the run stops: the sampling
    probabilities, the rewards or the updated weights were not finite."""
    roles, state, cfg = run.roles, run.state, run.cfg
    t0 = time.monotonic()
    run.module.eval()  # generation and scoring; dropout is off anyway
    # 1-3. sample; the policy's logprobs (and values) come from the decode steps where the fast path keeps them
    seed = ranks.sampling_seed(cfg.seed, state.step, run.acc)  # each process samples its own answers
    with sharding.whole_weights(run.acc, run.module):  # FSDP2 / ZeRO-3: forwards that differ between processes
        ro = _sample(run, prompts, seed)
        if ro is None:
            return None
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
        where = R.bad_score(ro, bad)  # where the reward raised, its own one-line error (every process stopped)
        where = where or "not finite (or raised) in another process"
        run.watch.stopped(state.step, f"the reward was {where}; the result keeps the policy of step {state.step} "
                          "(a reward must be a finite number)")  # fmt: skip
        return None
    # 7-8 and the PPO epochs (the prepared module's forward runs under accelerate's autocast)
    run.module.train()
    kl_coef = state.kl_ctl.value
    with fastpath.update(run.acc), checkpointing(roles.lm.model, cfg.gradient_checkpointing):
        stats = update(run, ro)
    run.watch.rules.start("ppo/val/loss", stats["val/loss"][0])  # before any update: the value loss alarm's base
    if not run.watch.weights_ok(state.step + 1):  # a weight became nan or inf: the policy of the step before is back
        return None
    state.kl_ctl.update(float((ro.kl.sum(1)).mean()), len(prompts))
    row = step_metrics(ro, stats, kl_coef, cfg, time.monotonic() - t0, t_gen)
    run.emit("samples", state.step + 1, payload=sample_rows(ro))
    notes = skipped_steps_warning(stats, scaled=loss_scaler(run.acc) is not None)
    if run.skipped >= MAX_SKIPPED_STEPS:  # skipped steps left the weights alone
        run.watch.stopped(state.step + 1, skip_reason(run.acc, run.skipped, "the policy from before them"))
        notes.append(run.stop.reason)
    for warning in notes:
        run.emit("warning", state.step + 1, payload=warning)
    return row


def _sample(run: PPORun, prompts: list[str], seed: int) -> R.Rollout | None:
    """Steps 1-2, or None where the policy's next-token probabilities were not finite in some process: the run
    stops with the policy from before the update that made them."""
    try:
        ro, what = R.generate(run.roles, prompts, run.cfg, seed=seed, capture=_capture(run, prompts)), ""
    except divergence.NonFiniteError as e:
        ro, what = None, e.value
    if ranks.any_rank(run.acc, ro is None):  # every process stops together, or DDP would wait forever
        return run.watch.diverged(run.state.step + 1, "the next-token probabilities", what or "non-finite elsewhere")
    return ro


def update(run: PPORun, ro: R.Rollout) -> dict[str, list[float]]:
    """num_ppo_epochs passes over the rollout in minibatches; each minibatch is one optimizer step, computed in
    micro-batches whose gradients add up to the minibatch's.

    When one micro-batch holds the whole batch, epoch 1 reuses its own forward pass as the rollout's logprobs and
    values (the weights have not changed yet), which saves a full forward pass."""
    cfg, n = run.cfg, ro.input_ids.shape[0]
    mbs = min(cfg.mini_batch_size or n, n)  # unset: the whole batch, one optimizer step per epoch
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
        add_chunk_stats(rows, share, pg, vf_loss, vf_clip)
        if ent is not None:
            rows["policy/entropy"] = rows.get("policy/entropy", 0.0) + float(ops.masked_mean(ent, mask)) * share
    _optimizer_step(run, rows)
    for key, val in rows.items():
        stats.setdefault(key, []).append(val)


def _optimizer_step(run: PPORun, rows: dict[str, float]) -> None:
    """Clip and step. Under fp16 the loss scaler skips a step whose gradients overflowed (and lowers its scale);
    without one, a step whose gradient norm is not finite is skipped here. Skips are counted, never silent."""
    params = sharding.trained(run.acc, run.module, run.state.trained)  # FSDP2: the sharded ones
    grad_norm = run.acc.clip_grad_norm_(params, run.cfg.max_grad_norm)
    skipped = step_skipped(grad_norm)
    if not skipped or loss_scaler(run.acc) is not None:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped = run.skipped + 1 if skipped else 0
    rows["skipped_steps"] = float(skipped)
    if not skipped:
        rows["grad_norm"] = float(grad_norm)


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
    return fastpath.chunk_rows(device, trained_share, row_tokens) or cfg.mini_batch_size or cfg.batch_size


def _capture(run: PPORun, prompts: list[str]) -> bool:
    """Whether sampling keeps the policy's logprobs and hidden states: where the update will run in chunks (else
    epoch 1's forward gives them for free)."""
    cfg, acc, mini = run.cfg, run.acc, run.cfg.mini_batch_size or len(prompts)
    width = max(map(len, encode_prompts(run.roles.lm, prompts))) + cfg.max_new_tokens  # the longest possible row
    chunked = min(micro_batch_size(cfg, acc.device, run.share, width), mini) < len(prompts)
    mixed = getattr(acc, "mixed_precision", "no")
    return fastpath.capture_while_sampling(acc.device, chunked=chunked, mixed_precision=mixed)


def _rows(ro: R.Rollout, idx: torch.Tensor) -> R.Rollout:
    rows = R.Rollout([], [], ro.input_ids[idx], ro.attention_mask[idx], ro.start, ro.mask[idx], ro.has_eos[idx])
    if ro.prefix is not None:
        rows.prefix = (ro.prefix[0], ro.prefix[1][idx])
    return rows


def _prompt_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


# ------------------------------------------------------------------------------------------------- setup
def _new_handle(cfg: PPOConfig, name: str, runtime: Runtime) -> PPOHandle:
    """Roles on one base: a PPO adapter on top of the SFT policy; the SFT policy itself is the reference."""
    roles, policy, trained = new_roles(cfg, name, runtime, "ppo")
    value_head = R.value_head_for(cfg.reward, roles.lm, runtime)
    from .kl_control import AdaptiveKLController, FixedKLController

    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl
        else FixedKLController(cfg.kl_coef)
    )
    state = PPOState(roles, value_head, trained + list(value_head.parameters()), kl_ctl)
    parents = (cfg.policy.name, reward_name(cfg.reward))
    return PPOHandle(name, roles.lm, state=state, runtime=runtime, adapter=policy, config=cfg, parents=parents)


def new_roles(cfg: Any, name: str, runtime: Runtime, stage: str) -> tuple[R.Roles, Any, list[nn.Parameter]]:
    """(roles, the policy's adapters, what trains) of a new policy-gradient run (PPO, GRPO) on cfg.policy: a new
    `NAME-stage` adapter stacked on the SFT adapter (or a private fp32 copy of the merged SFT model, with lora off);
    the SFT policy itself is the reference; a reward model on the same base is one more adapter."""
    pol: PolicyHandle = cfg.policy
    if cfg.lora:
        lm, ref_lm = pol.lm, pol.lm
        new = add_adapter(lm, f"{name}-{stage}", cfg.lora)
        policy = [*R.as_list(pol.adapter), new]
        trained = adapter_parameters(lm, new)
    else:
        from .adapters import merged_copy

        model = copy.deepcopy(merged_copy(pol.lm, pol.adapter)).to(runtime.weight_dtype(master=True))
        lm = LoadedModel(pol.lm.spec, model, pol.lm.tokenizer, pol.lm.source)  # fp32 master weights: all train
        ref_lm, policy, trained = pol.lm, None, list(lm.model.parameters())
    reference = pol.adapter
    roles = R.Roles(lm, policy, reference, ref_lm, R.scorer_for(cfg.reward, pol, lm, runtime), runtime.autocast)
    roles.bf16_weights = runtime.precision == "bf16"
    rm = cfg.reward if isinstance(cfg.reward, RewardHandle) and cfg.reward.lm is lm else None
    roles.adapters = (
        *R.as_list(policy),
        *(R.as_list(reference) if ref_lm is lm else []),
        *R.as_list(rm and rm.adapter),
    )
    return roles, policy, trained


def reward_name(reward: Any) -> str:
    """The reward's name in a result's lineage: a handle's name, a function's __name__."""
    return getattr(reward, "name", getattr(reward, "__name__", "reward"))


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
