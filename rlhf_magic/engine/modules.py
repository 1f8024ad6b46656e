"""Trainable wrappers around a causal LM: one trunk forward, then only the heads that are needed.

Each wrapper is an `nn.Module` so accelerate can prepare it (mixed precision, DDP); the HF model inside is the
shared one, with whatever LoRA adapter is active.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from . import cpu_bf16
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


# A shared frozen prefix: when every adapter and trainable weight sits in the top layers (lora.layers), the bottom
# layers compute the same hidden states for every role (policy, reference, reward model, each PPO epoch) on the
# same tokens. They run once per rollout; each role then runs only the layers above. Llama-family trunks only (the
# layer loop must not depend on layer indices or rescale its input embeddings).
PREFIX_MODEL_TYPES = ("llama",)
Prefix = tuple[int, torch.Tensor]  # (depth, hidden states after the bottom `depth` layers, before the final norm)


def hidden_states(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prefix: Prefix | None = None
) -> torch.Tensor:
    """Last hidden states [B, T, H] of the trunk (from a shared frozen prefix when one is given)."""
    trunk, _ = trunk_and_head(model)
    kw = {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask), "use_cache": False}
    if prefix is not None and trunk is not None:
        depth, states = prefix
        with _only_layers(trunk, depth, None):
            return trunk(inputs_embeds=states, **kw).last_hidden_state
    if trunk is not None:
        packed = pack_rows(model, input_ids, attention_mask)
        if packed is not None:
            return packed.states(trunk)
        return trunk(input_ids=input_ids, **kw).last_hidden_state
    out = model(input_ids=input_ids, output_hidden_states=True, **kw)
    return out.hidden_states[-1]


# Packed rows: the batch's real tokens as one sequence, with the prompt tokens that every row starts with (a chat
# template's system prompt, the K answers of one prompt) once, and no padding. The linear layers, most of the cost,
# run on that sequence in one large product. Attention runs per row: each layer's queries, keys and values are
# gathered back into the padded rows (the shared prompt's keys and values into every row), attend there under the
# rows' causal and padding mask, and each packed token takes its row's output (row 0's for the shared prompt). Position
# ids are those of the padded rows, so states and gradients are the same. Like the frozen prefix, only
# PREFIX_MODEL_TYPES (whose layers take free position ids and call the configured attention function).
PACK_MAX_TOKENS = 8192  # longest packed sequence
PACK_MIN_SAVING = 0.1  # pack when the tokens through the linear layers fall by at least this share
ROW_ATTENTION = "rlhf_magic_rows"  # the attention function of packed rows (registered with transformers)


@dataclass
class PackedRows:
    tokens: torch.Tensor  # [1, N]
    positions: torch.Tensor  # [1, N]
    index: torch.Tensor  # [B, T] packed position of each real (row, column); -1 on padding
    back: torch.Tensor  # [N] where each packed token's attention output is in the padded rows (row * T + column)
    allowed: torch.Tensor  # [B, 1, T, T] which key each query of the padded rows may attend to
    inner: str = "sdpa"  # the model's own attention implementation, which runs on the padded rows

    def states(self, trunk: Any) -> torch.Tensor:
        """Last hidden states [B, T, H] in the padded layout (zeros on padding)."""
        self.inner = trunk.config._attn_implementation
        mask = self.allowed
        if self.inner != "sdpa":  # eager: an additive mask
            mask = torch.zeros(mask.shape, dtype=trunk.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(trunk.dtype).min
            )
        kw = {"attention_mask": mask, "position_ids": self.positions, "use_cache": False}
        _PACKED.append(self)
        trunk.config._attn_implementation_internal = ROW_ATTENTION  # no setter checks: restored just below
        try:
            hidden = trunk(input_ids=self.tokens, **kw).last_hidden_state[0]
        finally:
            trunk.config._attn_implementation_internal = self.inner
            _PACKED.pop()
        real = self.index >= 0
        return hidden[self.index.clamp(min=0)] * real[..., None].to(hidden.dtype)


_PACKED: list[PackedRows] = []  # the packed batch whose forward pass is running


def _row_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):  # type: ignore[no-untyped-def]
    """Attention of packed rows ([1, heads, N, d] in, [1, N, heads, d] out), computed on the padded rows. With sdpa,
    grouped keys and values go in as they are (enable_gqa) instead of repeated per query head: the same outputs,
    and backward keeps 3 instead of 9 heads of keys and values for SmolLM2 (30 MiB less per 4 answers)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    rows = _PACKED[-1]
    (count, width), flat = rows.index.shape, rows.index.clamp(min=0).reshape(-1)

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, d] -> [B, h, T, d]
        return x[0].index_select(1, flat).unflatten(1, (count, width)).transpose(0, 1)

    if rows.inner == "sdpa" and _SDPA_GQA and not kw.get("output_attentions"):
        out = F.scaled_dot_product_attention(
            unpack(query),
            unpack(key),
            unpack(value),
            attn_mask=mask,
            dropout_p=kw.get("dropout", 0.0),
            scale=kw.get("scaling"),
            enable_gqa=key.shape[1] != query.shape[1],
        ).transpose(1, 2)  # [B, T, h, d]
    else:
        inner = ALL_ATTENTION_FUNCTIONS.get_interface(rows.inner, eager_attention_forward)
        out, _ = inner(module, unpack(query), unpack(key), unpack(value), mask, **kw)  # [B, T, h, d]
    return out.flatten(0, 1).index_select(0, rows.back)[None], None


