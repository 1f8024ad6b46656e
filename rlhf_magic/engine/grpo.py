"""GRPO and RLOO: G answers to every prompt, each judged against the others of its group; no value model.

The roles are PPO's, on one base (engine/online.py: new_roles): the policy is a new adapter stacked on the SFT adapter,
the reference is the SFT adapter alone (beta = 0 skips it), a reward model on the same base is one more adapter.
A step, after the numbered steps of engine/rollout.py:

1. sample num_generations answers for each of batch_size prompts, cut after the first EOS (PPO's rollout)
2. reference logprobs (beta > 0), scores (one batched reward call), the missing-EOS penalty
3. group advantages (ops_group.py: GRPO's scaled or Dr. GRPO's unscaled group mean, or RLOO's leave-one-out mean)
4. num_iterations optimizer steps on the clipped loss with the k3 KL inside, in chunks whose gradients add up to
   the batch's. The first iteration's forward passes, before any update, give the old logprobs: no extra pass.

A group whose rewards are all equal has advantages 0: it is counted (grpo/frac_reward_zero_std, the summary) and
a step in which every group is so gets a warning. The run's loop (stop, resume, the divergence watch, several
processes, sharded weights) is engine/online.py's, shared with PPO.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import ops, ops_group
from ..config import GRPOConfig
from ..errors import ConfigError
from ..events import Callback, Emitter, StopControl
from . import divergence, fastpath, memory, online, ranks, sharding
from . import rollout as R
from .generation import check_new_tokens, encode_prompts
from .grpo_monitor import AS_PPO, reduce_row, sample_rows, step_metrics, summary, warnings_after
from .handles import PolicyHandle
from .loop import MAX_SKIPPED_STEPS, checkpointing
from .models import LoadedModel
from .modules import OverModel, head_logprobs, response_hidden
from .ppo_monitor import Monitor
from .runtime import Runtime, in_runtime_scope


@dataclass
class GRPOState:
    """What a resumed run needs: roles, the trained weights, optimizer state, progress and the group counts."""

    roles: R.Roles
    trained: list[nn.Parameter]
    step: int = 0
    optimizer_state: dict | None = None
    groups: int = 0  # groups sampled so far (all processes)
    groups_zero_std: int = 0  # of them, groups whose rewards were all equal (advantages 0)
    monitor: Monitor = field(default_factory=Monitor)


class GRPOHandle(PolicyHandle):
    """A GRPO (or RLOO) policy: a policy handle plus the state that `resume = True` continues from."""

    def __init__(self, name: str, lm: LoadedModel, *, state: GRPOState, **handle: Any):
        super().__init__(name, "grpo", lm, **handle)
        self.grpo = state

    def trainable_parameters(self) -> list[Any]:
        return list(self.grpo.trained)


class PolicyLogprobs(OverModel):
    """The policy alone (no value head): one trunk forward gives the response tokens' log-probs and entropy."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        prefix: fastpath.Prefix | None = None,
        *,
        temperature: float = 1.0,
        entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = response_hidden(self.model, input_ids, attention_mask, start, prefix)
        out = head_logprobs(self.model, hidden, input_ids[:, start:], temperature, entropy)
        return out.logprobs, out.entropy


class Rules(divergence.Rules):
    """PPO's alarms (no value loss) on GRPO's metrics: non-finite losses, entropy collapse or noise, empty answers."""

    def check(self, step: int, row: dict[str, float]) -> divergence.Alarm | None:
        return super().check(step, {AS_PPO.get(k, k): v for k, v in row.items()})

    def _ppo(self, row: dict[str, float]) -> Any:
        for kind, text, fix in super()._ppo(row):
            yield kind, text, fix.replace("kl_coef", "beta")


GRPORun = online.Run  # what every step of one run shares (engine/online.py)


@in_runtime_scope
def train_grpo(
    cfg: GRPOConfig,
    name: str,
    runtime: Runtime,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    previous: GRPOHandle | None = None,
) -> GRPOHandle:
    """A GRPO (or RLOO) run: the online loop of engine/online.py with GRPO's step, resumable from `previous`."""
    method = online.Method(
        "grpo",
        check_memory=check_memory,
        new_handle=_new_handle,
        prepare=_prepare,
        step=grpo_step,
        reduce=lambda run, row: reduce_row(run.acc, row),
        warnings=warnings_after,
        summary=summary,
    )
    return online.train(method, cfg, name, runtime, callbacks=callbacks, stop=stop, previous=previous)


