"""The log-probs of chosen tokens from an LM head's input, without ever forming the [..., V] logits: an autograd
function over vocabulary chunks (an online logsumexp forward, a softmax @ W backward). Beside ops.py, which holds
the plain maths it must equal (ops.logprobs_from_logits, ops.entropy_from_logits; tests/test_ops.py compares)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KEEP_LOGITS_BYTES = 64 * 2**20  # logprobs_from_head keeps the logits for backward up to this size


class HeadLogprobs(NamedTuple):
    logprobs: torch.Tensor
    entropy: torch.Tensor | None


class _Settings(NamedTuple):
    temperature: float
    entropy: bool
    chunk: int
    keep: bool  # keep the scaled logits for backward (else recompute them chunk by chunk)
    low: torch.Tensor | None  # a bf16 copy of the frozen weight for the [N, V]-sized products, or None


def logprobs_from_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk: int = 2048,
    low: torch.Tensor | None = None,
) -> HeadLogprobs:
    """log softmax((hidden @ weight.T + bias) / temperature)[tokens] (and, with entropy=True, the entropy of that
    distribution, without gradient) for float32 inputs, without ever forming the [..., V] logits.

    `low`, a bf16 copy of a frozen `weight`, runs the two [N, V]-sized products (the logits under the logsumexp,
    and softmax @ W in the backward pass) in bf16 with fp32 sums across chunks; the sampled token's own logit
    stays in float32.

    The vocabulary is processed `chunk` rows of `weight` at a time (an online logsumexp), so the forward holds one
    [chunk, N] block instead of several [N, V] ones. For the
    backward pass the scaled logits are kept while they take at most KEEP_LOGITS_BYTES (one [N, V] block, which
    saves recomputing the head's product), else each chunk is recomputed. Gradients reach hidden, and weight/bias
    when they require them. hidden [..., H], weight [V, H], tokens [...]."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = tokens.shape
    h, idx = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    keep = grad and h.shape[0] * weight.shape[0] * h.element_size() <= KEEP_LOGITS_BYTES
    if low is not None and (weight.requires_grad or low.shape != weight.shape):
        raise ValueError("logprobs_from_head: `low` must be a copy of a frozen weight")
    lp, ent = _HeadLogprobs.apply(h, weight, bias, idx, _Settings(float(temperature), entropy, chunk, keep, low))
    return HeadLogprobs(lp.view(shape), ent.view(shape) if entropy else None)


class _HeadLogprobs(torch.autograd.Function):
    """Forward: an online logsumexp (and entropy) over vocabulary chunks. Backward: d lp / d z = onehot - softmax,
    so grad_h = g / T * (W[token] - softmax(z) @ W), with softmax from the kept logits or recomputed chunk by
    chunk."""

    @staticmethod
    def forward(ctx, h, weight, bias, idx, settings):  # type: ignore[no-untyped-def, override]
        temperature, want_entropy, chunk, keep, low = settings
        # m: running max of z = logits / T; s = sum exp(z - m); a = sum exp(z - m) * (z - m) (for the entropy)
        m = torch.full((h.shape[0],), -math.inf, dtype=h.dtype, device=h.device)
        s, a = torch.zeros_like(m), torch.zeros_like(m)
        kept = []
        for c, z in _scaled_logit_chunks(h, low if low is not None else weight, bias, temperature, chunk):
            new = torch.maximum(m, z.amax(0))
            rescale, shift = torch.exp(m - new), torch.where(torch.isfinite(m), m - new, 0.0)
            if keep:
                kept.append((c, z))
            z = z - new if keep else z.sub_(new)
            e = z.exp()
            if want_entropy:
                a = rescale * (a + s * shift) + (e * z).sum(0)
            s = rescale * s + e.sum(0)
            m = new
        lse = m + s.log()
        chosen = (h * weight[idx]).sum(-1) + (0 if bias is None else bias[idx])
        ent = (s.log() - a / s) if want_entropy else lse.new_zeros(0)
        ctx.save_for_backward(h, weight, bias, idx, lse)
        ctx.temperature, ctx.chunk, ctx.kept, ctx.low = temperature, chunk, kept or None, low
        ctx.mark_non_differentiable(ent)
        return chosen / temperature - lse, ent

    @staticmethod
    def backward(ctx, grad_lp, _grad_ent):  # type: ignore[no-untyped-def, override]
        h, weight, bias, idx, lse = ctx.saved_tensors
        g = grad_lp / ctx.temperature  # d lp / d logits = (onehot - p) / T
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h_t = torch.zeros_like(h.t())  # [H, N]: W[c].T @ p is the faster product on a CPU
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        low = ctx.low
        product = low if low is not None else weight
        chunks = ctx.kept or _scaled_logit_chunks(h, product, bias, ctx.temperature, ctx.chunk)
        ctx.kept = ctx.low = None
        for c, z in chunks:
            p = z.sub_(lse).exp_().mul_(g)  # [C, N]: softmax * g
            if low is None:
                grad_h_t.addmm_(weight[c].t(), p, alpha=-1.0)
            else:
                grad_h_t.sub_(torch.mm(low[c].t(), p.to(low.dtype)))
            if grad_w is not None:
                grad_w[c].addmm_(p, h, alpha=-1.0)
            if grad_b is not None:
                grad_b[c] -= p.sum(1)
        grad_h = grad_h_t.t() + g[:, None] * weight[idx]
        if grad_w is not None:
            grad_w.index_add_(0, idx, g[:, None] * h)
        if grad_b is not None:
            grad_b.index_add_(0, idx, g)
        return grad_h, grad_w, grad_b, None, None


def _scaled_logit_chunks(h, weight, bias, temperature, chunk):  # type: ignore[no-untyped-def]
    """(slice, (weight[slice] @ h.T + bias[slice]) / T) for each chunk of the vocabulary: [C, N] float32 blocks
    (the product in weight's dtype)."""
    h_t = h.t().to(weight.dtype).contiguous()
    for start in range(0, weight.shape[0], chunk):
        c = slice(start, start + chunk)
        z = torch.mm(weight[c], h_t).to(h.dtype)
        if bias is not None:
            z.add_(bias[c, None])
        yield c, z.mul_(1.0 / temperature)
