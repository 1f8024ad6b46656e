"""A shared frozen prefix: when every adapter and trainable weight sits in the top layers (lora.layers), the bottom
layers compute the same hidden states for every role (policy, reference, reward model, each PPO epoch) on the same
tokens. They run once per rollout; each role then runs only the layers above. Llama-family trunks only (the layer
loop must not depend on layer indices or rescale its input embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..patching import patched

MODEL_TYPES = ("llama",)
Prefix = tuple[int, torch.Tensor]  # (depth, hidden states after the bottom `depth` layers, before the final norm)


def _trunk(model: Any) -> Any:
    return getattr(model, "get_decoder", lambda: None)()


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def frozen_depth(model: Any, adapters: Sequence[str]) -> int:
    """How many bottom decoder layers none of `adapters` and no trainable weight touches (0: nothing to share)."""
    trunk = _trunk(model)
    layers = getattr(trunk, "layers", None)
    if getattr(model.config, "model_type", None) not in MODEL_TYPES or not isinstance(layers, nn.ModuleList):
        return 0
    names = set(adapters)

    def touched(part: nn.Module) -> bool:
        if any(p.requires_grad for p in part.parameters()):
            return True
        for m in part.modules():
            for attr in ("lora_A", "lora_embedding_A"):
                if names & set(getattr(m, attr, None) or ()):
                    return True
        return False

    if touched(trunk.get_input_embeddings()):
        return 0
    return next((i for i, layer in enumerate(layers) if touched(layer)), len(layers))


@torch.no_grad()
def prefix_states(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, depth: int) -> Prefix:
    """The hidden states after the bottom `depth` (frozen, adapter-free) layers, computed once."""
    trunk = _trunk(model)
    kw = {"attention_mask": attention_mask, "position_ids": _position_ids(attention_mask), "use_cache": False}
    with _only_layers(trunk, 0, depth, norm=False):
        return depth, trunk(input_ids=input_ids, **kw).last_hidden_state


@contextmanager
def _only_layers(trunk: Any, start: int, stop: int | None, norm: bool = True) -> Iterator[None]:
    """Run the trunk with only layers[start:stop] (and without its final norm when norm is False)."""
    layers = nn.ModuleList(list(trunk.layers)[start:stop])
    with patched(trunk, "layers", layers), patched(trunk, "norm", trunk.norm if norm else nn.Identity()):
        yield


def states_above(trunk: Any, prefix: Prefix, **kw: Any) -> torch.Tensor:
    """The trunk's last hidden states from a shared prefix: only the layers above it run."""
    depth, states = prefix
    with _only_layers(trunk, depth, None):
        return trunk(inputs_embeds=states, **kw).last_hidden_state
