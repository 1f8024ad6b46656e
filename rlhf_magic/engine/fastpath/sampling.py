"""Sampling on a CPU: the decoder chosen once per call, with cheaper products and draws.

- Llama-family models sample with decode.lean_sample (generate()'s sums without its machinery); others, and
  `top_p < 1`, keep generate().
- Either way, every nn.Linear computes a few-row product (a decode step) with the native kernel, or with the weight
  as the left operand, which MKL runs faster; with `bf16_weights` the trunk's frozen layers read their kept bf16
  copies instead (half the bytes a decode step reads); the LM head stays fp32.
- generate()'s torch.multinomial(probs, 1) draws from the same distribution with ops.categorical(), which does not
  draw one exponential number per vocabulary entry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import nn

from ... import ops
from ..divergence import raise_non_finite
from ..patching import original, patched
from . import cpu_bf16, native
from .decode import lean_sample, supports
from .lean import lean_lora

SKINNY_ROWS = 256  # products of up to this many rows take the weight as the left operand

Decoder = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, mask) -> responses


def _decode_product(layer: nn.Linear, x: torch.Tensor, *, keep_fp32: Any) -> torch.Tensor:
    frozen = keep_fp32 is not None and layer is not keep_fp32 and not layer.weight.requires_grad
    if frozen and x.dtype == torch.float32:
        return cpu_bf16.linear(layer, x).float()
    rows = x.numel() // layer.in_features
    if rows > SKINNY_ROWS or x.shape[-1] != layer.in_features:
        return cpu_bf16.torch_linear(layer, x)
    flat = x.reshape(rows, layer.in_features)
    y = native.skinny_linear(flat, layer.weight, layer.bias)
    if y is None:
        y = torch.mm(layer.weight, flat.t()).t()
        if layer.bias is not None:
            y = y + layer.bias
    return y.reshape(*x.shape[:-1], layer.out_features)


@contextmanager
def skinny_linear(bf16_except: nn.Module | None = None) -> Iterator[None]:
    """Inside, this thread's nn.Linear layers compute decode-step products as above, and peft's LoRA layers skip
    their per-call bookkeeping. `bf16_except`: the layer (the LM head) that stays fp32 when the other frozen
    layers read their bf16 copies; None: every layer in fp32."""
    with cpu_bf16.linear_mode(partial(_decode_product, keep_fp32=bf16_except)), lean_lora():
        yield


def _fast_multinomial(probs: torch.Tensor, num_samples: int = 1, replacement: bool = False, **kw: Any) -> torch.Tensor:
    torch_multinomial = original(torch, "multinomial")
    if num_samples != 1 or kw or probs.dim() != 2 or probs.shape[1] < ops.CATEGORICAL_BLOCK:
        return torch_multinomial(probs, num_samples, replacement, **kw)
    try:
        return ops.categorical(probs)
    except ValueError:  # inf or nan: one line (divergence.finite_logits stops such logits first); else torch's error
        if not bool(torch.isfinite(probs).all()):
            raise_non_finite(probs)
        return torch_multinomial(probs, num_samples, replacement)


@contextmanager
def fast_sampling() -> Iterator[None]:
    """Inside, torch.multinomial(probs, 1) draws with ops.categorical() (the same distribution)."""
    with patched(torch, "multinomial", _fast_multinomial):
        yield


def decoder(model: Any, plain: Decoder, settings: dict[str, Any], *, bf16_weights: bool) -> Decoder:
    """The CPU decoder for `model`: the lean loop where it applies (no top-p), else `plain` (generate()), both
    under the decode products and the fast draw. `settings`: what lean_sample takes besides ids and mask."""
    head = model.get_output_embeddings() if bf16_weights else None
    lean = settings.get("top_p", 1.0) >= 1.0 and supports(model)
    kwargs = {k: v for k, v in settings.items() if k != "top_p"}

    def run(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with skinny_linear(head), fast_sampling():
            if lean:
                return lean_sample(model, ids, mask, **kwargs, use_native=not bf16_weights)
            return plain(ids, mask)

    return run
