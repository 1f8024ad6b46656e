"""What the online RL stages (PPO, GRPO) share: the run loop, the roles on one base, sampling, and the checks that
stop a run together in every process. Each stage brings its own step (engine/ppo.py, engine/grpo.py).

The loop of one run, whatever the method:

1. prompts, roles (policy / reference / reward, and PPO's value head, on one base) and the trainable weights
2. optimizer (restored on resume) and accelerate
3. per step: a batch of prompts (each process its own share), the method's step, its metrics averaged over the
   processes, warnings, the step's events, and the divergence watch
4. the result: the summary, the end event, the saved output
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import read_prompts
from ..events import Callback, Emitter, StopControl
from . import divergence, fastpath, ranks, sharding
from . import rollout as R
from .adapters import adapter_parameters, add_adapter, train_only, use_adapter
from .handles import PolicyHandle
from .loop import MAX_SKIPPED_STEPS, loss_scaler, make_optimizer, skip_reason, step_skipped
from .models import LoadedModel
from .ppo_monitor import skipped_steps_warning
from .reward_model import RewardHandle
from .runtime import Runtime, seed_everything


@dataclass
class Run:
    """What every step of one run shares: the prepared module and optimizer, the roles and the settings."""

    module: Any  # the policy (and PPO's value head) as accelerate prepared it
    optimizer: Any
    acc: Any
    state: Any  # the method's resumable state: roles, trained weights, step, optimizer state, monitor
    cfg: Any
    emit: Emitter
    stop: StopControl
    share: float = 1.0  # the share of the layers that run with gradients (above a shared frozen prefix)
    skipped: int = 0  # optimizer steps skipped in a row (gradients not finite)
    watch: divergence.Watch | None = None  # NaN, inf and divergence alarms; the last good policy

    @property
    def roles(self) -> R.Roles:
        return self.state.roles


@dataclass(frozen=True)
class Method:
    """An online RL method's parts of the loop."""

    stage: str  # the event stream's name, and where a handle keeps its resumable state (handle.ppo, handle.grpo)
    check_memory: Callable[..., None]  # (cfg, prompts, runtime, previous): refuse an update that cannot fit
    new_handle: Callable[[Any, str, Runtime], Any]  # (cfg, name, runtime)
    prepare: Callable[..., Run]  # (cfg, runtime, state, emit, stop)
    step: Callable[[Run, list[str]], dict[str, float] | None]  # one rollout and its updates; None stops the run
    reduce: Callable[[Run, dict[str, float] | None], dict[str, float] | None]  # the mean over processes
    warnings: Callable[[Run, dict[str, float]], list[str]]  # on the whole batch's metrics
    summary: Callable[[Any, StopControl], dict[str, Any]]


def train(
    method: Method,
    cfg: Any,
    name: str,
    runtime: Runtime,
    *,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    previous: Any = None,
) -> Any:
    stop = stop or StopControl()
    emit = Emitter(method.stage, callbacks)
    seed_everything(cfg.seed)
    # 1. prompts, roles and the trainable weights
    prompts = read_prompts(cfg.prompts)
    method.check_memory(cfg, prompts, runtime, previous)  # the update fits: refused before anything is set up
    handle = previous if previous is not None else method.new_handle(cfg, name, runtime)
    state = getattr(handle, method.stage)
    roles = state.roles
    train_only(roles.lm.model, state.trained)
    roles.depth = fastpath.prefix_depth(roles.lm.model, roles.adapters)  # after train_only: the trainables are known
    # 2. optimizer (restored on resume) and accelerate
    run = method.prepare(cfg, runtime, state, emit, stop)
    emit.total = state.step + cfg.steps
    emit("start", state.step, payload={"config": cfg, "prompts": len(prompts), "handle": handle})
    order = prompt_order(len(prompts), cfg.seed + state.step)
    try:
        with stop.catch_interrupt(), use_adapter(roles.lm, handle.adapter), fastpath.lean_layers(mlp=True):
            # 3. the loop: one rollout and its updates per step, metrics and warnings after each
            for _ in range(cfg.steps):
                batch = ranks.prompt_batch(prompts, order, state.step, cfg.batch_size, run.acc)
                row = method.reduce(run, method.step(run, batch))
                if row is None:
                    break
                for warning in method.warnings(run, row):
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
    handle.metrics.summary.update({**method.summary(handle, stop), **run.watch.summary()})
    emit("end", state.step, payload={"reason": stop.reason or "done"})
    if cfg.output_dir and runtime.is_main_process:
        handle.save(cfg.output_dir, overwrite=True)  # a re-run of the stage replaces its own output
    return handle


