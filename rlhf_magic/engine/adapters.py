"""LoRA adapters on one shared base model (peft), and switching between them.

Every stage's LoRA result is a named adapter on the cached base model, so the policy, the reference, the value
function and a same-base reward model cost one copy of the weights. The HF model itself is always the module
that runs: peft injects its LoRA layers into it, and `PeftModel` only manages the adapters.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from ..config import LoraConfig
from ..errors import ConfigError
from .models import LoadedModel


def unique_name(lm: LoadedModel, stem: str) -> str:
    """A name no adapter of `lm` has; peft module names cannot hold '.', so a handle named 'k0.1' gives 'k0_1-3'."""
    base = re.sub(r"[^0-9A-Za-z_-]", "_", stem)
    n = len(lm.adapters) + 1
    while f"{base}-{n}" in lm.adapters:
        n += 1
    return f"{base}-{n}"


def peft_config(cfg: LoraConfig, model: Any = None) -> Any:
    from peft import LoraConfig as PeftLora

    targets: Any = cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    top: Any = None
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if cfg.layers is not None and n_layers:
        if not 1 <= cfg.layers <= n_layers:
            raise ConfigError(
                f"lora.layers = {cfg.layers} is not valid; expected a number of layers from 1 to {n_layers}"
            )
        top = list(range(n_layers - cfg.layers, n_layers))
        if targets == "all-linear":  # peft needs module names when it picks layers
            targets = linear_names(model)
    return PeftLora(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        bias="none",
        layers_to_transform=top,
    )


def linear_names(model: Any) -> list[str]:
    """Leaf names of the linear layers inside the transformer blocks (what 'all-linear' means)."""
    head, names = model.get_output_embeddings(), set()
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and m is not head and ".layers." in f".{n}" and "lora_" not in n:
            parts = n.split(".")
            names.add(parts[-2] if parts[-1] == "base_layer" else parts[-1])  # peft wraps adapted layers
    return sorted(names)


def add_adapter(lm: LoadedModel, stem: str, cfg: LoraConfig, init_from: str | None = None) -> str:
    """Add a new trainable adapter; start it as a copy of `init_from` (same config) or as a no-op (B = 0)."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    name = unique_name(lm, stem)
    pcfg = peft_config(lm.adapters[init_from] if init_from else cfg, lm.model)
    if lm.peft is None:
        with warnings.catch_warnings():  # peft asks transformers 5 a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            lm.peft = get_peft_model(lm.model, pcfg, adapter_name=name)
    else:
        lm.peft.add_adapter(name, pcfg)
    lm.adapters[name] = lm.adapters[init_from] if init_from else cfg
    if init_from:
        state = get_peft_model_state_dict(lm.peft, adapter_name=init_from)
        set_peft_model_state_dict(lm.peft, state, adapter_name=name)
    return name


def train_only(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Make exactly `params` trainable (peft's adapter switches change requires_grad behind our back)."""
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


Adapters = str | list[str] | None  # one adapter, several stacked (their updates add up), or None: adapters off


def adapter_parameters(lm: LoadedModel, name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter (what an optimizer trains)."""
    key = f".{name}."
    return [p for n, p in lm.model.named_parameters() if key in n]


@contextlib.contextmanager
def _keep_grad_flags(model: torch.nn.Module) -> Iterator[None]:
    """peft flips requires_grad when it switches adapters; the caller's choice of trainables must survive."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def use_adapter(lm: LoadedModel, name: Adapters) -> Iterator[None]:
    """Run `lm.model` with adapter(s) `name` active, or with every adapter off when `name` is None."""
    if lm.peft is None:
        if name is not None:
            raise RuntimeError(f"adapter {name!r} requested on a model without adapters")
        yield
        return
    tuner = lm.peft.base_model
    previous = list(tuner.active_adapters)
    was_disabled = _adapters_disabled(tuner)
    with _keep_grad_flags(lm.model):
        if name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.set_adapter(name)
            tuner.enable_adapter_layers()
    try:
        yield
    finally:
        with _keep_grad_flags(lm.model):
            tuner.set_adapter(previous)
            if was_disabled:
                tuner.disable_adapter_layers()
            else:
                tuner.enable_adapter_layers()


def _adapters_disabled(tuner: Any) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in tuner.model.modules():
        if isinstance(m, BaseTunerLayer):
            return bool(m.disable_adapters)
    return False


def merged_copy(lm: LoadedModel, name: Adapters) -> torch.nn.Module:
    """A plain HF model with adapter `name` merged in (for `.save()`); the shared model is untouched."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    if lm.peft is None:
        return lm.model
    clone = copy.deepcopy(lm.peft)
    tuner = clone.base_model
    if name is None:
        return tuner.unload()
    for m in tuner.model.modules():
        if isinstance(m, BaseTunerLayer):
            m.enable_adapters(True)
    names = [name] if isinstance(name, str) else list(name)
    tuner.set_adapter(names)
    return tuner.merge_and_unload(adapter_names=names)
