"""The public Python API: one function per stage. The magics and the CLI are thin layers over these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .comparison import Comparison, WinRate, compare
from .config import DPOConfig, GRPOConfig, PPOConfig, RewardConfig, SFTConfig
from .errors import ConfigError
from .events import Callback, StopControl
from .validation import with_options

__all__ = ["Comparison", "WinRate", "compare", "dpo", "grpo", "load_policy", "load_reward", "ppo", "reward", "sft"]


def _config(cls: type, config: Any, settings: dict[str, Any]) -> Any:
    """`config` (or the defaults) with `settings` on top, checked as a cell's settings are, whoever built it; a
    `report_to` tracker that is not installed is refused here, before anything loads."""
    from .engine import tracking

    cfg = with_options(cls, config, settings)
    tracking.check(cfg.report_to)
    return cfg


def _views(stage: str, name: str, progress: bool, callbacks: Sequence[Callback], stop: StopControl, cfg: Any) -> list:
    """The caller's callbacks, the live view and the `report_to` tracker (the last two on the main process only)."""
    from .engine import tracking

    views = list(callbacks)
    if progress and os.environ.get("RANK", "0") == "0":  # under accelerate launch only the main process shows it
        from .widgets.live import live_view

        views.insert(0, live_view(stage, f"%%{stage} {name}", stop))
    tracker = tracking.tracker_view(cfg.report_to, stage, name)
    return views if tracker is None else [*views, tracker]


def sft(
    name: str = "sft",
    *,
    config: SFTConfig | None = None,
    session: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    trust_remote_code: bool = False,
    **settings: Any,
) -> Any:
    """Supervised fine-tuning. Returns a policy handle (`.generate`, `.save`, `.metrics`).

    Settings are SFTConfig's fields (`data=..., epochs=2, lora={"r": 8}` or `lora=False`); `session` registers
    the result and lends its runtime; `progress` shows the live view; `stop` lets a caller end the run early;
    `trust_remote_code=True` lets a model that ships its own modelling code run it.
    """
    from .engine.runtime import resolve_runtime
    from .engine.sft import train_sft

    cfg = _config(SFTConfig, config, settings)
    runtime = resolve_runtime(cfg.model, session, device=cfg.device, precision=cfg.precision, fast_path=cfg.fast_path)
    if trust_remote_code:
        runtime.trust(cfg.model)
    stop = stop or StopControl()
    handle = train_sft(cfg, name, runtime, _views("sft", name, progress, callbacks, stop, cfg), stop)
    if session is not None:
        session.add(handle)
    return handle


