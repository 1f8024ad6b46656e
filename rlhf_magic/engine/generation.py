"""Batched sampling with a KV cache and left padding, stopping at EOS."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from . import cpu_bf16, native
from .adapters import lean_lora
from .decode import lean_sample, supports
from .models import LoadedModel
from .modules import trunk_and_head
from .text import encode, format_prompt

LEAN_DECODE = True  # on a CPU, Llama-family models sample with decode.lean_sample instead of generate()


@dataclass
class Rollout:
    """Token ids of a generated batch. `queries` are left-padded, `responses` right-padded with PAD."""

    queries: torch.Tensor  # [B, Tq]
    query_mask: torch.Tensor  # [B, Tq] 1 on real tokens
    responses: torch.Tensor  # [B, Tr]
    hidden: torch.Tensor | None = None  # [B, Tr, H] final hidden states that predicted each response token
    logprobs: torch.Tensor | None = None  # [B, Tr] log-probs of the sampled tokens at the sampling temperature


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(
    lm: LoadedModel, prompts: list[str], max_prompt_tokens: int = 1024, chat: bool = True
) -> list[list[int]]:
    """Chat-formatted prompt ids (raw text ids with chat=False), keeping the last `max_prompt_tokens` tokens."""
    return [encode(lm.tokenizer, format_prompt(lm.tokenizer, p) if chat else p)[-max_prompt_tokens:] for p in prompts]


@torch.no_grad()
def sample(
    lm: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    autocast: Any = None,
    min_new_tokens: int = 0,
    chat: bool = True,
    capture: bool = False,
    bf16_weights: bool = False,
) -> Rollout:
    """Generate for every prompt (each repeated `num_return_sequences` times) in one batched call.

    capture=True also returns, from the decode steps themselves, the final hidden state that predicted each
    response token and that token's log-prob under the raw logits at `temperature` (what PPO's rollout needs;
    None when the model post-processes its logits).

    bf16_weights=True (precision 'bf16' on a CPU): the trunk's frozen linear layers multiply by their kept bf16
    copies (cpu_bf16.frozen_copy), which halves the bytes a decode step reads; activations, adapters and the LM
    head stay fp32."""
    tok = lm.tokenizer
    rows = [r for r in encode_prompts(lm, prompts, chat=chat) for _ in range(num_return_sequences)]
    device = next(lm.model.parameters()).device
    ids, mask = left_pad(rows, tok.pad_token_id, device)
    from transformers import GenerationConfig

    # An explicit config: the model's own defaults (top_k=50, repetition penalties...) would sample from another
    # distribution than the one whose logprobs PPO computes, which shows up as a biased (even negative) KL.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=temperature > 0,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    if temperature > 0:
        gen.temperature, gen.top_p, gen.top_k = temperature, top_p, 0
    if seed is not None:
        torch.manual_seed(seed)
    was_training = lm.model.training
    lm.model.eval()
    steps = _StepCapture(lm.model, temperature) if capture and temperature > 0 else None
    try:
        # no autocast on a CPU: activations, adapters and the LM head stay fp32 (the native kernel and the captured
        # logprobs are fp32); with bf16_weights the frozen trunk layers read their bf16 copies instead
        ctx = autocast() if autocast and device.type != "cpu" else _null()
        low = bf16_weights and device.type == "cpu"
        with ctx, skinny_linear(device, low and trunk_and_head(lm.model)[1]), fast_sampling(device), steps or _null():
            if LEAN_DECODE and device.type == "cpu" and top_p >= 1.0 and supports(lm.model):
                responses = lean_sample(lm.model, ids, mask, **_lean_settings(gen), use_native=not low)
            else:
                out = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)
                responses = out[:, ids.shape[1] :]
    finally:
        lm.model.train(was_training)
    result = Rollout(ids, mask, responses)
    if steps is not None:
        result.hidden, result.logprobs = steps.collect(result.responses)
    return result


def _lean_settings(gen: Any) -> dict[str, Any]:
    """The part of generate()'s config that decode.lean_sample takes (no top-p: generate() keeps that)."""
    return {
        "max_new_tokens": gen.max_new_tokens,
        "min_new_tokens": gen.min_new_tokens or 0,
        "temperature": gen.temperature if gen.do_sample else 0.0,
        "eos_token_id": gen.eos_token_id,
        "pad_token_id": gen.pad_token_id,
    }