def _prepare(cfg: GRPOConfig, runtime: Runtime, state: GRPOState, emit: Emitter, stop: StopControl) -> GRPORun:
    rows = cfg.micro_batch_size or cfg.batch_size * cfg.num_generations
    module = PolicyLogprobs(state.roles.lm.model)
    return online.prepare(cfg, runtime, state, emit, stop, module=module, batch_size=rows, rules=Rules)


def grpo_step(run: GRPORun, prompts: list[str]) -> dict[str, float] | None:
    """One rollout of len(prompts) groups and its updates. Returns the step's metrics, or None when the run stops:
    the sampling probabilities, the rewards or the updated weights were not finite."""
    roles, state, cfg = run.roles, run.state, run.cfg
    t0 = time.monotonic()
    run.module.eval()
    # 1-2. sample G answers per prompt (each process its own), reference logprobs and scores
    seed = ranks.sampling_seed(cfg.seed, state.step, run.acc)
    rows = [p for p in prompts for _ in range(cfg.num_generations)]  # a group's answers are consecutive
    with sharding.whole_weights(run.acc, run.module):  # FSDP2 / ZeRO-3: forwards that differ between processes
        ro = online.sample(run, rows, seed)
        if ro is None:
            return None
        t_gen = time.monotonic() - t0
        R.share_prefix(roles, ro)
        if cfg.beta > 0:
            ro.ref_logprobs = R.reference_logprobs(roles, ro, cfg.temperature)
        R.score(roles, ro, cfg.missing_eos_penalty)
    if online.bad_scores(run, ro):
        return None
    # 3. each answer against its group
    groups = ops_group.group_advantages(
        ro.scores, cfg.num_generations, scale_rewards=cfg.scale_rewards, algorithm=cfg.algorithm
    )
    ro.advantages = groups.advantages
    # 4. the updates (the prepared module's forward runs under accelerate's autocast)
    run.module.train()
    with fastpath.update(run.acc), checkpointing(roles.lm.model, cfg.gradient_checkpointing):
        stats = update(run, ro)
    if not run.watch.weights_ok(state.step + 1):  # a weight became nan or inf: the policy of the step before is back
        return None
    row = step_metrics(ro, groups, stats, time.monotonic() - t0, t_gen)
    run.emit("samples", state.step + 1, payload=sample_rows(ro, cfg.num_generations))
    online.skipped_step_warnings(run, stats)
    return row