def prepare(
    cfg: Any,
    runtime: Runtime,
    state: Any,
    emit: Emitter,
    stop: StopControl,
    *,
    module: nn.Module,
    batch_size: int | None,
    rules: type[divergence.Rules] = divergence.Rules,
) -> Run:
    """Step 2: the optimizer over what trains (restored on resume), `module` and the optimizer through accelerate,
    and the divergence watch over the weights the optimizer steps."""
    default_lr, acc = 1e-4 if cfg.lora else 3e-6, runtime.accelerator(1)
    lr = cfg.lr or default_lr
    optimizer = make_optimizer(state.trained, lr, runtime.device)
    if state.optimizer_state:
        optimizer.load_state_dict(state.optimizer_state)
    with warnings.catch_warnings():  # transformers 5 deprecation chatter from accelerate's model checks
        warnings.simplefilter("ignore", FutureWarning)
        module, optimizer = sharding.prepare(acc, module, optimizer, batch_size=batch_size)
    share = fastpath.trained_share(state.roles.lm.model, state.roles.depth)
    alarms = rules("ppo", divergence.vocab_size(state.roles.lm.model), divergence.lr_fix(lr, default_lr))
    trained = sharding.trained(acc, module, state.trained)  # under FSDP2: the sharded weights the optimizer steps
    watch = divergence.watch(trained, alarms, emit=emit, stop=stop, cfg=cfg, acc=acc, step=state.step)
    return Run(module, optimizer, acc, state, cfg, emit, stop, share, watch=watch)


def sample(run: Run, rows: list[str], seed: int, *, capture: bool = False) -> R.Rollout | None:
    """The rollout, or None where the policy's next-token probabilities were not finite in some process: the run
    stops with the policy from before the update that made them."""
    try:
        ro, what = R.generate(run.roles, rows, run.cfg, seed=seed, capture=capture), ""
    except divergence.NonFiniteError as e:
        ro, what = None, e.value
    if ranks.any_rank(run.acc, ro is None):  # every process stops together, or DDP would wait forever
        return run.watch.diverged(run.state.step + 1, "the next-token probabilities", what or "non-finite elsewhere")
    return ro


def bad_scores(run: Run, ro: R.Rollout) -> bool:
    """True (the run stops, in every process together) where a score is not finite or the reward raised (then its
    own one-line error)."""
    bad = R.first_bad_score(ro.scores)
    if not ranks.any_rank(run.acc, bad is not None):  # every process stops together, or DDP would wait forever
        return False
    where = R.bad_score(ro, bad) or "not finite (or raised) in another process"
    step = run.state.step
    run.watch.stopped(step, f"the reward was {where}; the result keeps the policy of step {step} "
                      "(a reward must be a finite number)")  # fmt: skip
    return True


def optimizer_step(run: Run, rows: dict[str, float]) -> None:
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


def skipped_step_warnings(run: Run, stats: dict[str, list[float]]) -> None:
    """After the updates: a warning for optimizer steps skipped on non-finite gradients, and the run stops after
    MAX_SKIPPED_STEPS of them in a row (they left the weights alone)."""
    notes = skipped_steps_warning(stats, scaled=loss_scaler(run.acc) is not None)
    if run.skipped >= MAX_SKIPPED_STEPS:
        run.watch.stopped(run.state.step + 1, skip_reason(run.acc, run.skipped, "the policy from before them"))
        notes.append(run.stop.reason)
    for warning in notes:
        run.emit("warning", run.state.step + 1, payload=warning)


def rows_of(ro: R.Rollout, idx: torch.Tensor) -> R.Rollout:
    """The rollout's rows `idx` (their tokens, masks and shared prompt prefix), for a chunk of the update."""
    rows = R.Rollout([], [], ro.input_ids[idx], ro.attention_mask[idx], ro.start, ro.mask[idx], ro.has_eos[idx])
    if ro.prefix is not None:
        rows.prefix = (ro.prefix[0], ro.prefix[1][idx])
    return rows


def prompt_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


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
