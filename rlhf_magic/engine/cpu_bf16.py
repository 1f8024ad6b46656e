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
The copies cost 2 bytes per frozen weight (~0.2 GB for SmolLM2-135M) and go with the model. To pay for them,
`saved_activations()` keeps what autograd saves for backward in bf16, as plain bf16 autocast would (a PPO chunk
of 4 x ~90 tokens: ~0.22 instead of ~0.44 GB; ~3% more time in its forward + backward)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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


SAVED_MIN_NUMEL = 1 << 16  # smaller saved tensors stay as they are (not worth a cast)


def saved_activations() -> contextlib.AbstractContextManager[None]:
    """Inside kernels(): large fp32 activations that autograd saves for backward are kept in bf16 and cast back to
    fp32 when backward reads them (values stay fp32; gradients see bf16-rounded activations). A tensor saved by
    several nodes (a norm's output read by q, k and v) is packed once. Parameters, tensors that need no gradient
    (masks) and small tensors are kept as they are. Outside kernels(): nothing."""
    if not kernels_active():
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(*bf16_packer())


def bf16_packer() -> tuple[Callable[[torch.Tensor], Any], Callable[[Any], torch.Tensor]]:
    """The (pack, unpack) pair of saved_activations(), with its own record of what it has packed."""
    packed: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def pack(t: torch.Tensor) -> Any:
        if t.dtype is not torch.float32 or t.grad_fn is None or t.numel() < SAVED_MIN_NUMEL:
            return t
        hit = packed.get(t)
        if hit is None:
            hit = packed[t] = (t.to(torch.bfloat16),)
        return hit

    def unpack(p: Any) -> torch.Tensor:
        return p[0].float() if isinstance(p, tuple) else p

    return pack, unpack


@contextlib.contextmanager
def autocast() -> Iterator[None]:
    """bf16 mixed precision for forward passes on a CPU: torch's autocast with the kernels above."""
    with kernels(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def kernels_for(accelerator: Any) -> contextlib.AbstractContextManager[None]:
    """kernels() where an accelerate object runs bf16 autocast on a CPU, else nothing."""
    cpu_bf16 = accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    return kernels() if cpu_bf16 else contextlib.nullcontext()
