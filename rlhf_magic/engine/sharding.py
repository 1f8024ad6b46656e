"""Sharded training (FSDP2, DeepSpeed ZeRO-3): the whole weights for every forward that is not a training step.

Under FSDP2 or ZeRO-3 each process keeps a shard of the weights, and a forward through the prepared module gathers
them with collectives that every process must join, the same number of times. The training steps do that. The
other forwards do not: sampling runs as many decode steps as its longest answer, and evaluation scores each
process's own share. Inside `whole_weights` every process holds the whole weights as plain tensors, so those
forwards run as they do in one process, collective-free (TRL gathers ZeRO-3 weights for generation the same way).
Gradients and optimizer state, the larger part of training memory, stay sharded.

After training, `release` puts the whole trained weights back into the Parameter objects the model had before
`prepare` and takes FSDP2 off it: the handle, the adapters and the session's cached base model are plain modules
again, and sample, score and save as after DDP. With one process, DDP or ZeRO-1/2 every weight is whole already,
and all of this does nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

# Each FSDP2-prepared module's tree as it was before `prepare`. Keyed weakly by the prepared module, so whoever holds
# it can release it, and nothing is kept once it is gone.
_BEFORE: weakref.WeakKeyDictionary[torch.nn.Module, _Before] = weakref.WeakKeyDictionary()


def kind(acc: Any) -> str | None:
    """'fsdp2', 'zero3', or None when every process holds every weight."""
    state = getattr(acc, "state", None)
    if state is None or getattr(acc, "num_processes", 1) == 1:
        return None
    if getattr(state, "is_fsdp2", False):
        return "fsdp2"
    plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        return "zero3"
    return None


@contextlib.contextmanager
def whole_weights(acc: Any, module: torch.nn.Module) -> Iterator[None]:
    """Inside, `module`'s weights are whole on every process; every process must enter together."""
    sharded = kind(acc)
    if sharded == "fsdp2":
        groups = _fsdp_modules(module)
        _unshard(groups)
        try:
            yield
        finally:
            for m in groups:
                m.reshard()
                m.set_reshard_after_forward(_reshard_setting(acc), recurse=False)
    elif sharded == "zero3":
        with _zero3_gathered(module):
            yield
    else:
        yield


@dataclass
class _Before:
    """A module tree as `prepare` found it: every parameter slot, and the hooks and attributes of each module."""

    slots: list[tuple[torch.nn.Module, str, torch.nn.Parameter]]
    hooks: dict[torch.nn.Module, dict[str, set[int]]]

    @classmethod
    def of(cls, root: torch.nn.Module) -> _Before:
        slots = [(m, n, p) for m in root.modules() for n, p in m._parameters.items() if p is not None]
        return cls(slots, {m: {k: set(d) for k, d in _hook_dicts(m)} for m in root.modules()})


def prepare(acc: Any, module: torch.nn.Module, *objects: Any, batch_size: int | None = None) -> tuple[Any, ...]:
    """`acc.prepare(module, *objects)`, remembering the module tree as it was, for `release`. `batch_size`: the
    rows of one backward pass, which DeepSpeed must be told where no data loader is prepared (PPO)."""
    before = _Before.of(module)
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None and batch_size and plugin.deepspeed_config.get("train_micro_batch_size_per_gpu") == "auto":
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
    prepared = acc.prepare(module, *objects)
    if kind(acc) == "fsdp2":
        _BEFORE[prepared[0]] = before
    return prepared


def trained(acc: Any, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """The parameters that get gradients: under FSDP2 the prepared module's sharded ones, else `params`."""
    if module in _BEFORE:
        return [p for p in module.parameters() if p.requires_grad]
    return params


def release(acc: Any, module: torch.nn.Module) -> None:
    """After training (every process together): the whole trained weights go back into the original Parameter
    objects, and what FSDP2 hung on the modules comes off: hooks, state and classes. Nothing to do without FSDP2."""
    before = _BEFORE.pop(module, None)
    if before is None:
        return
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for m in _fsdp_modules(module):
        m.reshard()  # the registered parameters are the sharded ones again
    for sub, name, original in before.slots:
        current = sub._parameters.get(name)
        if isinstance(current, DTensor) and current is not original:
            full = current.full_tensor()  # collective: every process runs the same slots in the same order
            original.data = full.detach().to(original.dtype).clone()
        sub._parameters[name] = original
    for m, kept in before.hooks.items():
        for key, hooks in _hook_dicts(m):
            for added in set(hooks) - kept[key]:
                del hooks[added]
        for key in [k for k in vars(m) if k.startswith(_FSDP_ATTRS)]:
            delattr(m, key)
        if isinstance(m, FSDPModule):
            _module_state_mapping.pop(m, None)
            m.__class__ = next(c for c in type(m).__mro__ if not issubclass(c, FSDPModule))


# What FSDP2 (and accelerate's preparation for it) sets on each module it manages: its state, and two flags.
_FSDP_ATTRS = ("__composable_api_state_key_", "_is_fsdp_managed_module", "_fsdp_use_orig_params")


def _hook_dicts(m: torch.nn.Module) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in vars(m).items() if k.endswith("hooks") and isinstance(v, dict)]


def _fsdp_modules(module: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def _unshard(groups: list[Any]) -> None:
    """Gather every group's weights (collective) and keep them gathered across forwards. The root (the prepared
    module, first in the list) is set up as the root first: FSDP2 otherwise takes the first block that runs a
    forward for the root, and the prepared module's own forward then fails."""
    if groups:
        groups[0]._get_fsdp_state()._lazy_init()
    for m in groups:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()


def _reshard_setting(acc: Any) -> bool:
    value = getattr(acc.state.fsdp_plugin, "reshard_after_forward", True)
    return value if isinstance(value, bool) else True


@contextlib.contextmanager
def _zero3_gathered(engine: Any) -> Iterator[None]:
    """ZeRO-3: gather the parameters and take DeepSpeed's fetch hooks off while they are whole (as TRL's
    `unwrap_model_for_generation` does); the hooks go back on after. Not run on a CPU: DeepSpeed needs a GPU."""
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    with deepspeed.zero.GatheredParameters(list(engine.parameters())):
        if offload is not None:
            for hook in [*offload.forward_hooks, *offload.backward_hooks]:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            if offload is not None:
                offload._register_deepspeed_module(offload.module)
