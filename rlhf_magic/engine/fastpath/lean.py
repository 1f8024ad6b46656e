"""Leaner forwards of peft's LoRA layers and Llama's SwiGLU MLP: the same sums, fewer temporaries, less kept for
backward. Each is installed through engine/patching.py and dispatches on a context variable, so only the thread
inside lean_lora() / lean_mlp() runs it."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..patching import original, patched
from . import cpu_bf16

_LEAN_LORA: ContextVar[bool] = ContextVar("rlhf_magic_lean_lora", default=False)
_LEAN_MLP: ContextVar[bool] = ContextVar("rlhf_magic_lean_mlp", default=False)


@functools.cache
def _lora_class() -> Any:
    from peft.tuners.lora.layer import Linear as LoraLinear

    return LoraLinear


def _lean_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's LoRA Linear forward without its per-call bookkeeping: base(x) + scaling * dropout(x) A^T B^T, the
    adapter term added by one addmm (no separate product, scaled copy and sum of [N, out] each). Under
    cpu_bf16's kernels the base product is bf16 and the adapter term and the sum stay fp32."""
    if not _LEAN_LORA.get() or args or kwargs or self.disable_adapters or self.merged or not _lean_applies(self, x):
        return original(_lora_class(), "forward")(self, x, *args, **kwargs)
    result = self.base_layer(x)
    autocast = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
        for name in self.active_adapters:
            a = self.lora_A._modules.get(name)
            if a is None:
                continue
            b = self.lora_B[name]
            flat = torch.mm(self.lora_dropout[name](x).reshape(-1, x.shape[-1]), a.weight.t())
            base = result.reshape(-1, b.weight.shape[0]).to(flat.dtype)
            result = torch.addmm(base, flat, b.weight.t(), alpha=self.scaling[name]).view(*result.shape[:-1], -1)
    return result


def _lean_applies(self: Any, x: torch.Tensor) -> bool:
    """Plain LoRA in x's dtype (not DoRA and friends, lora_bias or casts: peft's own), and no autocast other
    than cpu_bf16's."""
    if torch.is_autocast_enabled(x.device.type) and not cpu_bf16.kernels_active():
        return False
    for name in self.active_adapters:
        a = self.lora_A._modules.get(name)
        plain = a is None or (name not in self.lora_variant and self.lora_B[name].bias is None)
        if not plain or (a is not None and x.dtype != a.weight.dtype):
            return False
    return True


@contextlib.contextmanager
def lean_lora() -> Iterator[None]:
    """Inside, this thread's plain LoRA Linear layers run `_lean_lora_forward` (same sums, with or without
    gradients). Re-entrant; peft's forward is restored when the last block ends."""
    token = _LEAN_LORA.set(True)
    try:
        with patched(_lora_class(), "forward", _lean_lora_forward):
            yield
    finally:
        _LEAN_LORA.reset(token)


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up that keeps only gate and up for backward, where autograd keeps silu(gate) as well (one more
    [tokens, intermediate] tensor per layer). Backward recomputes silu(gate) and then runs autograd's own ops, so
    the gradients are the same bit for bit."""

    @staticmethod
    def forward(ctx, gate, up):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        gate, up = ctx.saved_tensors
        d_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        d_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        return d_gate, d_up


@functools.cache
def _mlp_class_and_silu() -> tuple[Any, tuple[type, ...]]:
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP, (SiLUActivation, nn.SiLU)


def _lean_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    mlp, silu = _mlp_class_and_silu()
    if not _LEAN_MLP.get() or type(self.act_fn) not in silu or not torch.is_grad_enabled():
        return original(mlp, "forward")(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.requires_grad or up.requires_grad:
        return self.down_proj(_SiluMul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


@contextlib.contextmanager
def lean_mlp() -> Iterator[None]:
    """Inside, this thread's LlamaMLP layers keep less for backward (_SiluMul): the same values and gradients, less
    activation memory in training. Re-entrant; transformers' forward is restored when the last block ends."""
    token = _LEAN_MLP.set(True)
    try:
        with patched(_mlp_class_and_silu()[0], "forward", _lean_mlp_forward):
            yield
    finally:
        _LEAN_MLP.reset(token)
