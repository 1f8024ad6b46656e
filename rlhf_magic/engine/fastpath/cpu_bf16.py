"""`precision = 'bf16'` on a CPU: torch's bf16 autocast, with two kernels that make it pay off there.

Plain autocast recasts every frozen fp32 weight to bf16 on every forward, and its bf16 attention backward is much
slower than fp32's on a CPU. Here a frozen weight's bf16 copy is made once and kept (keyed by the weight and its
version, so an in-place change such as merging an adapter makes a new copy), and attention runs in fp32 like the
norms and the residual stream. `saved_activations()` keeps what autograd saves for backward in bf16, as plain bf16
autocast would, to pay for the copies' memory. Figures: bench/README.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ..patching import PROCESS, patched

_TORCH_LINEAR = nn.Linear.forward  # torch's own, as imported (before any patch)
_TORCH_SDPA = F.scaled_dot_product_attention
# This thread's product for nn.Linear inside linear_mode() (the bf16 kernel, or sampling's decode product); None:
# torch's. A context variable, so a thread outside the fast path runs torch's product while the patch is in place.
_LINEAR_MODE: ContextVar[Callable[[nn.Linear, torch.Tensor], torch.Tensor] | None] = ContextVar(
    "rlhf_magic_linear", default=None
)
_KERNELS: ContextVar[bool] = ContextVar("rlhf_magic_bf16_kernels", default=False)


def _active() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def kernels_active() -> bool:
    """Whether this thread is inside kernels()."""
    return _KERNELS.get()


def frozen_copy(weight: torch.Tensor) -> torch.Tensor:
    """The bf16 copy of a frozen weight, made on first use and again after an in-place change."""
    copies = PROCESS.bf16_copies
    hit = copies.get(weight)
    if hit is None or hit[0] != weight._version:
        hit = (weight._version, weight.detach().to(torch.bfloat16))
        copies[weight] = hit
    return hit[1]


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) as a bf16 product with the kept copy of its frozen weight (a bf16 result)."""
    bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), frozen_copy(layer.weight), bias)


def _bf16_product(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if w.requires_grad or w.dtype != torch.float32 or w.device.type != "cpu" or not _active():
        return _TORCH_LINEAR(self, x)
    return linear(self, x)


def _linear(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    mode = _LINEAR_MODE.get()
    return _TORCH_LINEAR(self, x) if mode is None else mode(self, x)


@contextlib.contextmanager
def linear_mode(product: Callable[[nn.Linear, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside, this thread's nn.Linear calls run `product(layer, x)` (the one nn.Linear patch of the fast path)."""
    token = _LINEAR_MODE.set(product)
    try:
        with patched(nn.Linear, "forward", _linear):
            yield
    finally:
        _LINEAR_MODE.reset(token)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if query.device.type != "cpu" or not _active() or not _KERNELS.get():
        return _TORCH_SDPA(query, key, value, *args, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kwargs["attn_mask"] = mask.float()
    with torch.autocast("cpu", enabled=False):
        return _TORCH_SDPA(query.float(), key.float(), value.float(), *args, **kwargs)


@contextlib.contextmanager
def kernels() -> Iterator[None]:
    """Inside, under a CPU bf16 autocast, nn.Linear uses the kept bf16 copy of a frozen weight and
    scaled_dot_product_attention runs in fp32 (see the module docstring). Re-entrant; torch's are restored."""
    token = _KERNELS.set(True)
    try:
        with linear_mode(_bf16_product), patched(F, "scaled_dot_product_attention", _sdpa):
            yield
    finally:
        _KERNELS.reset(token)


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


def torch_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """torch's own nn.Linear product, whatever is patched."""
    return _TORCH_LINEAR(layer, x)
