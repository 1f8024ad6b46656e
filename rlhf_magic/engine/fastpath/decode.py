"""A lean sampling loop for Llama-family models on a CPU: generate()'s sums without generate()'s machinery.

transformers' generate() spends much of a small model's decode step in Python: module calls with keyword
arguments, a mask built every step, a KV cache that grows by concatenation, stopping criteria and logits
processors. Here the same layers run from one loop:

- the rotary embedding of every position is computed once, and the KV cache is preallocated and written in place;
- a linear layer with a few rows is one native call (native.lora_linear: the product, plus the active LoRA
  adapters' term in the same accumulators); with more rows (the prompt) or precision 'bf16' it runs its own
  `forward`; the norms, rotary product and attention are transformers' own functions, in the same order;
- sampling is generate()'s: EOS masked while below `min_new_tokens`, logits / temperature, softmax, one draw per
  row from `torch.multinomial` (what fast_sampling patches), PAD after a row's EOS, stop when every row has ended.

So the tokens are the ones generate() would sample from the same seed, and the log-probs agree to float rounding
(tests/test_decode.py checks both). Models
that are not plain Llamas (other layouts, module hooks, another attention implementation) keep generate()."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import native

LEAN_MODEL_TYPES = ("llama",)
ATTENTION = ("sdpa", "eager")


def supports(model: Any) -> bool:
    """Whether `lean_sample` can run this model: a Llama causal LM with a plain layer stack and no module hooks."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in LEAN_MODEL_TYPES or cfg._attn_implementation not in ATTENTION:
        return False
    trunk = getattr(model, "get_decoder", lambda: None)()
    if trunk is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    if not all(hasattr(trunk, n) for n in needed) or model.get_output_embeddings() is None:
        return False
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in trunk.layers.modules())
    return not hooked and _rotary(model) is not None


def _rotary(model: Any) -> Callable[..., Any] | None:
    return getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None)


