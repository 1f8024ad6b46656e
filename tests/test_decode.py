"""The lean CPU sampling loop (engine/fastpath/decode.py) and its native LoRA product: the same tokens as
generate()."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf_magic import api
from rlhf_magic.config import LoraConfig
from rlhf_magic.engine import fastpath, generation
from rlhf_magic.engine.adapters import add_adapter, use_adapter
from rlhf_magic.engine.fastpath import decode, native, sampling
from rlhf_magic.engine.fastpath.lean import lean_lora

PROMPTS = ["hi", "a much longer prompt, so the batch is left-padded", "x", "List letters 3"]


@pytest.fixture(scope="module")
def stacked():
    """A tiny policy fine-tuned to answer four letters and EOS, with two stacked LoRA adapters whose B matrices
    are not zero (their term counts)."""
    rng = random.Random(0)
    letters = [" ".join(rng.choice("abcd") for _ in range(4)) for _ in range(32)]
    data = [{"prompt": f"List letters {i}", "response": r} for i, r in enumerate(letters)]
    policy = api.sft("sft", model="tiny", data=data, max_steps=60, lr=1e-2, lora=False, progress=False)
    lm = policy.lm
    names = [add_adapter(lm, "one", LoraConfig(r=8)), add_adapter(lm, "two", LoraConfig(r=3))]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return lm, names


def sample_both(lm, adapters, monkeypatch, **kw):
    out = {}
    for lean in (False, True):
        monkeypatch.setattr(sampling, "supports", decode.supports if lean else lambda model: False)
        with use_adapter(lm, adapters), lean_lora():
            out[lean] = generation.sample(lm, PROMPTS * 2, **kw)
    return out[False], out[True]


@pytest.mark.fastpath
@pytest.mark.parametrize("adapters", ["stacked", "off"])
@pytest.mark.parametrize("settings", [{"temperature": 0.7, "capture": True}, {"temperature": 0.0}])
def test_lean_loop_samples_the_tokens_generate_samples(stacked, monkeypatch, adapters, settings):
    """Same seed, same tokens and (within float rounding of the native LoRA product) the same captured
    log-probs, with two stacked adapters or adapters off, left padding, sampling or greedy."""
    lm, names = stacked
    assert decode.supports(lm.model)
    hf, lean = sample_both(lm, names if adapters == "stacked" else None, monkeypatch, seed=5, max_new_tokens=12,
                           min_new_tokens=3, **settings)  # fmt: skip
    assert lean.responses.shape == hf.responses.shape and lean.responses.shape[0] == 8
    assert torch.equal(lean.responses, hf.responses)
    if settings.get("capture"):
        torch.testing.assert_close(lean.logprobs, hf.logprobs, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lean.hidden, hf.hidden, rtol=1e-4, atol=1e-4)
        assert (lean.logprobs < 0).all()


@pytest.mark.fastpath
def test_rows_that_end_get_pad_and_the_loop_stops_when_every_row_has_ended(stacked):
    """EOS handling as in generate(): EOS masked below min_new_tokens, PAD after a row's EOS, and no step after
    the last row ends (the policy answers four letters, then EOS)."""
    lm, names = stacked
    tok = lm.tokenizer
    prompts = [f"List letters {i}" for i in range(8)]
    ids, mask = generation.left_pad(generation.encode_prompts(lm, prompts), tok.pad_token_id, torch.device("cpu"))
    kw = {"max_new_tokens": 40, "min_new_tokens": 10, "temperature": 1.0, "pad_token_id": tok.pad_token_id}
    eos = tok.eos_token_id
    with use_adapter(lm, names), lean_lora(), sampling.fast_sampling():
        torch.manual_seed(1)
        out = decode.lean_sample(lm.model, ids, mask, eos_token_id=eos, **kw)
        torch.manual_seed(1)
        gen = lm.model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                                eos_token_id=eos, **kw)  # fmt: skip
    assert torch.equal(out, gen[:, ids.shape[1] :])
    assert (out[:, :10] != eos).all()  # no EOS below min_new_tokens (the policy would end after ~8 tokens)
    ends = [row.tolist().index(eos) for row in out]
    assert len(set(ends)) > 1 and out.shape[1] == max(ends) + 1 < 40  # rows end at different steps; then it stops
    for row, end in zip(out, ends):
        assert (row[end + 1 :] == tok.pad_token_id).all()


def test_models_the_loop_cannot_run_keep_generate(stacked):
    lm, _ = stacked
    layer = lm.model.model.layers[0]
    handle = layer.register_forward_hook(lambda *a: None)
    try:
        assert not decode.supports(lm.model)  # a hook would be skipped
    finally:
        handle.remove()
    assert decode.supports(lm.model)
    lm.model.config.model_type = "gpt2"
    try:
        assert not decode.supports(lm.model)
    finally:
        lm.model.config.model_type = "llama"


@pytest.mark.fastpath
def test_native_lora_product_matches_torch_and_steps_aside_where_it_does_not_apply(monkeypatch, native_kernels):
    """x W^T + b + (x A^T) L^T for 1 to MAX_ROWS rows, ranks with and without a tail of 8, K not a multiple of 8,
    with and without bias; more rows, no kernel (RLHF_MAGIC_NATIVE=0) give None."""
    torch.manual_seed(0)
    weight, bias = torch.randn(70, 43), torch.randn(70)
    for rank in (3, 8, 19):
        a, low = torch.randn(rank, 43), torch.randn(70, rank)
        for rows in (1, 5, 8, 9, native.MAX_ROWS):
            x = torch.randn(rows, 43)
            for b in (bias, None):
                want = x @ weight.t() + (0 if b is None else b) + (x @ a.t()) @ low.t()
                torch.testing.assert_close(native.lora_linear(x, weight, b, a, low), want, rtol=1e-5, atol=1e-4)
    a, low = torch.randn(8, 43), torch.randn(70, 8)
    assert native.lora_linear(torch.randn(native.MAX_ROWS + 1, 43), weight, bias, a, low) is None
    try:
        monkeypatch.setenv("RLHF_MAGIC_NATIVE", "0")
        native.skinny_kernel.cache_clear()
        assert native.lora_linear(torch.randn(4, 43), weight, bias, a, low) is None
    finally:
        monkeypatch.delenv("RLHF_MAGIC_NATIVE")
        native.skinny_kernel.cache_clear()
    assert native.lora_linear(torch.randn(4, 43), weight, bias, a, low) is not None


@pytest.mark.parametrize("adapters", ["stacked", "off"])
def test_greedy_answers_are_the_same_on_the_fast_path_and_the_plain_path(stacked, adapters):
    """The CPU decoder (lean loop, native products) and plain generate() pick the same greedy tokens. Runs in both
    test modes: with RLHF_MAGIC_FASTPATH=0 both sides are the plain path."""
    lm, names = stacked
    out = {}
    for on in (True, False):
        with use_adapter(lm, names if adapters == "stacked" else None), fastpath.scope(on, torch.device("cpu")):
            out[on] = generation.sample(lm, PROMPTS, max_new_tokens=10, temperature=0.0).responses
    assert torch.equal(out[True], out[False])
