"""One runtime per session: device, precision, seeding, the accelerate object and the model cache."""

from __future__ import annotations

import contextlib
import functools
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from . import cpu_pool

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .models import LoadedModel


def pick_device(name: str | None = None) -> torch.device:
    """cuda > mps > cpu, unless `name` (or $RLHF_MAGIC_DEVICE) says otherwise."""
    name = name or os.environ.get("RLHF_MAGIC_DEVICE") or None
    if name is None:
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but torch sees no CUDA GPU; use 'cpu' or leave device unset")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device = 'mps' but this torch build has no MPS support; use 'cpu'")
    if name not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"device = {name!r} is not valid; expected 'cuda', 'mps' or 'cpu'")
    return torch.device(name)


def pick_precision(device: torch.device, name: str | None = None) -> str:
    """bf16 on a GPU that supports it, fp32 elsewhere (a CPU user may ask for bf16 autocast)."""
    if name:
        if name == "fp16" and device.type == "cpu":
            raise ConfigError("precision = 'fp16' is not supported on the CPU; use 'bf16' or 'fp32'")
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def release_free_memory(device: Any) -> None:
    """On a CPU with glibc, hand the pages of freed tensors back to the OS (`malloc_trim`).

    CPU tensors come from malloc, and glibc keeps freed blocks in its heap; between the micro-batches of a training
    step the freed activations leave holes that the next forward pass only partly reuses, so the process grows by
    far more than its live tensors. Trimming between micro-batches keeps peak RSS near what is actually live."""
    if getattr(device, "type", str(device)) != "cpu" or cpu_pool.active():  # the pool keeps its blocks for reuse
        return
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to trim
        return None


class Runtime:
    """Device, precision and cached models shared by every stage of a session."""

    def __init__(self, device: str | None = None, precision: str | None = None):
        self.device = pick_device(device)
        self.precision = pick_precision(self.device, precision)
        self._models: dict[str, LoadedModel] = {}
        self._accelerator: Accelerator | None = None
        self._acc_key: tuple | None = None

    def __repr__(self) -> str:
        return f"Runtime(device={self.device.type!r}, precision={self.precision!r}, models={list(self._models)})"

    def with_overrides(self, device: str | None, precision: str | None) -> Runtime:
        """This runtime, or a new one when a stage asks for another device or precision."""
        if (device is None or device == self.device.type) and (precision is None or precision == self.precision):
            return self
        return Runtime(device or self.device.type, precision or (self.precision if device is None else None))

    # ---------------------------------------------------------------------------------------- accelerate
    def accelerator(self, grad_accum: int = 1) -> Accelerator:
        """The accelerate object for a training loop (created once; its state is a process singleton)."""
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState

        key = (self.device.type, self.precision)
        if self._accelerator is None or self._acc_key != key:
            if AcceleratorState._shared_state and self._acc_key != key:
                AcceleratorState._reset_state(reset_partial_state=False)
            mp = "no" if self.precision == "fp32" else self.precision
            self._accelerator = Accelerator(mixed_precision=mp, cpu=self.device.type == "cpu")
            self._acc_key = key
        self._accelerator.gradient_accumulation_steps = grad_accum
        return self._accelerator

    @property
    def is_main_process(self) -> bool:
        return self._accelerator is None or self._accelerator.is_main_process

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Mixed precision for forward passes outside a prepared model (generation, scoring)."""
        if self.precision == "fp32" or self.device.type == "mps":
            yield
            return
        if self.device.type == "cpu":  # bf16 (fp16 is refused on a CPU)
            from .cpu_bf16 import autocast

            with autocast():
                yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        with torch.autocast(self.device.type, dtype=dtype):
            yield

    # ---------------------------------------------------------------------------------------- models
    def load(self, spec: str, trust_remote_code: bool = False) -> LoadedModel:
        """A cached model: a later stage reuses the weights in memory instead of reloading them."""
        from .models import load_model

        key = str(spec)
        if key not in self._models:
            self._models[key] = load_model(key, self.device, trust_remote_code=trust_remote_code)
        return self._models[key]

    def load_fresh(self, spec: str, trust_remote_code: bool = False) -> LoadedModel:
        """An uncached copy, for full fine-tuning (the cached base must stay pristine)."""
        from .models import load_model

        return load_model(str(spec), self.device, trust_remote_code=trust_remote_code)

    def release(self) -> None:
        """Drop cached models (on `%unload_ext`)."""
        self._models.clear()
        self._accelerator = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_runtime(*candidates: Any, device: str | None = None, precision: str | None = None) -> Runtime:
    """The runtime of the first candidate that has one (a handle or a session), else a new one."""
    for c in candidates:
        rt = getattr(c, "runtime", None)
        if isinstance(rt, Runtime):
            return rt.with_overrides(device, precision)
    return Runtime(device, precision)
