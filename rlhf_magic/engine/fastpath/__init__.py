"""The CPU fast path: every CPU speed specialisation of the engine, behind this one entry and one switch.

The algorithm files (sft, reward, ppo, rollout, generation) call only what is defined here. Turned off, by
RLHF_MAGIC_FASTPATH=0 or the setting `fast_path = False`, or on any device other than a CPU, each entry below
returns the plain transformers/peft/torch behaviour: the path a GPU runs. What the fast path does, on a CPU:

- sampling: a lean decode loop for Llama-family models, native few-row products, a cheaper categorical draw;
- training: leaner LoRA and SwiGLU forwards, packed rows (no padding, a shared prompt once), a frozen prefix
  computed once per rollout, and the PPO update in memory-bounded chunks reusing a tensor memory pool;
- precision 'bf16': kept bf16 copies of frozen weights, fp32 attention, bf16 saved activations.

Everything that replaces third-party code goes through engine/patching.py (re-entrant, thread-safe, restored on
error). RLHF_MAGIC_NATIVE=0 turns off the compiled parts alone (kernels, memory pool).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch

from .prefix import Prefix, prefix_states, states_above

__all__ = ["Prefix", "prefix_states", "states_above"]  # with the functions below: the engine's entry

ENV_VAR = "RLHF_MAGIC_FASTPATH"
CPU_CHUNK_TOKENS = 768  # tokens per PPO chunk that run every layer with gradients, on a CPU (see chunk_rows)

# Whether the fast path is on in this thread: set by scope() around each stage and handle call; None outside any
# scope, where the environment decides.
_ON: ContextVar[bool | None] = ContextVar("rlhf_magic_fast_path", default=None)


def enabled_by_env() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


@contextlib.contextmanager
def scope(enabled: bool, device: Any) -> Iterator[None]:
    """Inside, the fast path is on when `enabled`, the environment allows it and `device` is a CPU."""
    token = _ON.set(bool(enabled) and enabled_by_env() and _is_cpu(device))
    try:
        yield
    finally:
        _ON.reset(token)


def on(device: Any = None) -> bool:
    """Whether this thread runs the fast path (for work on `device`, when given)."""
    flag = _ON.get()
    flag = enabled_by_env() if flag is None else flag
    return flag and (device is None or _is_cpu(device))


def _is_cpu(device: Any) -> bool:
    return getattr(device, "type", str(device)) == "cpu"


# ------------------------------------------------------------------------------------------------ sampling
def sampler(model: Any, plain: Callable[..., torch.Tensor], settings: dict[str, Any], *, bf16_weights: bool) -> Any:
    """The decoder (ids, mask) -> responses for one sampling call: `plain` (generate()), or on the fast path the
    CPU decoder (see sampling.py). `settings`: max_new_tokens, min_new_tokens, temperature, top_p, eos/pad ids."""
    if not on(model.device):
        return plain
    from .sampling import decoder

    return decoder(model, plain, settings, bf16_weights=bf16_weights)


# ------------------------------------------------------------------------------------------------ training
@contextlib.contextmanager
def lean_layers(*, mlp: bool = False) -> Iterator[None]:
    """Leaner LoRA forwards (and, with mlp=True, SwiGLU MLPs that keep less for backward) for a training loop."""
    if not on():
        yield
        return
    from .lean import lean_lora, lean_mlp

    with lean_lora(), lean_mlp() if mlp else contextlib.nullcontext():
        yield


def bf16_kernels(device: Any, precision: str) -> contextlib.AbstractContextManager[None]:
    """The bf16 kernels where `precision` is bf16 on a CPU (pair with torch's autocast), else nothing."""
    if precision != "bf16" or not on(device):
        return contextlib.nullcontext()
    from .cpu_bf16 import kernels

    return kernels()


@contextlib.contextmanager
def update(accelerator: Any) -> Iterator[None]:
    """Around a PPO update: the bf16 kernels under CPU bf16, and the memory pool that lets its chunks reuse each
    other's blocks."""
    device = accelerator.device
    with bf16_kernels(device, accelerator.mixed_precision):
        if on(device):
            from .cpu_pool import pooled

            with pooled(device):
                yield
        else:
            yield


@contextlib.contextmanager
def chunk(device: Any) -> Iterator[None]:
    """Around one chunk's forward pass: free memory handed back first, saved activations kept in bf16 under the
    bf16 kernels."""
    if not on(device):
        yield
        return
    from .cpu_bf16 import saved_activations
    from .cpu_pool import release_free_memory

    release_free_memory()
    with saved_activations():
        yield


def chunk_rows(device: Any, trained_share: float, row_tokens: int) -> int | None:
    """Answers per forward/backward chunk on the fast path: as many rows of `row_tokens` tokens as keep about
    CPU_CHUNK_TOKENS tokens running with gradients (only the top `trained_share` of the layers do, above a shared
    frozen prefix). None off the fast path: the whole minibatch at once."""
    if not on(device):
        return None
    per_row = max(row_tokens, 1) * max(trained_share, 1e-3)
    return max(1, int(CPU_CHUNK_TOKENS // per_row))


def capture_while_sampling(device: Any, *, chunked: bool, mixed_precision: str) -> bool:
    """Keep the policy's logprobs and hidden states from the decode steps (saves PPO a forward pass when its update
    runs in chunks; in fp32 only, where decode and forward agree)."""
    return on(device) and chunked and mixed_precision == "no"


# ------------------------------------------------------------------------------------------------ forward passes
def head_weight_bf16(weight: torch.Tensor) -> torch.Tensor | None:
    """The kept bf16 copy of a frozen LM-head weight while the bf16 kernels run, else None."""
    if not on(weight.device) or weight.requires_grad:
        return None
    from . import cpu_bf16

    return cpu_bf16.frozen_copy(weight) if cpu_bf16.kernels_active() else None


def packed_states(model: Any, trunk: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
    """The trunk's last hidden states of a padded batch computed as packed rows, or None (off, or not worth it)."""
    if not on(input_ids.device):
        return None
    from .packing import pack_rows

    packed = pack_rows(model, input_ids, attention_mask)
    return None if packed is None else packed.states(trunk)


def prefix_depth(model: Any, adapters: Sequence[str]) -> int:
    """Bottom layers that no adapter or trainable weight touches, to compute once per rollout (0: none, or off)."""
    if not on(model.device):
        return 0
    from .prefix import frozen_depth

    return frozen_depth(model, adapters)


def trained_share(model: Any, depth: int) -> float:
    """The share of the layers that run with gradients above a shared prefix of `depth` layers."""
    layers = getattr(model.config, "num_hidden_layers", 0) or 1
    return (layers - depth) / layers if depth > 0 else 1.0
