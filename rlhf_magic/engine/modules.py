"""Trainable wrappers around a causal LM: one trunk forward, then only the heads that are needed.

Each wrapper is an `nn.Module` so accelerate can prepare it (mixed precision, DDP); the HF model inside is the
shared one, with whatever LoRA adapter is active.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def hidden_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of the trunk."""
    trunk, _ = trunk_and_head(model)
    kw = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids(attention_mask)}
    if trunk is not None:
        return trunk(**kw, use_cache=False).last_hidden_state
    out = model(**kw, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1]


class TokenLoss(nn.Module):
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


def response_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states at the positions that predict the response tokens (input_ids[:, start:])."""
    return hidden_states(model, input_ids, attention_mask)[:, start - 1 : -1]


def response_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int) -> torch.Tensor:
    """Logits [B, Tr, V] for the response tokens only (the LM head never runs on the prompt)."""
    _, head = trunk_and_head(model)
    return head(response_hidden(model, input_ids, attention_mask, start))


class PolicyValue(nn.Module):
    """The PPO policy and its value function on one trunk: one forward gives logits and values."""

    def __init__(self, model: Any, value_head: nn.Module):
        super().__init__()
        self.model, self.value_head = model, value_head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = response_hidden(self.model, input_ids, attention_mask, start)
        _, head = trunk_and_head(self.model)
        return head(hidden), self.value_head(hidden.float()).squeeze(-1)
