"""rlhf-magic: the InstructGPT pipeline (SFT, rankings, reward model, PPO) as Jupyter cell magics.

`%load_ext rlhf_magic` registers `%%sft`, `%%reward`, `%%dpo`, `%%ppo`, `%%grpo`, `%rank`, `%compare` and
`%rlhf`. Every magic is a thin layer over a function of this package (`rlhf_magic.sft(...)` and so on), imported
lazily so that loading the extension does not import torch. The notebook views (widgets, live plots) need the
`notebook` extra, `pip install "rlhf-magic[notebook]"`; the functions and the CLI run without it.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

_LAZY = {
    "sft": "api",
    "reward": "api",
    "dpo": "api",
    "ppo": "api",
    "grpo": "api",
    "load_policy": "api",
    "load_reward": "api",
    "compare": "api",
    "Comparison": "api",
    "WinRate": "api",
    "Session": "session",
    "SFTConfig": "config",
    "RewardConfig": "config",
    "DPOConfig": "config",
    "PPOConfig": "config",
    "GRPOConfig": "config",
    "LoraConfig": "config",
    "RLHFError": "errors",
    "RankingPanel": "widgets.ranking",
    "ComparePanel": "widgets.compare",
    "Preferences": "preferences",
    "load_preferences": "preferences",
    "labelers": "labelers",
}

__all__ = ["__version__", "load_ipython_extension", "unload_ipython_extension", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return module if name == _LAZY[name] else getattr(module, name)
    raise AttributeError(f"module 'rlhf_magic' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload

    unload(ipython)
