"""Packed rows: a padded batch as one sequence with its shared prompt once and no padding gives the same states."""

from __future__ import annotations

import pytest
import torch

from rlhf_magic.engine import modules as M
from rlhf_magic.engine.fastpath import packing as P
from rlhf_magic.engine.fastpath.lean import lean_mlp
from rlhf_magic.engine.patching import is_patched
from rlhf_magic.engine.tiny import tiny_model

pytestmark = pytest.mark.fastpath

SHARED = 12


def batch(pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """4 rows that start with the same 12 tokens, padded on `side`, one of them with PAD after an 'EOS'."""
    torch.manual_seed(0)
    ids = torch.full((4, 30), pad_id)
    mask = torch.zeros_like(ids)
    prompt = torch.arange(10, 10 + SHARED)
    for i, pad in enumerate([3, 0, 5, 1]):
        row = torch.cat([prompt, torch.randint(5, 100, (30 - pad - SHARED,))])
        cols = slice(pad, None) if side == "left" else slice(None, 30 - pad)
        ids[i, cols], mask[i, cols] = row, 1
    last = int(mask[2].nonzero().max())
    ids[2, last - 2 : last + 1], mask[2, last - 2 : last + 1] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "sdpa-repeat-kv", "eager"])
def test_packed_rows_give_the_states_and_gradients_of_the_padded_batch(side, attn, monkeypatch):
    """sdpa: grouped keys and values go in as they are (the tiny model has 2 for 4 heads); sdpa-repeat-kv:
    transformers' path, which repeats them per head."""
    if attn == "sdpa-repeat-kv":
        monkeypatch.setattr(P, "SDPA_GQA", False)
        attn = "sdpa"
    model, tok = tiny_model()
    model.config._attn_implementation = attn
    model.train()
    ids, mask = batch(tok.pad_token_id, side)
    assert P.shared_prompt_size(ids, mask) == SHARED
    packed = P.pack_rows(model, ids, mask)
    assert packed is not None and packed.tokens.shape[1] == int(mask.sum()) - 3 * SHARED
    states = M.hidden_states(model, ids, mask)
    monkeypatch.setattr(P, "MAX_TOKENS", 0)  # the padded batch
    assert P.pack_rows(model, ids, mask) is None
    padded = M.hidden_states(model, ids, mask)
    real = mask.bool()
    torch.testing.assert_close(states[real], padded[real], rtol=1e-5, atol=1e-5)
    assert (states[~real] == 0).all()
    weights = torch.randn_like(states) * mask[..., None]
    params = list(model.parameters())
    grads = torch.autograd.grad((states * weights).sum(), params)
    expected = torch.autograd.grad((padded * weights).sum(), params)
    assert all(g.abs().sum() > 0 for g in grads[1:])
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-3)  # grads reach ~500 here


def test_rows_are_packed_only_where_it_saves_tokens():
    model, tok = tiny_model()
    ids, mask = batch(tok.pad_token_id, "left")
    ids[:, :SHARED] = torch.randint(5, 100, (4, SHARED))  # nothing shared, and little padding
    mask[:] = 1
    assert P.shared_prompt_size(ids, mask) == 0 and P.pack_rows(model, ids, mask) is None
    ids, mask = batch(tok.pad_token_id, "left")
    assert P.pack_rows(model, ids[:1], mask[:1]) is None  # one row: nothing to share
    ones = torch.ones(4, 150, dtype=mask.dtype)
    long = torch.cat([ids, torch.randint(5, 100, (4, 150))], 1)  # 36 + 12 of 720 tokens saved: under 10%
    assert P.pack_rows(model, long, torch.cat([mask, ones], 1)) is None
    right, right_mask = batch(tok.pad_token_id, "right")
    prompt = torch.cat([torch.arange(10, 160).expand(4, 150), right], 1)  # a long shared prompt: 498 of 720 saved
    packed = P.pack_rows(model, prompt, torch.cat([ones, right_mask], 1))
    assert packed is not None and packed.tokens.shape[1] == 720 - 12 - 3 * (150 + SHARED)
    model.config.model_type = "gemma"  # only layer stacks known to take a block mask and free positions
    assert P.pack_rows(model, ids, mask) is None


def test_lean_mlp_keeps_less_for_backward_with_the_same_values_and_gradients():
    model, tok = tiny_model()
    model.train()
    ids, mask = batch(tok.pad_token_id, "left")
    params = list(model.parameters())

    def run() -> tuple[torch.Tensor, tuple[torch.Tensor, ...], int]:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            states = M.hidden_states(model, ids, mask)
        grads = torch.autograd.grad((states * states.detach().cos()).sum(), params)
        return states, grads, sum(kept.values())

    states, grads, kept = run()
    from transformers.models.llama.modeling_llama import LlamaMLP

    with lean_mlp():
        lean_states, lean_grads, lean_kept = run()
        with lean_mlp():  # re-entrant
            pass
        assert is_patched(LlamaMLP, "forward")
    assert not is_patched(LlamaMLP, "forward")
    assert torch.equal(states, lean_states)
    for g, lean in zip(grads, lean_grads):
        assert torch.equal(g, lean)
    tokens, intermediate = int(mask.sum()) - 3 * SHARED, model.config.intermediate_size
    assert kept - lean_kept == 2 * tokens * intermediate * 4  # one [tokens, intermediate] float tensor per layer