_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in torch 2.5


def shared_prompt_size(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
    """How many tokens every row's real tokens (any padding side) begin with."""
    real = attention_mask.bool()
    first = real.long().argmax(1)
    limit = int(real.sum(1).min())
    cols = first[:, None] + torch.arange(limit, device=input_ids.device)
    tokens, on = input_ids.gather(1, cols), real.gather(1, cols)
    return int(((tokens == tokens[:1]) & on).all(0).long().cumprod(0).sum())


def pack_rows(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedRows | None:
    """The packed form of a padded batch, or None where packing is not possible or saves too few tokens."""
    cfg = model.config
    if (
        getattr(cfg, "model_type", None) not in PREFIX_MODEL_TYPES
        or cfg._attn_implementation not in ("sdpa", "eager")
        or input_ids.shape[0] < 2
    ):
        return None
    device, (rows, width) = input_ids.device, input_ids.shape
    real = attention_mask.bool()
    size = shared_prompt_size(input_ids, attention_mask)
    count = int(real.sum()) - size * (rows - 1)
    if count > PACK_MAX_TOKENS or count > (1 - PACK_MIN_SAVING) * rows * width:
        return None
    first = real.long().argmax(1)
    col = torch.arange(width, device=device)[None] - first[:, None]  # column within the row
    keep = real & (col >= size)  # each row's own tokens: the shared prompt runs once, from row 0
    index = torch.full(input_ids.shape, -1, dtype=torch.long, device=device)
    index[keep] = torch.arange(size, count, device=device)
    index = torch.where(real & (col < size), col, index)
    shared = real[0] & (col[0] < size)
    tokens = torch.cat([input_ids[0][shared], input_ids[keep]])
    positions = torch.cat([torch.arange(size, device=device), (real.long().cumsum(1) - 1)[keep]])
    flat = torch.arange(rows * width, device=device).view(rows, width)
    back = torch.cat([flat[0][shared], flat[keep]])
    order = torch.arange(width, device=device)
    causal = order[None, :] <= order[:, None]  # [T, T] key at or before the query
    allowed = (causal & real[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)  # padding: itself
    return PackedRows(tokens[None], positions[None], index, back, allowed[:, None])


def frozen_depth(model: Any, adapters: Sequence[str]) -> int:
    """How many bottom decoder layers none of `adapters` and no trainable weight touches (0: nothing to share)."""
    trunk, _ = trunk_and_head(model)
    layers = getattr(trunk, "layers", None)
    if getattr(model.config, "model_type", None) not in PREFIX_MODEL_TYPES or not isinstance(layers, nn.ModuleList):
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
    trunk, _ = trunk_and_head(model)
    kw = {"attention_mask": attention_mask, "position_ids": position_ids(attention_mask), "use_cache": False}
    with _only_layers(trunk, 0, depth, norm=False):
        return depth, trunk(input_ids=input_ids, **kw).last_hidden_state


@contextmanager
def _only_layers(trunk: Any, start: int, stop: int | None, norm: bool = True) -> Iterator[None]:
    """Run the trunk with only layers[start:stop] (and without its final norm when norm is False)."""
    layers, final_norm = trunk.layers, trunk.norm
    trunk.layers = nn.ModuleList(list(layers)[start:stop])
    if not norm:
        trunk.norm = nn.Identity()
    try:
        yield
    finally:
        trunk.layers, trunk.norm = layers, final_norm


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up that keeps only gate and up for backward, where autograd keeps silu(gate) as well (one more
    [tokens, intermediate] tensor per layer: 48 MiB per 4 answers of SmolLM2-135M). Backward recomputes silu(gate)
    and then runs autograd's own ops, so the gradients are the same bit for bit."""

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


_MLP_FORWARD: list[Any] = []  # while lean_mlp() is active: [LlamaMLP.forward, the SiLU activation types]


def _lean_mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    if type(self.act_fn) not in _MLP_FORWARD[1] or not torch.is_grad_enabled():
        return _MLP_FORWARD[0](self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.requires_grad or up.requires_grad:
        return self.down_proj(_SiluMul.apply(gate, up))
    return self.down_proj(self.act_fn(gate) * up)


@contextmanager
def lean_mlp() -> Iterator[None]:
    """Inside, transformers' LlamaMLP keeps less for backward (_SiluMul): the same values and gradients, ~12% less
    activation memory in training. Re-entrant; transformers' forward is always restored."""
    from transformers.activations import SiLUActivation
    from transformers.models.llama.modeling_llama import LlamaMLP

    if _MLP_FORWARD:  # already inside one
        yield
        return
    _MLP_FORWARD[:] = [LlamaMLP.forward, (SiLUActivation, nn.SiLU)]
    LlamaMLP.forward = _lean_mlp_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        LlamaMLP.forward = _MLP_FORWARD[0]  # type: ignore[method-assign]
        _MLP_FORWARD.clear()


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
    prefix: Prefix | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
) -> ops.HeadLogprobs:
    """Log-probs [B, Tr] of the response tokens (input_ids[:, start:]) at `temperature`, and their entropy when
    asked; the LM head never runs on the prompt."""
    hidden = response_hidden(model, input_ids, attention_mask, start, prefix)
    return head_logprobs(model, hidden, input_ids[:, start:], temperature, entropy)


def head_logprobs(
    model: Any, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float, entropy: bool = False
) -> ops.HeadLogprobs:
    """The LM head's log-probs of `tokens` from the hidden states that predict them. In float32 (no autocast)
    with a plain linear head, without forming the [B, T, V] logits (ops.logprobs_from_head); else from them."""
    trunk, head = trunk_and_head(model)
    plain = trunk is not None and type(head) is nn.Linear and head.weight.dtype == hidden.dtype == torch.float32
    if plain and not torch.is_autocast_enabled(hidden.device.type):
        return ops.logprobs_from_head(hidden, head.weight, head.bias, tokens, temperature, entropy)
    if plain and cpu_bf16.kernels_active() and not head.weight.requires_grad:
        low = cpu_bf16.frozen_copy(head.weight)
        with torch.autocast("cpu", enabled=False):
            return ops.logprobs_from_head(hidden, head.weight, head.bias, tokens, temperature, entropy, low=low)
    logits = head(hidden)
    ent = None
    if entropy:
        with torch.no_grad():
            ent = ops.entropy_from_logits(logits.detach(), temperature)
    return ops.HeadLogprobs(ops.logprobs_from_logits(logits, tokens, temperature), ent)


class PolicyValue(nn.Module):
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


def _register_row_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROW_ATTENTION, _row_attention)


_register_row_attention()
