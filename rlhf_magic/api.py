"""The public Python API: one function per stage. The magics and the CLI are thin layers over these."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .comparison import Comparison, WinRate, compare
from .config import PPOConfig, RewardConfig, SFTConfig
from .errors import ConfigError
from .events import Callback, StopControl
from .validation import with_options

__all__ = ["Comparison", "WinRate", "compare", "load_policy", "load_reward", "ppo", "reward", "sft"]


def _config(cls: type, config: Any, settings: dict[str, Any]) -> Any:
    """`config` (or the defaults) with `settings` on top, checked as a cell's settings are, whoever built it."""
    return with_options(cls, config, settings)


def _views(stage: str, name: str, progress: bool, callbacks: Sequence[Callback], stop: StopControl) -> list:
    views = list(callbacks)
    if progress and os.environ.get("RANK", "0") == "0":  # under accelerate launch only the main process shows it
        from .widgets.live import live_view

        views.insert(0, live_view(stage, f"%%{stage} {name}", stop))
    return views


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
    handle = train_sft(cfg, name, runtime, _views("sft", name, progress, callbacks, stop), stop)
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
    """A reward model trained from rankings. Returns a reward handle (`.score`, `.accuracy`, `.save`).

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
    handle = train_reward(cfg, name, runtime, _views("reward", name, progress, callbacks, stop), stop, session)
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
    views = _views("ppo", name, progress, callbacks, stop)
    handle = train_ppo(cfg, name, runtime, views, stop, previous)
    if session is not None:
        session.add(handle)
    return handle


def _ppo_config(cfg: PPOConfig, session: Any) -> PPOConfig:
    import dataclasses

    from .engine.handles import PolicyHandle

    if cfg.policy is None:
        latest = session.latest("policy", "sft") if session is not None else None
        if latest is None:
            raise ConfigError(
                "policy is not set and this session has no SFT result yet; run %%sft first or set "
                "policy = <a policy handle>"
            )
        cfg = dataclasses.replace(cfg, policy=latest)
    if not isinstance(cfg.policy, (PolicyHandle, str)):
        raise ConfigError(
            f"policy = {cfg.policy!r} is not valid; expected a policy handle (from %%sft, or "
            f"rlhf_magic.load_policy(...)) or the folder of a saved policy"
        )
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