@torch.no_grad()
def lean_sample(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    use_native: bool = True,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` tokens after the left-padded prompts `ids` ([B, Tq], `mask` 1 on real
    tokens); returns the responses [B, Tr], PAD after each row's EOS. The LM head is called as a module once per
    token (its hooks run: generation._StepCapture reads each step there). use_native=False: every linear layer
    runs its own forward (precision 'bf16', whose decode reads bf16 copies of the frozen weights)."""
    trunk, head = model.get_decoder(), model.get_output_embeddings()
    cfg = model.config
    batch, width = ids.shape
    total = width + max_new_tokens
    real = torch.cat([mask.bool(), mask.new_ones(batch, max_new_tokens, dtype=torch.bool)], dim=1)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)  # as modules.position_ids: left padding ignored
    x = trunk.embed_tokens(ids)
    cos, sin = trunk.rotary_emb(x, positions)
    attn0 = trunk.layers[0].self_attn
    kv_heads = cfg.num_key_value_heads
    cache = [
        (x.new_empty(batch, kv_heads, total, attn0.head_dim), x.new_empty(batch, kv_heads, total, attn0.head_dim))
        for _ in range(cfg.num_hidden_layers)
    ]
    run = _Stack(model, cache, use_native)
    eager = cfg._attn_implementation == "eager"
    # the prompt: causal and padding mask (a padded query sees itself, so nothing is ever all masked)
    causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
    allowed = (causal[None] & real[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=ids.device)
    hidden = run(x, 0, cos[:, :width], sin[:, :width], _mask(allowed[:, None], eager, x.dtype))
    keys = _mask(real[:, None, None, :], eager, x.dtype)  # decode steps: every real key so far
    eos = eos_token_id
    unfinished = torch.ones(batch, dtype=torch.bool, device=ids.device)
    out: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        logits = head(trunk.norm(hidden[:, -1:]))[:, -1].to(copy=True, dtype=torch.float32)
        if eos is not None and step < min_new_tokens:
            logits[:, eos] = -float("inf")
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            token = torch.argmax(logits, dim=-1)
        if eos is not None:
            token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
            unfinished &= token != eos
        out.append(token)
        if not bool(unfinished.any()) or step + 1 == max_new_tokens:
            break
        t = width + step
        x = trunk.embed_tokens(token[:, None])
        hidden = run(x, t, cos[:, t : t + 1], sin[:, t : t + 1], keys[..., : t + 1])
    return torch.stack(out, 1)


def _mask(allowed: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask, made once: 0 where a query may attend, else -inf for sdpa (what sdpa would make of a
    boolean mask on every call) or the dtype's minimum for eager (as transformers)."""
    low = torch.finfo(dtype).min if eager else -float("inf")
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, low)


class _Linear:
    """One linear layer, resolved once per call: for a few rows, the native product, with the active LoRA
    adapters' term in the same pass (native.lora_linear); else, or for anything but plain LoRA on an nn.Linear,
    the layer's own forward."""

    __slots__ = ("bias", "forward", "lora", "weight")

    def __init__(self, module: nn.Module, use_native: bool):
        self.forward = module.forward
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.lora: tuple[torch.Tensor, torch.Tensor] | None = None
        base = getattr(module, "base_layer", module)
        if not use_native or type(base) is not nn.Linear or base.weight.dtype != torch.float32:
            return
        if base is not module:
            terms = _plain_lora_terms(module)
            if terms is None:
                return
            if terms:
                self.lora = (torch.cat([a for a, _ in terms]), torch.cat([b for _, b in terms], dim=1))
        self.weight, self.bias = base.weight, base.bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            rows = x.numel() // x.shape[-1]
            if rows <= native.MAX_ROWS:
                flat = x.reshape(rows, -1)
                if self.lora is None:
                    y = native.skinny_linear(flat, self.weight, self.bias)
                else:
                    y = native.lora_linear(flat, self.weight, self.bias, *self.lora)
                if y is not None:
                    return y.view(*x.shape[:-1], -1)
        return self.forward(x)


def _plain_lora_terms(module: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(lora_A, lora_B times scaling) of each active adapter of a peft LoRA layer in eval mode; [] with adapters
    off; None for anything else (merged weights, DoRA and other variants, adapter biases, other dtypes)."""
    if module.merged or module.training:
        return None
    if module.disable_adapters:
        return []
    terms = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b = module.lora_A[name].weight, module.lora_B[name]
        if name in module.lora_variant or b.bias is not None or a.dtype != torch.float32:
            return None
        terms.append((a.detach(), b.weight.detach() * float(module.scaling[name])))
    return terms


class _Stack:
    """The decoder layers over a chunk of positions [t, t + T), writing their keys and values into the cache."""

    def __init__(self, model: Any, cache: list[tuple[torch.Tensor, torch.Tensor]], use_native: bool):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        trunk = model.get_decoder()
        self.layers = list(trunk.layers[: model.config.num_hidden_layers])
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        self.linears = [
            [_Linear(getattr(layer.self_attn, n), use_native) for n in names]
            + [_Linear(getattr(layer.mlp, n), use_native) for n in ("gate_proj", "up_proj", "down_proj")]
            for layer in self.layers
        ]
        self.cache = cache
        self.rotary = _rotary(model)
        module = sys.modules[type(model).__module__]
        self.attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            model.config._attn_implementation, module.eager_attention_forward
        )

    def __call__(self, x: torch.Tensor, t: int, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> Any:
        batch, length, _ = x.shape
        end = t + length
        for layer, (q_proj, k_proj, v_proj, o_proj, gate, up, down), (keys, values) in zip(
            self.layers, self.linears, self.cache
        ):
            attn = layer.self_attn
            h = layer.input_layernorm.forward(x)
            shape = (batch, length, -1, attn.head_dim)
            q = q_proj(h).view(shape).transpose(1, 2)
            k = k_proj(h).view(shape).transpose(1, 2)
            v = v_proj(h).view(shape).transpose(1, 2)
            q, k = self.rotary(q, k, cos, sin)
            keys[:, :, t:end] = k
            values[:, :, t:end] = v
            o, _ = self.attend(attn, q, keys[:, :, :end], values[:, :, :end], mask, dropout=0.0, scaling=attn.scaling)
            x = x + o_proj(o.reshape(batch, length, -1).contiguous())
            h = layer.post_attention_layernorm.forward(x)
            x = x + down(layer.mlp.act_fn(gate(h)) * up(h))
        return x