def update(run: GRPORun, ro: R.Rollout) -> dict[str, list[float]]:
    """num_iterations optimizer steps on the whole batch, each computed in chunks whose losses are their parts of
    the batch's loss, so the summed gradients are the batch's. "token" divides by the tokens of the whole batch
    (with several processes by the mean over processes, so DDP's mean of their gradients divides by all of them:
    TRL's "dapo"); "sequence" averages the answers' token means."""
    cfg, acc, n = run.cfg, run.acc, ro.input_ids.shape[0]
    micro = micro_batch_size(cfg, acc.device, run.share, ro.input_ids.shape[1], acc.num_processes)
    micro = -(-n // -(-n // micro))  # chunks of even size
    local = ro.mask.sum()
    scale = 1.0  # the loss over this process's tokens, rescaled to the processes' mean token count
    if cfg.loss_type == "token" and acc.num_processes > 1:
        scale = float(local) / max(float(acc.reduce(local.float().reshape(1), "mean")), 1.0)
    old = torch.zeros(ro.mask.shape, dtype=torch.float32, device=ro.mask.device)
    stats: dict[str, list[float]] = {}
    for iteration in range(cfg.num_iterations):
        rows: dict[str, float] = {}
        for idx in torch.arange(n, device=ro.mask.device).split(micro):
            chunk = online.rows_of(ro, idx)
            with acc.autocast(), fastpath.chunk(acc.device):
                lp, ent = run.module(chunk.input_ids, chunk.attention_mask, ro.start, chunk.prefix,
                                     temperature=cfg.temperature, entropy=iteration == 0)  # fmt: skip
            if iteration == 0:  # no update yet: these are the rollout policy's own logprobs
                old[idx] = lp.detach().float()
            ref = None if ro.ref_logprobs is None else ro.ref_logprobs[idx]
            part = ops_group.grpo_loss(
                lp, old[idx], ro.advantages[idx], chunk.mask, cliprange=cfg.cliprange, beta=cfg.beta,
                ref_logprobs=ref, loss_type=cfg.loss_type, total_tokens=local, total_rows=n,
            )  # fmt: skip
            acc.backward(part.loss * scale)
            _add_chunk_stats(rows, part, ent, chunk.mask, float(chunk.mask.sum() / local.clamp_min(1)))
        online.optimizer_step(run, rows)
        for key, val in rows.items():
            stats.setdefault(key, []).append(val)
        if run.skipped >= MAX_SKIPPED_STEPS:
            break
    return stats


def _add_chunk_stats(rows: dict[str, float], part: ops_group.GroupLoss, ent: Any, mask: Any, share: float) -> None:
    """Add a chunk's loss and metrics (each its part of the batch's token mean) to the optimizer step's `rows`."""
    rows["loss"] = rows.get("loss", 0.0) + float(part.loss.detach())
    rows["clip_ratio/region_mean"] = rows.get("clip_ratio/region_mean", 0.0) + float(part.clip_ratio)
    rows["kl"] = rows.get("kl", 0.0) + float(part.kl)  # 0 without a reference (beta = 0): not shown then
    if ent is not None:
        rows["entropy"] = rows.get("entropy", 0.0) + float(ops.masked_mean(ent, mask)) * share


def micro_batch_size(cfg: GRPOConfig, device: Any, trained_share: float, row_tokens: int, processes: int = 1) -> int:
    """Answers per forward/backward chunk: cfg.micro_batch_size, else the whole batch with several processes
    (every process must run the same passes, which DDP synchronises) or on a GPU, else what the CPU fast path keeps
    in bounded memory (rows of `row_tokens` tokens, `trained_share` of the layers with gradients)."""
    whole = cfg.batch_size * cfg.num_generations
    if cfg.micro_batch_size:
        return min(cfg.micro_batch_size, whole)
    if processes > 1:
        return whole
    return min(fastpath.chunk_rows(device, trained_share, row_tokens) or whole, whole)


def check_chunks(cfg: GRPOConfig) -> None:
    """Under DeepSpeed every backward pass ends in an optimizer step, so a batch must be one pass."""
    whole = cfg.batch_size * cfg.num_generations
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (cfg.micro_batch_size or whole) < whole:
        raise ConfigError(
            f"micro_batch_size = {cfg.micro_batch_size}: under DeepSpeed every backward pass ends in an optimizer "
            "step, so a batch must be one pass; leave micro_batch_size unset"
        )


def check_memory(cfg: GRPOConfig, prompts: list[str], runtime: Any, previous: GRPOHandle | None = None) -> None:
    """Refuse, before anything is set up, a run whose update cannot fit: one chunk (rows of the longest prompt plus
    max_new_tokens) with gradients, the gradients and optimizer state of what trains, and for a new full
    fine-tuning run its fp32 copy of the policy. Sampling's KV cache is checked where it samples."""
    holder = previous or cfg.policy
    lm = holder.lm
    ids = encode_prompts(lm, prompts)
    check_new_tokens(lm, ids, cfg.max_new_tokens)  # a length the context cannot hold is named as such, first
    width = max(map(len, ids), default=0) + cfg.max_new_tokens
    rows = micro_batch_size(cfg, runtime.device, 1.0, width, ranks.processes())
    lora = cfg.lora
    work = memory.Workload(
        "lora" if lora else "full", rows, width, lora.r if lora else 0, lora.layers if lora else None,
        cfg.gradient_checkpointing, logits=False,
    ).under(runtime)  # fmt: skip
    lower = "micro_batch_size, max_new_tokens, batch_size or num_generations"
    label = f"GRPO on {getattr(holder, 'name', lm.spec)!r}"
    memory.check_work(work, lm.model, runtime.device, label=label, copy=not lora and previous is None, lower=lower)


def _new_handle(cfg: GRPOConfig, name: str, runtime: Runtime) -> GRPOHandle:
    roles, policy, trained = online.new_roles(cfg, name, runtime, "grpo")
    parents = (cfg.policy.name, online.reward_name(cfg.reward))
    state = GRPOState(roles, trained)
    return GRPOHandle(name, roles.lm, state=state, runtime=runtime, adapter=policy, config=cfg, parents=parents)
