"""PPO with a per-token KL penalty to the frozen SFT policy, on one shared base model.

Roles on one set of base weights: the policy is the SFT adapter plus a new PPO adapter stacked on it (or a new
adapter on a fully fine-tuned SFT model), the reference is the SFT adapter alone (or adapters off), the value
function is a head on the policy's own trunk (one forward gives logprobs and values), and a reward model trained
from the same SFT model is one more adapter.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops
from ..config import PPOConfig
from ..events import Callback, Emitter, StopControl
from . import fastpath, memory, online, ranks, sharding
from . import rollout as R
from .generation import encode_prompts
from .handles import PolicyHandle
from .loop import MAX_SKIPPED_STEPS, checkpointing
from .models import LoadedModel
from .modules import PolicyValue
from .ppo_monitor import Monitor, add_chunk_stats, sample_rows, step_metrics
from .runtime import Runtime, in_runtime_scope


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


PPORun = online.Run  # what every step of one run shares (engine/online.py)


@in_runtime_scope
def train_ppo(
    cfg: PPOConfig,
    name: str,
    runtime: Runtime,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    previous: PPOHandle | None = None,
) -> PPOHandle:
    """A PPO run: the online loop of engine/online.py with PPO's step, resumable from `previous`."""
    method = online.Method(
        "ppo",
        check_memory=memory.check_ppo,
        new_handle=_new_handle,
        prepare=_prepare,
        step=ppo_step,  # looked up per run: a test's spy on ppo_step takes its place
        reduce=ranks.reduce_row,
        warnings=lambda run, row: run.state.monitor.check(row, run.cfg),
        summary=_summary,
    )
    return online.train(method, cfg, name, runtime, callbacks=callbacks, stop=stop, previous=previous)


def _prepare(cfg: PPOConfig, runtime: Runtime, state: PPOState, emit: Emitter, stop: StopControl) -> PPORun:
    module = PolicyValue(state.roles.lm.model, state.value_head)  # one trunk forward: logprobs and values
    return online.prepare(cfg, runtime, state, emit, stop, module=module, batch_size=cfg.mini_batch_size)


def ppo_step(run: PPORun, prompts: list[str]) -> dict[str, float] | None:
    """One rollout and its updates. Returns the step's metrics, or None when the run stops: the sampling
    probabilities, the rewards or the updated weights were not finite."""
    roles, state, cfg = run.roles, run.state, run.cfg
    t0 = time.monotonic()
    run.module.eval()  # generation and scoring; dropout is off anyway
    # 1-3. sample; the policy's logprobs (and values) come from the decode steps where the fast path keeps them
    seed = ranks.sampling_seed(cfg.seed, state.step, run.acc)  # each process samples its own answers
    with sharding.whole_weights(run.acc, run.module):  # FSDP2 / ZeRO-3: forwards that differ between processes
        ro = online.sample(run, prompts, seed, capture=_capture(run, prompts))
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
    if online.bad_scores(run, ro):
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
    online.skipped_step_warnings(run, stats)
    return row


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
            lp, v, ent = R.policy_forward(run.module, online.rows_of(ro, chunk), cfg.temperature, entropy=entropy)
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
    online.optimizer_step(run, rows)
    for key, val in rows.items():
        stats.setdefault(key, []).append(val)


@torch.no_grad()
def _old_logprobs_and_values(run: PPORun, ro: R.Rollout, micro: int) -> None:
    """Step 3 by forward passes in chunks, where sampling did not keep the policy's logprobs and values."""
    if ro.logprobs is not None:
        return
    with run.acc.autocast():
        for idx in torch.arange(ro.input_ids.shape[0]).split(micro):
            lp, v, _ = R.policy_forward(run.module, online.rows_of(ro, idx), run.cfg.temperature, entropy=False)
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


# ------------------------------------------------------------------------------------------------- setup
def _new_handle(cfg: PPOConfig, name: str, runtime: Runtime) -> PPOHandle:
    """Roles on one base: a PPO adapter on top of the SFT policy; the SFT policy itself is the reference."""
    roles, policy, trained = online.new_roles(cfg, name, runtime, "ppo")
    value_head = R.value_head_for(cfg.reward, roles.lm, runtime)
    from .kl_control import AdaptiveKLController, FixedKLController

    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl
        else FixedKLController(cfg.kl_coef)
    )
    state = PPOState(roles, value_head, trained + list(value_head.parameters()), kl_ctl)
    parents = (cfg.policy.name, online.reward_name(cfg.reward))
    return PPOHandle(name, roles.lm, state=state, runtime=runtime, adapter=policy, config=cfg, parents=parents)


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