class _StepCapture:
    """A hook on the LM head during generate: each step's last hidden state and the logsumexp of its scaled
    logits. The sampled token's log-prob is then its logit (hidden . W[token] + b) / T minus that logsumexp,
    without keeping any [B, V] tensor."""

    def __init__(self, model: Any, temperature: float):
        trunk, self.head = trunk_and_head(model)
        self.ok = trunk is not None  # else the logits are post-processed after the head: nothing to capture
        self.temperature = temperature
        self.hidden: list[torch.Tensor] = []
        self.lse: list[torch.Tensor] = []

    def _hook(self, module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.hidden.append(inputs[0][:, -1].detach().clone())
        self.lse.append(torch.logsumexp(output[:, -1].detach().float() / self.temperature, dim=-1))

    def __enter__(self) -> None:
        self.handle = self.head.register_forward_hook(self._hook) if self.ok else None

    def __exit__(self, *a: Any) -> None:
        if self.handle is not None:
            self.handle.remove()

    def collect(self, responses: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.ok or len(self.hidden) != responses.shape[1]:
            return None, None
        hidden = torch.stack(self.hidden, 1)  # [B, Tr, H]
        bias = getattr(self.head, "bias", None)
        lse = torch.stack(self.lse, 1)
        return hidden, ops.logprobs_from_hidden(hidden, self.head.weight, bias, responses, lse, self.temperature)


_LINEAR_FORWARD = torch.nn.Linear.forward
_SKINNY_ROWS = 256


_BF16_SKIP: list[Any] = []  # while sampling with bf16_weights: [the LM head, which stays fp32]


def _skinny_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _BF16_SKIP and self is not _BF16_SKIP[0] and not self.weight.requires_grad and x.dtype == torch.float32:
        return cpu_bf16.linear(self, x).float()
    rows = x.numel() // self.in_features
    if rows > _SKINNY_ROWS or x.shape[-1] != self.in_features:
        return _LINEAR_FORWARD(self, x)
    flat = x.reshape(rows, self.in_features)
    y = native.skinny_linear(flat, self.weight, self.bias)
    if y is not None:
        return y.reshape(*x.shape[:-1], self.out_features)
    y = torch.mm(self.weight, flat.t()).t()
    if self.bias is not None:
        y = y + self.bias
    return y.reshape(*x.shape[:-1], self.out_features)


@contextmanager
def skinny_linear(device: torch.device, bf16_except: Any = None) -> Iterator[None]:
    """On a CPU, every nn.Linear computes its product for inputs of a few rows, as in a decode step, with the
    native kernel (engine/native.py) up to native.MAX_ROWS rows, else as (W @ x.T).T; and peft's LoRA layers skip
    their per-call bookkeeping.

    The same products, faster: MKL runs them faster when the weight is the left operand (0.59 ms against 0.91 ms
    for 8 x 576 times 576 x 1536 with the weight out of cache, 2-core EPYC, fp32), and the native kernel reads the
    weight once at close to memory speed (48 tokens for 8 answers: 8.0 s against 10.5 s)."""
    if device.type != "cpu" or torch.nn.Linear.forward is not _LINEAR_FORWARD:
        yield
        return
    torch.nn.Linear.forward = _skinny_forward  # type: ignore[method-assign]
    _BF16_SKIP[:] = [bf16_except] if bf16_except else []
    try:
        with lean_lora():
            yield
    finally:
        torch.nn.Linear.forward = _LINEAR_FORWARD  # type: ignore[method-assign]
        _BF16_SKIP.clear()


_MULTINOMIAL = torch.multinomial


def _fast_multinomial(probs: torch.Tensor, num_samples: int = 1, replacement: bool = False, **kw: Any) -> torch.Tensor:
    if num_samples != 1 or kw or probs.dim() != 2 or probs.shape[1] < ops.CATEGORICAL_BLOCK:
        return _MULTINOMIAL(probs, num_samples, replacement, **kw)
    try:
        return ops.categorical(probs)
    except ValueError:  # inf or nan: torch.multinomial's own error
        return _MULTINOMIAL(probs, num_samples, replacement)


@contextmanager
def fast_sampling(device: torch.device) -> Iterator[None]:
    """On a CPU, generate's torch.multinomial(probs, 1) draws from the same distribution with ops.categorical():
    0.5 ms instead of 11 ms for 8 rows x 49k tokens (multinomial draws one exponential number per vocabulary entry),
    about 6% of a decode step."""
    if device.type != "cpu" or torch.multinomial is not _MULTINOMIAL:
        yield
        return
    torch.multinomial = _fast_multinomial  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.multinomial = _MULTINOMIAL


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def decode(lm: LoadedModel, responses: torch.Tensor) -> list[str]:
    """Answer texts: everything up to the first EOS, special tokens removed."""
    tok = lm.tokenizer
    texts = []
    for row in responses.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts
