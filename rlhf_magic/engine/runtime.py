"""One runtime per session: device, precision, seeding, the accelerate object and the model cache."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import os
import random
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from . import fastpath

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .models import LoadedModel, Workload


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
    return process_gpu() if name == "cuda" else torch.device(name)


def process_gpu() -> torch.device:
    """This process's GPU, as accelerate's PartialState picks it (without starting it): under `accelerate launch`
    each process owns cuda:(LOCAL_RANK mod GPUs), so every process loads its weights onto its own GPU."""
    rank = int(os.environ.get("LOCAL_RANK", "-1"))
    if rank < 0:
        return torch.device("cuda")
    return torch.device("cuda", rank % max(1, torch.cuda.device_count()))


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


class Runtime:
    """Device, precision and cached models shared by every stage of a session."""

    def __init__(self, device: str | None = None, precision: str | None = None, fast_path: bool = True):
        self.device = pick_device(device)
        self.precision = pick_precision(self.device, precision)
        self.fast_path = fast_path  # the CPU fast path (engine/fastpath), where the environment allows it
        self._models: dict[tuple, LoadedModel] = {}  # (spec, revision, dtype): what changes the weights
        self.trusted: set[str] = set()  # models whose own code may run (trust_remote_code, from the Python API)
        self._accelerator: Accelerator | None = None
        self._acc_key: tuple | None = None

    def __repr__(self) -> str:
        return (
            f"Runtime(device={self.device.type!r}, precision={self.precision!r}, fast_path={self.fast_path}, "
            f"models={[k[0] for k in self._models]})"
        )

    def with_overrides(self, device: str | None, precision: str | None, fast_path: bool | None = None) -> Runtime:
        """This runtime, or a new one when a stage asks for another device, precision or fast-path setting."""
        fast_path = self.fast_path if fast_path is None else fast_path
        if (device is None or device == self.device.type) and (precision is None or precision == self.precision):
            if fast_path == self.fast_path:
                return self
            new = copy.copy(self)  # the same models and accelerate object: the switch loads nothing again
            new.fast_path = fast_path
            return new
        precision = precision or (self.precision if device is None else None)
        return Runtime(device or self.device.type, precision, fast_path)

    def fast_path_scope(self) -> contextlib.AbstractContextManager[None]:
        """Inside, engine calls take the CPU fast path where this runtime allows it (engine/fastpath)."""
        return fastpath.scope(self.fast_path, self.device)

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
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16  # fp16 is refused on a CPU
        with fastpath.bf16_kernels(self.device, self.precision), torch.autocast(self.device.type, dtype=dtype):
            yield

    # ---------------------------------------------------------------------------------------- models
    def weight_dtype(self, master: bool = False) -> torch.dtype:
        """bf16 weights on a bf16 GPU; fp32 elsewhere: CPU bf16 and GPU fp16 are autocast over fp32 weights. `master`
        (a copy every weight of which trains) keeps fp32 master weights: AdamW on bf16 weights drops small updates."""
        if self.device.type == "cuda" and self.precision == "bf16" and not master:
            return torch.bfloat16
        return torch.float32

    def trust(self, spec: Any) -> None:
        """Let `spec`'s own modelling code run when it loads (the Python API's trust_remote_code=True)."""
        if isinstance(spec, str):
            self.trusted.add(spec)

    def load(
        self,
        spec: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        workload: Workload | None = None,
    ) -> LoadedModel:
        """A cached model: a later stage reuses the weights in memory instead of reloading them."""
        key = (str(spec), revision, self.weight_dtype())
        if key not in self._models:
            self._models[key] = self._load(key[0], revision, trust_remote_code, workload, master=False)
        return self._models[key]

    def load_fresh(
        self,
        spec: str,
        *,
        revision: str | None = None,
        trust_remote_code: bool = False,
        workload: Workload | None = None,
    ) -> LoadedModel:
        """An uncached copy, for full fine-tuning (the cached base must stay pristine), in fp32 master weights."""
        return self._load(str(spec), revision, trust_remote_code, workload, master=True)

    def _load(
        self, spec: str, revision: str | None, trust: bool, workload: Workload | None, master: bool
    ) -> LoadedModel:
        from .models import Workload, load_model

        work = workload or Workload()
        if self.precision != "fp32" and self.device.type != "mps":  # activations come out of 16-bit autocast
            work = dataclasses.replace(work, act_bytes=2)
        return load_model(
            spec,
            self.device,
            dtype=self.weight_dtype(master),
            revision=revision,
            trust_remote_code=trust or spec in self.trusted,
            workload=work,
        )

    def release(self) -> None:
        """Drop cached models (on `%unload_ext`)."""
        self._models.clear()
        self._accelerator = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def resolve_runtime(
    *candidates: Any, device: str | None = None, precision: str | None = None, fast_path: bool | None = None
) -> Runtime:
    """The runtime of the first candidate that has one (a handle or a session), else a new one."""
    for c in candidates:
        rt = getattr(c, "runtime", None)
        if isinstance(rt, Runtime):
            return rt.with_overrides(device, precision, fast_path)
    return Runtime(device, precision, True if fast_path is None else fast_path)


def in_runtime_scope(train: Callable[..., Any]) -> Callable[..., Any]:
    """A stage function `train(cfg, name, runtime, ...)` that runs inside its runtime's fast-path scope."""

    @functools.wraps(train)
    def run(cfg: Any, name: str, runtime: Runtime, *args: Any, **kwargs: Any) -> Any:
        with runtime.fast_path_scope():
            return train(cfg, name, runtime, *args, **kwargs)

    return run