def load_policy(
    model: str = "smollm2-135m",
    name: str | None = None,
    *,
    session: Any = None,
    device: str | None = None,
    precision: str | None = None,
    chat: bool = True,
    revision: str | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """A policy handle for a model as it is (no training), e.g. the base model to compare against.

    `model`: 'smollm2-135m', 'tiny', a checkpoint folder or a hub id 'org/name' (at `revision`). `chat=False` feeds
    prompts as raw text, without the chat template: how a pretrained model sees text. `trust_remote_code=True` lets
    a model that ships its own modelling code run it.
    """
    from .engine.handles import PolicyHandle
    from .engine.runtime import resolve_runtime

    runtime = resolve_runtime(session, device=device, precision=precision)
    lm = runtime.load(model, revision=revision, trust_remote_code=trust_remote_code)
    handle = PolicyHandle(name or "base", "base", lm, runtime=runtime, parents=(model,), chat=chat)
    if session is not None:
        session.add(handle)
    return handle


def reward(
    name: str = "reward",
    *,
    config: RewardConfig | None = None,
    session: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    trust_remote_code: bool = False,
    **settings: Any,
) -> Any:
    """A reward model trained from rankings. Returns a reward handle (`.score`: its logits; `.reward`: normalised, what
    PPO and GRPO optimise; `.accuracy`, `.save`).

    `model` defaults to the session's latest SFT result; `data` takes Preferences, a RankingPanel, ranking
    records, prompt/chosen/rejected pairs, a Dataset, a DataFrame or a path. `trust_remote_code` as in `sft`.
    """
    import dataclasses

    from . import references
    from .engine.reward import train_reward
    from .engine.runtime import resolve_runtime

    cfg = _config(RewardConfig, config, settings)
    if cfg.model is None:
        latest = session.latest("policy", "sft") if session is not None else None
        if latest is None:
            raise ConfigError(
                "model is not set and this session has no SFT result yet; run %%sft first or set "
                "model = <an SFT handle or a model name>"
            )
        cfg = dataclasses.replace(cfg, model=latest)
    if cfg.data is None:
        raise ConfigError("data is required: Preferences from the ranking panel, ranking records or pairs, or a path")
    references.model_folder(cfg.model)  # `model = "runs/sft"` that is not there: one line before anything loads
    runtime = resolve_runtime(cfg.model, session, device=cfg.device, precision=cfg.precision, fast_path=cfg.fast_path)
    if trust_remote_code:
        runtime.trust(cfg.model)
    stop = stop or StopControl()
    handle = train_reward(cfg, name, runtime, _views("reward", name, progress, callbacks, stop, cfg), stop, session)
    if session is not None:
        session.add(handle)
    return handle


def load_reward(path: str, name: str | None = None, *, session: Any = None, device: str | None = None) -> Any:
    """A reward handle saved with `.save(path)`."""
    from .engine.reward_model import load_reward as _load
    from .engine.runtime import resolve_runtime

    handle = _load(path, resolve_runtime(session, device=device), name)
    if session is not None:
        session.add(handle)
    return handle


def dpo(
    name: str = "dpo",
    *,
    config: DPOConfig | None = None,
    session: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    **settings: Any,
) -> Any:
    """DPO: the policy learns K-way rankings directly (no reward model, no sampling), held to its starting weights
    by beta. Returns a policy handle.

    `policy` defaults to the session's latest SFT result; `data` takes what `reward` takes. As in a config file,
    strings name what is on disk: `policy = "runs/sft"` (a saved policy, or a model name at `revision`), and
    `reference` likewise (unset: the policy as it starts, on the same weights).
    """
    from .engine.dpo import train_dpo
    from .engine.runtime import resolve_runtime

    cfg = _dpo_config(_config(DPOConfig, config, settings), session)
    runtime = resolve_runtime(cfg.policy, session, device=cfg.device, precision=cfg.precision, fast_path=cfg.fast_path)
    cfg = _dpo_resolved(cfg, runtime)
    stop = stop or StopControl()
    handle = train_dpo(cfg, name, runtime, _views("dpo", name, progress, callbacks, stop, cfg), stop)
    if session is not None:
        session.add(handle)
    return handle


def _with_sft_policy(cfg: Any, session: Any) -> Any:
    """`cfg` with `policy` defaulting to the session's latest SFT result (DPO, PPO, GRPO)."""
    import dataclasses

    if cfg.policy is not None:
        return cfg
    latest = session.latest("policy", "sft") if session is not None else None
    if latest is None:
        raise ConfigError(
            "policy is not set and this session has no SFT result yet; run %%sft first or set "
            "policy = <a policy handle>"
        )
    return dataclasses.replace(cfg, policy=latest)


def _check_policy(key: str, value: Any) -> None:
    from .engine.handles import PolicyHandle

    if not isinstance(value, (PolicyHandle, str)):
        raise ConfigError(
            f"{key} = {value!r} is not valid; expected a policy handle (from %%sft, or "
            f"rlhf_magic.load_policy(...)) or the folder of a saved policy"
        )


def _dpo_config(cfg: DPOConfig, session: Any) -> DPOConfig:
    """The policy (default: the latest SFT result) and the data are there, and each is of a kind DPO takes."""
    cfg = _with_sft_policy(cfg, session)
    for key in ("policy", "reference"):
        if getattr(cfg, key) is not None:
            _check_policy(key, getattr(cfg, key))
    if cfg.revision is not None and not isinstance(cfg.policy, str):
        raise ConfigError(
            f"revision = {cfg.revision!r} applies to a hub model id, not to the policy {cfg.policy.name!r}"
        )
    if cfg.data is None:
        raise ConfigError("data is required: Preferences from the ranking panel, ranking records or pairs, or a path")
    return cfg


def _dpo_resolved(cfg: DPOConfig, runtime: Any) -> DPOConfig:
    """Strings that name a saved policy (or a model) -> policy handles; both paths are checked before anything
    loads."""
    import dataclasses

    from . import references
    from .engine.handles import PolicyHandle

    for key in ("policy", "reference"):
        value = getattr(cfg, key)
        if isinstance(value, str):
            references.missing_folder(key, value, references.SAVED.format(path=value, stage="SFT"))
    policy = cfg.policy
    if isinstance(policy, str) and cfg.revision is not None:
        lm = runtime.load(policy, revision=cfg.revision)
        policy = PolicyHandle(policy, "base", lm, runtime=runtime, parents=(policy,))
    policy = references.policy(policy, runtime)
    return dataclasses.replace(cfg, policy=policy, reference=references.policy(cfg.reference, runtime))


def ppo(
    name: str = "ppo",
    *,
    config: PPOConfig | None = None,
    session: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    **settings: Any,
) -> Any:
    """PPO against a reward handle or a callable, with a per-token KL penalty to the frozen SFT policy.

    `policy` defaults to the session's latest SFT result. With `resume=True` the run continues the session's
    PPO result called `name` (its adapter, value head, optimizer and KL controller). As in a config file, strings
    name what is on disk: `policy = "runs/sft"` (a saved policy), `reward = "runs/rm"` (a saved reward model) or
    `reward = "mymodule:score"` (an importable f(prompts, responses) -> list[float]).
    """
    from .engine.ppo import train_ppo
    from .engine.runtime import resolve_runtime

    cfg = _ppo_config(_config(PPOConfig, config, settings), session)
    previous = _previous_ppo(name, cfg, session)
    runtime = resolve_runtime(cfg.policy, session, device=cfg.device, precision=cfg.precision, fast_path=cfg.fast_path)
    cfg = _ppo_resolved(cfg, runtime)
    stop = stop or StopControl()
    views = _views("ppo", name, progress, callbacks, stop, cfg)
    handle = train_ppo(cfg, name, runtime, views, stop, previous)
    if session is not None:
        session.add(handle)
    return handle


def _ppo_config(cfg: PPOConfig, session: Any) -> PPOConfig:
    cfg = _with_sft_policy(cfg, session)
    _check_policy("policy", cfg.policy)
    if cfg.reward is None:
        raise ConfigError(
            "reward is required: a reward handle from %%reward, a callable f(prompts, responses), the folder of a "
            "saved reward model, or 'module:function'"
        )
    if cfg.prompts is None:
        raise ConfigError("prompts is required: a list of prompts, a Dataset, or a .jsonl/.json/.csv/.txt path")
    return cfg


def _ppo_resolved(cfg: PPOConfig, runtime: Any) -> PPOConfig:
    """Strings that name a saved policy, a saved reward model or a reward function -> what they name (both paths are
    checked before anything loads); with several processes, the same micro-batches on every one."""
    import dataclasses

    from . import references
    from .engine.ranks import same_chunks

    policy, reward = references.resolve_ppo(cfg.policy, cfg.reward, runtime)
    return same_chunks(dataclasses.replace(cfg, policy=policy, reward=reward))


def _previous_ppo(name: str, cfg: PPOConfig, session: Any) -> Any:
    if not cfg.resume:
        return None
    from .engine.ppo import PPOHandle

    prev = session[name] if session is not None and name in session else None
    if not isinstance(prev, PPOHandle):
        raise ConfigError(f"resume = True but this session has no PPO result named {name!r} to continue")
    return prev


def grpo(
    name: str = "grpo",
    *,
    config: GRPOConfig | None = None,
    session: Any = None,
    progress: bool = True,
    callbacks: Sequence[Callback] = (),
    stop: StopControl | None = None,
    **settings: Any,
) -> Any:
    """GRPO (or RLOO, `algorithm="rloo"`) against a reward handle or a callable: num_generations answers per
    prompt, each judged against its group; no value model, the k3 KL to the SFT policy inside the loss.

    `policy`, `reward`, `prompts` and `resume` as in `ppo` (strings name what is on disk)."""
    import dataclasses

    from . import references
    from .engine.grpo import GRPOHandle, check_chunks, train_grpo
    from .engine.runtime import resolve_runtime

    cfg = _ppo_config(_config(GRPOConfig, config, settings), session)
    previous = session[name] if cfg.resume and session is not None and name in session else None
    if cfg.resume and not isinstance(previous, GRPOHandle):
        raise ConfigError(f"resume = True but this session has no GRPO result named {name!r} to continue")
    check_chunks(cfg)
    runtime = resolve_runtime(cfg.policy, session, device=cfg.device, precision=cfg.precision, fast_path=cfg.fast_path)
    policy, reward = references.resolve_ppo(cfg.policy, cfg.reward, runtime)
    cfg = dataclasses.replace(cfg, policy=policy, reward=reward)
    stop = stop or StopControl()
    handle = train_grpo(cfg, name, runtime, _views("grpo", name, progress, callbacks, stop, cfg), stop, previous)
    if session is not None:
        session.add(handle)
    return handle
