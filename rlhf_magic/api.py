"""The public Python API: one function per stage. The magics and the CLI are thin layers over these."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .config import SFTConfig, build_config
from .errors import ConfigError
from .events import Callback, StopControl


def _config(cls: type, config: Any, settings: dict[str, Any]) -> Any:
    if config is not None:
        if not isinstance(config, cls):
            raise ConfigError(f"config must be a {cls.__name__}, not {type(config).__name__}")
        if settings:
            import dataclasses

            return build_config(cls, {**_flat(dataclasses.asdict(config), config), **settings})
        return config
    return build_config(cls, settings)


def _flat(values: dict[str, Any], config: Any) -> dict[str, Any]:
    """asdict() turns nested configs (and handles inside lists) into dicts; keep the original objects."""
    return {k: getattr(config, k) for k in values}


def _views(stage: str, name: str, progress: bool, callbacks: Sequence[Callback], stop: StopControl) -> list:
    views = list(callbacks)
    if progress:
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
    **settings: Any,
) -> Any:
    """Supervised fine-tuning. Returns a policy handle (`.generate`, `.save`, `.metrics`).

    Settings are SFTConfig's fields (`data=..., epochs=2, lora={"r": 8}` or `lora=False`); `session` registers
    the result and lends its runtime; `progress` shows the live view; `stop` lets a caller end the run early.
    """
    from .engine.runtime import resolve_runtime
    from .engine.sft import train_sft

    cfg = _config(SFTConfig, config, settings)
    runtime = resolve_runtime(cfg.model, session, device=cfg.device, precision=cfg.precision)
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
) -> Any:
    """A policy handle for a model as it is (no training), e.g. the base model to compare against."""
    from .engine.handles import PolicyHandle
    from .engine.runtime import resolve_runtime

    runtime = resolve_runtime(session, device=device, precision=precision)
    lm = runtime.load(model)
    handle = PolicyHandle(name or "base", "base", lm, None, None, (model,), runtime)
    if session is not None:
        session.add(handle)
    return handle
