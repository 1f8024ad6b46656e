"""Strings that name what a stage needs: a saved policy or reward model, or an importable reward function.

A config file (and so `rlhf-magic ppo CONFIG`) holds only literals, so `policy = "runs/sft"`, `reward = "runs/rm"`
and `reward = "mymodule:score"` name what a notebook passes as variables. api.py resolves them before the engine
runs (the engine takes handles and callables only), so the magics and the Python API accept them too.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelError, did_you_mean

MODULE_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
SAVED = "write it first (output_dir = {path!r} in the {stage} config, or a handle's .save({path!r}))"
REWARDS = (
    "a folder saved by a reward model (%%reward's output_dir or its .save()), 'module:function' naming an "
    "importable f(prompts, responses) -> list[float], a reward handle, or a callable"
)


def missing_folder(key: str, value: str, fix: str) -> Path | None:
    """The folder `value` names; None when it names no local path (a model name such as 'tiny' or 'org/name');
    a one-line error naming `fix` when it is a local path that does not exist."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    text = value.replace("\\", "/")
    head = text.split("/")[0]
    local = text.startswith((".", "/", "~")) or text.count("/") > 1 or (head != text and Path(head).is_dir())
    if local:
        raise ConfigError(f"{key} = {value!r}: no such folder (relative paths start at {Path.cwd()}); {fix}")
    return None


def resolve_ppo(policy_value: Any, reward_value: Any, runtime: Any) -> tuple[Any, Any]:
    """PPO's (policy, reward): both strings checked first, so a mistake in either costs no model load."""
    if isinstance(policy_value, str):
        missing_folder("policy", policy_value, SAVED.format(path=policy_value, stage="SFT"))
    if isinstance(reward_value, str):
        reward_folder(reward_value)
    scorer = reward(reward_value, runtime)
    return policy(policy_value, runtime), scorer


def policy(value: Any, runtime: Any) -> Any:
    """`policy = "<folder>"` (a policy saved by .save() or an SFT output_dir) or a model name -> a policy handle;
    anything else as it is."""
    if not isinstance(value, str):
        return value
    from .engine.handles import PolicyHandle

    fix = SAVED.format(path=value, stage="SFT")
    path = missing_folder("policy", value, fix)
    try:
        lm = runtime.load(str(path) if path is not None else value)
    except ModelError as e:
        if path is not None:
            raise
        raise ConfigError(
            f"policy = {value!r}: no such folder here, and as a model name: {e}; for a saved policy, {fix}"
        ) from None
    return PolicyHandle(value, "base", lm, runtime=runtime, parents=(value,))


def reward(value: Any, runtime: Any) -> Any:
    """`reward = "<folder>"` (a saved reward model) or `"module:function"` -> a reward handle or the function;
    anything else as it is."""
    if not isinstance(value, str):
        return value
    path = reward_folder(value)
    if path is None:
        return import_function("reward", value)
    from .engine.reward_model import load_reward

    return load_reward(path, runtime)


def reward_folder(value: str) -> Path | None:
    """The folder of a saved reward model, None for 'module:function', else a one-line error."""
    path = Path(value).expanduser()
    if path.exists():
        return path
    if MODULE_FUNCTION.match(value):
        return None
    raise ConfigError(f"reward = {value!r}: no such folder (relative paths start at {Path.cwd()}); expected {REWARDS}")


def model_folder(value: Any) -> None:
    """%%reward's `model = "<folder>"`: a local path that does not exist is a one-line error before anything loads."""
    if isinstance(value, str):
        missing_folder("model", value, SAVED.format(path=value, stage="SFT"))


def import_function(key: str, spec: str) -> Callable[..., Any]:
    """The callable that 'package.module:name' names (the current folder is searched too, as `python -m` does)."""
    module_name, _, attr = spec.partition(":")
    module = _import(key, spec, module_name)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            raise ConfigError(
                f"{key} = {spec!r}: module {module_name!r} has no {attr!r}{did_you_mean(part, public)}; "
                f"expected {REWARDS}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{key} = {spec!r}: {attr} is a {type(obj).__name__}, not a function; expected {REWARDS}")
    return obj


def _import(key: str, spec: str, module_name: str) -> Any:
    try:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            here = os.getcwd()
            if e.name != module_name.split(".")[0] or here in sys.path or "" in sys.path:
                raise
            sys.path.insert(0, here)  # the `rlhf-magic` script's path holds its own folder, not the current one
            return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"{key} = {spec!r}: cannot import module {module_name!r} ({e}; searched {os.getcwd()} and the Python "
            f"path); expected {REWARDS}"
        ) from None
    except Exception as e:  # the module itself failed while importing
        first = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError(
            f"{key} = {spec!r}: importing module {module_name!r} raised {type(e).__name__}: {first}"
        ) from None
