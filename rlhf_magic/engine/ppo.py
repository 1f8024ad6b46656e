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
from ..errors import ConfigError
from ..events import Callback, Emitter, StopControl
from . import cpu_bf16, cpu_pool
from . import rollout as R
from .adapters import adapter_parameters, add_adapter, lean_lora, train_only, use_adapter
from ..data import read_prompts
from .generation import encode_prompts
from .handles import PolicyHandle
from .loop import make_optimizer
from .models import LoadedModel
from .modules import PolicyValue, frozen_depth, lean_mlp
from .ppo_monitor import Monitor, step_metrics
from .reward_model import RewardHandle, make_head
from .runtime import Runtime, release_free_memory, seed_everything


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

    def __init__(
        self,
        name: str,
        lm: LoadedModel,
        adapter: Any,
        config: Any,
        parents: Sequence[str],
        runtime: Runtime,
        state: PPOState,
    ):
        super().__init__(name, "ppo", lm, adapter, config, parents, runtime)
        self.ppo = state

    def trainable_parameters(self) -> list[Any]:
        return list(self.ppo.trained)


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
    roles.depth = frozen_depth(roles.lm.model, roles.adapters)  # after train_only: what is trainable is known
    # 2. optimizer (restored on resume) and accelerate
    lr = cfg.lr or (1e-4 if cfg.lora else 3e-6)
    acc = runtime.accelerator(1)
    optimizer = make_optimizer(state.trained, lr, runtime.device)
    if state.optimizer_state:
        optimizer.load_state_dict(state.optimizer_state)
    with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
        warnings.simplefilter("ignore", FutureWarning)
        module, optimizer = acc.prepare(PolicyValue(roles.lm.model, state.value_head), optimizer)
    emit.total = state.step + cfg.steps
    emit("start", state.step, payload={"config": cfg, "prompts": len(prompts), "handle": handle})
    order = _prompt_order(len(prompts), cfg.seed + state.step)
    try:
        with stop.catch_interrupt(), use_adapter(roles.lm, handle.adapter), lean_lora(), lean_mlp():
            # 3. the loop: one rollout and its PPO epochs per step, metrics and warnings after each
            for _ in range(cfg.steps):
                batch = [prompts[order[(state.step * cfg.batch_size + i) % len(order)]] for i in range(cfg.batch_size)]
                row = ppo_step(module, optimizer, acc, roles, state, cfg, batch, emit, stop)
                if row is None:
                    break
                state.step += 1
                handle.metrics.log(state.step, row)
                emit("step", state.step, row)
                if stop.requested:
                    break
    finally:
        train_only(roles.lm.model, [])
        state.optimizer_state = optimizer.state_dict()
        acc.free_memory()
    # 4. the result
    handle.metrics.summary.update(_summary(handle, stop))
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir)
    return handle


def ppo_step(
    module: PolicyValue,
    optimizer: Any,
    acc: Any,
    roles: R.Roles,
    state: PPOState,
    cfg: PPOConfig,
    prompts: list[str],
    emit: Emitter,
    stop: StopControl,
) -> dict[str, float] | None:
    """One rollout and its updates. Returns the step's metrics, or None when the rewards were not finite."""
    t0 = time.monotonic()
    module.eval()  # generation and scoring; dropout is off anyway
    layers = getattr(roles.lm.model.config, "num_hidden_layers", 0) or 1
    share = (layers - roles.depth) / layers if roles.depth > 0 else 1.0  # layers that run with gradients
    # step 3 from the decode steps when the update runs in chunks (else epoch 1's forward gives it for free)
    width = max(map(len, encode_prompts(roles.lm, prompts))) + cfg.max_new_tokens  # the longest possible row
    capture = min(micro_batch_size(cfg, acc.device, share, width), cfg.mini_batch_size) < len(prompts)
    capture = capture and getattr(acc, "mixed_precision", "no") == "no"  # fp32: decode and forward agree
    ro = R.generate(roles, prompts, cfg, seed=cfg.seed * 100_003 + state.step, capture=capture)
    if ro.hidden is not None:
        with torch.no_grad():
            ro.values = state.value_head(ro.hidden.float()).squeeze(-1)
        ro.hidden = None
    t_gen = time.monotonic() - t0
    R.share_prefix(roles, ro)
    ro.ref_logprobs = R.reference_logprobs(roles, ro, cfg.temperature)
    R.score(roles, ro, cfg.missing_eos_penalty)
    bad = R.first_bad_score(ro.scores)
    if bad is not None:
        stop.request(
            f"the reward was {float(ro.scores[bad])} for answer {bad} ({ro.texts[bad][:60]!r}); the "
            f"result keeps the policy of step {state.step}"
        )
        emit("warning", state.step, payload=stop.reason)
        return None
    module.train()
    # the prepared module's forward runs under accelerate's autocast; the chunks reuse each other's memory
    with cpu_bf16.kernels_for(acc), cpu_pool.pooled(acc.device):
        stats = update(module, optimizer, acc, ro, cfg, state.kl_ctl.value, state.trained, share)
    kl_coef = state.kl_ctl.value
    state.kl_ctl.update(float((ro.kl.sum(1)).mean()), len(prompts))
    row = step_metrics(ro, stats, kl_coef, cfg, time.monotonic() - t0, t_gen)
    emit("samples", state.step + 1, payload=_samples(ro))
    for warning in state.monitor.check(row, cfg):
        emit("warning", state.step + 1, payload=warning)
    return row


