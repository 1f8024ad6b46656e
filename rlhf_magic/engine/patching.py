"""The one place that replaces third-party attributes at run time, and the engine's process-wide state.

`patched(owner, name, value)` sets `owner.name` inside a `with` block and puts the original back when the last
block that patched it ends, also on error. Blocks may nest and may run in several threads at once: each attribute
keeps a stack of active values under one lock, so a block that ends out of order never restores a stale value.
Replacements of shared functions (`nn.Linear.forward`, peft's LoRA forward...) dispatch on context variables, so a
thread that is not inside a fast-path block runs the original code even while another thread's patch is in place.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.utils.weak import WeakIdKeyDictionary


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any
    inherited: bool  # a class attribute found on a base class: restored by deleting the override
    stack: list[tuple[object, Any]] = field(default_factory=list)


@dataclass
class ProcessState:
    """Why process-wide: the attributes patched here (classes, torch functions) are shared by every thread, a bf16
    copy of a weight serves every model that holds that weight, and one model's generate() stands in its config
    for the model's own (generation.py), so two threads must not do that at once."""

    lock: threading.RLock = field(default_factory=threading.RLock)
    generate_lock: threading.Lock = field(default_factory=threading.Lock)
    patches: dict[tuple[int, str], _Patch] = field(default_factory=dict)
    bf16_copies: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)  # weight -> (version, copy)
    pool_depth: int = 0  # nesting of cpu_pool.pooled(): only the outermost one starts and ends the pool


PROCESS = ProcessState()


def _raw(owner: Any, name: str) -> tuple[Any, bool]:
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name], klass is not owner
    return getattr(owner, name), False


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[Any]:
    """`owner.name = value` inside the block; yields the original (the value before any active patch)."""
    key, token = (id(owner), name), object()
    with PROCESS.lock:
        entry = PROCESS.patches.get(key)
        if entry is None:
            entry = PROCESS.patches[key] = _Patch(owner, name, *_raw(owner, name))
        entry.stack.append((token, value))
        setattr(owner, name, value)
    try:
        yield entry.original
    finally:
        with PROCESS.lock:
            entry.stack[:] = [(t, v) for t, v in entry.stack if t is not token]
            if entry.stack:
                setattr(owner, name, entry.stack[-1][1])
            else:
                del PROCESS.patches[key]
                if entry.inherited:
                    delattr(owner, name)
                else:
                    setattr(owner, name, entry.original)


def original(owner: Any, name: str) -> Any:
    """`owner.name` as it was before any active patch."""
    with PROCESS.lock:
        entry = PROCESS.patches.get((id(owner), name))
        return entry.original if entry is not None else _raw(owner, name)[0]


def is_patched(owner: Any, name: str) -> bool:
    with PROCESS.lock:
        return (id(owner), name) in PROCESS.patches
