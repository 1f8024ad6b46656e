"""Trainable wrappers around a causal LM: one trunk forward, then only the heads that are needed.

Each wrapper is an `nn.Module` so accelerate can prepare it (mixed precision, DDP); the HF model inside is the
shared one, with whatever LoRA adapter is active.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..head_logprobs import HeadLogprobs, logprobs_from_head
from . import fastpath
from .fastpath import Prefix, states_above
from .text import IGNORE


def trunk_and_head(model: Any) -> tuple[nn.Module | None, nn.Module]:
    """(decoder trunk, lm head) of a causal LM; trunk is None when logits need model-specific post-processing."""
    cfg = model.config
    special = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    trunk = getattr(model, "get_decoder", lambda: None)()
    head = model.get_output_embeddings()
    return (None if special or trunk is None else trunk), head


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as generation computes them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix | None = None
) -> torch.Tensor:
    """Last hidden states [B, T, H] of the trunk (from a shared frozen prefix when one is given)."""
    trunk, _ = trunk_and_head(model)
    kw = {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask), "use_cache": False}
    if prefix is not None and trunk is not None:
        return states_above(trunk, prefix, **kw)
    if trunk is not None:
        packed = fastpath.packed_states(model, trunk, input_ids, attention_mask)
        if packed is not None:
            return packed
        return trunk(input_ids=input_ids, **kw).last_hidden_state
    out = model(input_ids=input_ids, output_hidden_states=True, **kw)
    return out.hidden_states[-1]


class OverModel(nn.Module):
    """A training module around a transformers model, `self.model`. It names the model's own blocks
    (`_no_split_modules`) because accelerate reads them from the module it prepares: FSDP2 then shards each block
    on its own, and gathers one block at a time instead of the whole model."""

    model: Any

    @property
    def _no_split_modules(self) -> list[str] | None:
        return getattr(self.model, "_no_split_modules", None)


class TokenLoss(OverModel):
    """Mean next-token cross-entropy over positions whose label is not IGNORE (SFT's response-only loss).

    The LM head runs only on those positions, which saves its cost on prompt and padding tokens.
    """

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels[:, 1:]
        keep = targets != IGNORE
        trunk, head = trunk_and_head(self.model)
        if trunk is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
        else:
            hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            logits = head(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep])


def response_hidden(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int, prefix: Prefix | None = None
) -> torch.Tensor:
    """Hidden states at the positions that predict the response tokens (input_ids[:, start:])."""
    return hidden_states(model, input_ids, attention_mask, prefix)[:, start - 1 : -1]


def response_logprobs(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    *,
    prefix: Prefix | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
) -> HeadLogprobs:
    """Log-probs [B, Tr] of the response tokens (input_ids[:, start:]) at `temperature`, and their entropy when
    asked; the LM head never runs on the prompt."""
    hidden = response_hidden(model, input_ids, attention_mask, start, prefix)
    return head_logprobs(model, hidden, input_ids[:, start:], temperature, entropy)


def head_logprobs(
    model: Any, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool = False
) -> HeadLogprobs:
    """The LM head's log-probs of `tokens` from the hidden states that predict them. In float32 (no autocast)
    with a plain linear head, without forming the [B, T, V] logits (logprobs_from_head); else from them."""
    trunk, head = trunk_and_head(model)
    plain = trunk is not None and type(head) is nn.Linear and head.weight.dtype == hidden.dtype == torch.float32
    if plain and not torch.is_autocast_enabled(hidden.device.type):
        return logprobs_from_head(hidden, head.weight, head.bias, tokens, temperature=temperature, entropy=entropy)
    low = fastpath.head_weight_bf16(head.weight) if plain else None
    if low is not None:
        with torch.autocast("cpu", enabled=False):
            return logprobs_from_head(
                hidden, head.weight, head.bias, tokens, temperature=temperature, entropy=entropy, low=low
            )
    logits = head(hidden)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = ops.entropy_from_logits(logits.detach(), temperature)
    return HeadLogprobs(ops.logprobs_from_logits(logits, tokens, temperature), ent)


class PolicyValue(OverModel):
    """The PPO policy and its value function on one trunk: one forward gives log-probs and values."""

    def __init__(self, model: Any, value_head: nn.Module):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        start: int,
        prefix: Prefix | None = None,
        temperature: float = 1.0,
        entropy: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(log-probs, values, entropy or None) of the response tokens input_ids[:, start:]."""
        hidden = response_hidden(self.model, input_ids, attention_mask, start, prefix)
        lp, ent = head_logprobs(self.model, hidden, input_ids[:, start:], temperature, entropy)
        return lp, self.value_head(hidden.float()).squeeze(-1), ent