def update(
    module: PolicyValue,
    optimizer: Any,
    acc: Any,
    ro: R.Rollout,
    cfg: PPOConfig,
    kl_coef: float,
    params: list[nn.Parameter],
    trained_share: float = 1.0,
) -> dict[str, list[float]]:
    """num_ppo_epochs passes of minibatches, each minibatch in micro-batches (gradients add up to the same step).

    When one micro-batch holds the whole batch, epoch 1 reuses its own forward pass as the rollout's logprobs and
    values (the weights have not changed yet), which saves a full forward pass."""
    n = ro.input_ids.shape[0]
    mbs = min(cfg.mini_batch_size, n)
    micro = min(micro_batch_size(cfg, acc.device, trained_share, ro.input_ids.shape[1]), mbs)
    micro = -(-mbs // -(-mbs // micro))  # chunks of even size: 8 answers at most 7 a chunk run as 4 + 4, not 7 + 1
    stats: dict[str, list[float]] = {}
    merged = micro >= n
    if not merged and ro.logprobs is None:  # else: logprobs and values captured while sampling
        with torch.no_grad(), acc.autocast():
            for idx in torch.arange(n).split(micro):
                lp, v, _ = R.policy_forward(module, _rows(ro, idx), cfg.temperature, entropy=False)
                ro.logprobs = lp if ro.logprobs is None else torch.cat([ro.logprobs, lp])
                ro.values = v.float() if ro.values is None else torch.cat([ro.values, v.float()])
    if not merged:
        R.advantages(ro, cfg, kl_coef)
    for epoch in range(cfg.num_ppo_epochs):
        perm = torch.arange(n) if merged else torch.randperm(n)
        for i in range(0, n, mbs):
            _minibatch(
                module,
                perm[i : i + mbs],
                micro,
                ro,
                cfg,
                kl_coef,
                optimizer,
                acc,
                params,
                stats,
                first=merged and epoch == 0,
                entropy=epoch == 0,
            )
    return stats


CPU_CHUNK_TOKENS = 768  # tokens per chunk that run every layer with gradients, on a CPU (see micro_batch_size)


def micro_batch_size(cfg: PPOConfig, device: Any, trained_share: float = 1.0, row_tokens: int = 0) -> int:
    """Answers per forward/backward chunk: cfg.micro_batch_size, else the whole minibatch on an accelerator and,
    on a CPU, as many rows of `row_tokens` tokens as keep about CPU_CHUNK_TOKENS tokens running with gradients.
    That bounds peak memory: 8 answers of 41 + 48 tokens of SmolLM2-135M with LoRA run as one chunk, and the
    process peaks at ~1.5x one copy of the model in inference (1.2x in chunks of 4, ~10% slower). With a shared
    frozen prefix only the top `trained_share` of the layers run with gradients, so more rows fit."""
    if cfg.micro_batch_size:
        return cfg.micro_batch_size
    if getattr(device, "type", str(device)) != "cpu":
        return cfg.mini_batch_size
    per_row = max(row_tokens, 1) * max(trained_share, 1e-3)
    return max(1, int(CPU_CHUNK_TOKENS // per_row))


def _minibatch(module, idx, micro, ro, cfg, kl_coef, optimizer, acc, params, stats, first, entropy) -> None:  # type: ignore[no-untyped-def]
    """One optimizer step over the minibatch `idx`; each chunk's loss is weighted by its share of the tokens,
    so the summed gradients equal those of the minibatch's masked-mean loss."""
    total = ro.mask[idx].sum().clamp_min(1)
    rows: dict[str, float] = {}
    for chunk in idx.split(micro):
        release_free_memory(acc.device)  # the last chunk's activations: back to the OS before the next forward
        with acc.autocast(), cpu_bf16.saved_activations():
            lp, v, ent = R.policy_forward(module, _rows(ro, chunk), cfg.temperature, entropy=entropy)
        if first:
            ro.logprobs, ro.values = lp.detach(), v.detach().float()
            R.advantages(ro, cfg, kl_coef)
        mask, share = ro.mask[chunk], float(ro.mask[chunk].sum() / total)
        pg = ops.clipped_surrogate_loss(lp, ro.logprobs[chunk], ro.advantages[chunk], mask, cfg.cliprange)
        vf_loss, vf_clip = ops.clipped_value_loss(
            v.float(), ro.values[chunk], ro.returns[chunk], mask, cfg.cliprange_value
        )
        acc.backward((pg.loss + cfg.vf_coef * vf_loss) * share)
        for key, val in {
            "policy/loss": pg.loss,
            "policy/clipfrac": pg.clipfrac,
            "policy/approxkl": pg.approx_kl,
            "val/loss": vf_loss,
            "val/clipfrac": vf_clip,
        }.items():
            rows[key] = rows.get(key, 0.0) + float(val.detach()) * share
        rows["policy/ratio_max"] = max(rows.get("policy/ratio_max", 0.0), float(pg.ratio_max))
        if ent is not None:
            rows["policy/entropy"] = rows.get("policy/entropy", 0.0) + float(ops.masked_mean(ent, mask)) * share
    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm)
    if torch.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    rows["grad_norm"] = float(grad_norm)
    for key, val in rows.items():
        stats.setdefault(key, []).append(val)


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

        lm = LoadedModel(pol.lm.spec, copy.deepcopy(merged_copy(pol.lm, pol.adapter)), pol.lm.tokenizer, pol.lm.source)
        ref_lm, policy, trained = pol.lm, None, list(lm.model.parameters())
    reference = pol.adapter
    value_head = _value_head(cfg.reward, lm, runtime)
    roles = R.Roles(lm, policy, reference, ref_lm, _scorer(cfg.reward, pol, lm, runtime), runtime.autocast)
    roles.bf16_weights = runtime.precision == "bf16"
    rm = cfg.reward if isinstance(cfg.reward, RewardHandle) and cfg.reward.lm is lm else None
    roles.adapters = (*_as_list(policy), *(_as_list(reference) if ref_lm is lm else []), *_as_list(rm and rm.adapter))
    from ..ops import AdaptiveKLController, FixedKLController

    kl_ctl = (
        AdaptiveKLController(cfg.kl_coef, cfg.target_kl, cfg.kl_horizon)
        if cfg.target_kl
        else FixedKLController(cfg.kl_coef)
    )
    state = PPOState(roles, value_head, trained + list(value_head.parameters()), kl_ctl)
    parents = (pol.name, getattr(cfg.reward, "name", getattr(cfg.reward, "__name__", "reward")))
    return PPOHandle(name, lm, policy, cfg, parents, runtime, state)


def _as_list(adapter: Any) -> list[str]:
    if adapter is None:
        return []
    return [adapter] if isinstance(adapter, str) else list(adapter)


def _value_head(reward: Any, lm: LoadedModel, runtime: Runtime) -> nn.Linear:
    """Initialised from the reward head where the reward model shares the base, else like a reward head."""
    head = make_head(lm.model.config.hidden_size, runtime.device)
    if isinstance(reward, RewardHandle) and reward.head.weight.shape == head.weight.shape:
        head.load_state_dict(reward.head.state_dict())
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
