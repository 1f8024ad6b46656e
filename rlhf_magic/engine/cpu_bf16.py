"""What `precision = 'bf16'` means on a CPU: torch's bf16 autocast, with two kernels that make it pay off there.

On a CPU with native bf16 matrix units (Intel AMX, AVX512-BF16) a bf16 product runs 2.5-5x faster than fp32
(768 x 576 x 1536: 300-630 against 120-130 GFLOP/s on a 2-core Sapphire Rapids). Plain autocast wastes most of
that on a LoRA model:
- it recasts every frozen fp32 weight to bf16 on every forward (10% of a training chunk in `copy_`); here a
  frozen weight's bf16 copy is made once and kept, keyed by the weight and its version (an in-place change,
  such as merging an adapter, makes a new copy);
- its bf16 attention backward is ~5x slower than fp32's on a CPU (351 vs 75 ms for a chunk of 4 x 96 tokens
  of SmolLM2-135M); here attention runs in fp32, like the norms and the residual stream.
A chunk's forward + backward: 1.36-1.53 s against 2.06-2.19 s in fp32 (SmolLM2-135M, LoRA on every layer).
The copies cost 2 bytes per frozen weight (~0.2 GB for SmolLM2-135M) and go with the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_LINEAR = nn.Linear.forward
_SDPA = F.scaled_dot_product_attention
_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _active() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def kernels_active() -> bool:
    """Whether nn.Linear runs this module's bf16 kernel (inside kernels())."""
    return nn.Linear.forward is _linear


def frozen_copy(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of a frozen weight, made on first use and again after an in-place change."""
    hit = _COPIES.get(weight)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, weight.detach().to(torch.bfloat16))
        _COPIES[weight] = hit
    return hit[1]


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) as a bf16 product with the kept copy of its frozen weight (a bf16 result)."""
    bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), frozen_copy(layer.weight), bias)


def _linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.requires_grad or w.dtype != torch.float32 or w.device.type != "cpu" or not _active():
        return _LINEAR(self, x)
    return linear(self, x)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if query.device.type != "cpu" or not _active():
        return _SDPA(query, key, value, *args, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        return _SDPA(query.float(), key.float(), value.float(), *args, **kwargs)


@contextlib.contextmanager
def kernels() -> Iterator[None]:
    """Inside, under a CPU bf16 autocast, nn.Linear uses the kept bf16 copy of a frozen weight and
    scaled_dot_product_attention runs in fp32 (see the module docstring). Re-entrant; torch's are restored."""
    if nn.Linear.forward is not _LINEAR or F.scaled_dot_product_attention is not _SDPA:  # inside, or patched
        yield
        return
    nn.Linear.forward = _linear  # type: ignore[method-assign]
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        nn.Linear.forward = _LINEAR  # type: ignore[method-assign]
        F.scaled_dot_product_attention = _SDPA


@contextlib.contextmanager
def autocast() -> Iterator[None]:
    """bf16 mixed precision for forward passes on a CPU: torch's autocast with the kernels above."""
    with kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def kernels_for(accelerator: Any) -> contextlib.AbstractContextManager[None]:
    """kernels() where an accelerate object runs bf16 autocast on a CPU, else nothing."""
    cpu_bf16 = accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    return kernels() if cpu_bf16 else contextlib.nullcontext()
