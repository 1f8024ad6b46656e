"""Packed rows: a padded batch's real tokens as one sequence, with the prompt tokens that every row starts with (a
chat template's system prompt, the K answers of one prompt) once, and no padding.

The linear layers, most of the cost, run on that sequence in one large product. Attention runs per row: each
layer's queries, keys and values are gathered back into the padded rows (the shared prompt's keys and values into
every row), attend there under the rows' causal and padding mask, and each packed token takes its row's output (row
0's for the shared prompt). Position ids are those of the padded rows, so states and gradients are the same. Only
MODEL_TYPES (whose layers take free position ids and call the configured attention function).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..patching import patched

MODEL_TYPES = ("llama",)
MAX_TOKENS = 8192  # longest packed sequence
MIN_SAVING = 0.1  # pack when the tokens through the linear layers fall by at least this share
ROW_ATTENTION = "rlhf_magic_rows"  # the attention function of packed rows (registered with transformers)
ROWS_KEY = "rlhf_magic_packed_rows"  # the keyword that carries the packed rows down to the attention function
SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa came in torch 2.5


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
        kw = {"attention_mask": mask, "position_ids": self.positions, "use_cache": False, ROWS_KEY: self}
        _register_row_attention()
        # the layers look the attention function up by this name (no setter checks on the internal attribute)
        with patched(trunk.config, "_attn_implementation_internal", ROW_ATTENTION):
            hidden = trunk(input_ids=self.tokens, **kw).last_hidden_state[0]
        real = self.index >= 0
        return hidden[self.index.clamp(min=0)] * real[..., None].to(hidden.dtype)


def _row_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):  # type: ignore[no-untyped-def]
    """Attention of packed rows ([1, heads, N, d] in, [1, N, heads, d] out), computed on the padded rows. With sdpa,
    grouped keys and values go in as they are (enable_gqa) instead of repeated per query head: the same outputs,
    and backward keeps fewer heads of keys and values."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    rows: PackedRows = kw.pop(ROWS_KEY)
    (count, width), flat = rows.index.shape, rows.index.clamp(min=0).reshape(-1)

    def unpack(x: torch.Tensor) -> torch.Tensor:  # [1, h, N, d] -> [B, h, T, d]
        return x[0].index_select(1, flat).unflatten(1, (count, width)).transpose(0, 1)

    if rows.inner == "sdpa" and SDPA_GQA and not kw.get("output_attentions"):
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
        getattr(cfg, "model_type", None) not in MODEL_TYPES
        or cfg._attn_implementation not in ("sdpa", "eager")
        or input_ids.shape[0] < 2
    ):
        return None
    device, (rows, width) = input_ids.device, input_ids.shape
    real = attention_mask.bool()
    size = shared_prompt_size(input_ids, attention_mask)
    count = int(real.sum()) - size * (rows - 1)
    if count > MAX_TOKENS or count > (1 - MIN_SAVING) * rows * width:
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


@functools.cache
def _register_row_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROW_ATTENTION, _row_attention)
