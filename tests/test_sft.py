"""SFT on the tiny model: the loss falls, every trainable weight changes, stops keep the last step."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from rlhf_magic import api
from rlhf_magic.events import StopControl


class Snapshot:
    """Copies the trainable weights when the run starts."""

    def __init__(self):
        self.before = None

    def __call__(self, ev):
        if ev.kind == "start":
            h = ev.payload["handle"]
            self.before = {id(p): p.detach().clone() for p in h.trainable_parameters()}


def _changed(handle, snap):
    params = handle.trainable_parameters()
    return [not torch.equal(snap.before[id(p)], p.detach()) for p in params]


def test_lora_sft_lowers_the_loss_and_changes_every_adapter_weight(pairs):
    snap = Snapshot()
    h = api.sft("s", model="tiny", data=pairs, max_steps=30, lr=3e-3, batch_size=8, progress=False, callbacks=[snap])
    evals = h.metrics["eval/loss"]
    assert evals[-1] < evals[0] - 0.3, evals
    assert h.metrics["train/loss"][-1] < h.metrics["train/loss"][0]
    changed = _changed(h, snap)
    assert len(changed) == 2 * 2 * 7 and all(changed)  # A and B of 7 modules x 2 layers
    base = [p for n, p in h.lm.model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)
    assert h.metrics.summary["steps"] == 30


def test_full_finetuning_changes_every_weight_and_leaves_the_cached_base_alone(pairs, runtime):
    cached = runtime.load("tiny")
    before = {n: p.detach().clone() for n, p in cached.model.named_parameters()}
    snap = Snapshot()
    h = api.sft(
        "full",
        model="tiny",
        data=pairs,
        max_steps=5,
        lora=False,
        lr=1e-3,
        progress=False,
        callbacks=[snap],
        session=_Lender(runtime),
    )
    assert h.adapter is None and h.lm.model is not cached.model
    assert all(_changed(h, snap))
    for n, p in cached.model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(before[n], p.detach()), n


class _Lender:
    def __init__(self, runtime):
        self.runtime = runtime

    def add(self, handle):
        return handle


def test_stop_request_keeps_the_last_completed_step(pairs):
    stop = StopControl()

    def stop_at_3(ev):
        if ev.kind == "step" and ev.step == 3:
            stop.request("test stop")

    h = api.sft("s", model="tiny", data=pairs, max_steps=50, progress=False, callbacks=[stop_at_3], stop=stop)
    assert h.metrics.summary["steps"] == 3 and h.metrics.summary["stopped"] == "test stop"
    assert len(h.metrics.history) == 3
    assert isinstance(h.generate(["What is 1 plus 1?"])[0], str)


def test_a_nan_loss_stops_cleanly_and_keeps_the_last_good_weights(pairs, monkeypatch):
    from rlhf_magic.engine import modules

    calls = {"n": 0}
    real = modules.TokenLoss.forward

    def poisoned(self, **batch):
        calls["n"] += 1
        loss = real(self, **batch)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(modules.TokenLoss, "forward", poisoned)
    snap = {}

    def keep(ev):
        if ev.kind == "step":
            snap["w"] = [p.detach().clone() for p in ev_handle["h"].trainable_parameters()]

    ev_handle = {}

    def grab(ev):
        if ev.kind == "start":
            ev_handle["h"] = ev.payload["handle"]

    h = api.sft("s", model="tiny", data=pairs, max_steps=10, eval_fraction=0, progress=False, callbacks=[grab, keep])
    assert h.metrics.summary["steps"] == 3
    assert "gradients became nan at step 4" in h.metrics.summary["stopped"]
    assert all(torch.equal(a, p.detach()) for a, p in zip(snap["w"], h.trainable_parameters()))


def test_save_and_load_round_trip(pairs, tmp_path):
    h = api.sft("s", model="tiny", data=pairs, max_steps=10, lr=3e-3, progress=False)
    out = h.save(tmp_path / "ckpt")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out)
    assert plain.config.vocab_size == len(h.tokenizer)
    again = api.load_policy(str(out))
    prompts = ["What is 3 plus 3?", "What is 7 plus 7?"]
    assert again.generate(prompts, max_new_tokens=12) == h.generate(prompts, max_new_tokens=12)
    assert not list(tmp_path.glob(".ckpt-*")), "a temporary folder was left behind"


def test_training_continues_from_a_handle(pairs):
    first = api.sft("a", model="tiny", data=pairs, max_steps=10, lr=3e-3, progress=False)
    second = api.sft("b", model=first, data=pairs, max_steps=10, lr=3e-3, progress=False)
    assert second.parents == ("a",) and second.lm is first.lm and second.adapter != first.adapter
    assert second.metrics["train/loss"][0] < first.metrics["train/loss"][0]
    assert math.isfinite(second.metrics.summary["eval/loss"])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_generate_returns_one_string_per_prompt(pairs, temperature):
    h = api.load_policy("tiny")
    out = h.generate(["a", "bb", "ccc"], max_new_tokens=5, temperature=temperature, seed=1)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    assert h.sample(["a", "b"], k=3, max_new_tokens=4, seed=0) and len(h.sample(["a", "b"], 3, 4)[1]) == 3


def test_handle_html_repr_names_lineage_and_metrics(pairs):
    h = api.sft("mine", model="tiny", data=pairs, max_steps=2, progress=False)
    html = h._repr_html_()
    assert "mine" in html and "tiny" in html and "LoRA adapter" in html and "eval/loss" in html


def test_logprobs_rank_the_trained_answer_above_an_unseen_one(pairs):
    h = api.sft("lp", model="tiny", data=pairs, max_steps=30, lr=3e-3, progress=False)
    trained, other = h.logprobs(["What is 3 plus 3?"] * 2, ["The answer is 6.", "Qzv xwkjy jq 6!"])
    assert trained > other
    raw = api.load_policy("tiny", chat=False)
    assert raw.chat is False and len(raw.generate(["Once upon a time"], max_new_tokens=4)) == 1


def test_lora_layers_adapts_only_the_top_layers(pairs):
    h = api.sft("top", model="tiny", data=pairs, max_steps=2, lora={"layers": 1}, progress=False)
    names = [n for n, _ in h.lm.model.named_parameters() if f".{h.adapter}." in n]
    assert names and all(".layers.1." in n for n in names)  # the tiny model has layers 0 and 1
    from rlhf_magic.errors import ConfigError

    with pytest.raises(ConfigError, match=r"lora\.layers = 5 is not valid"):
        api.sft("bad", model="tiny", data=pairs, max_steps=1, lora={"layers": 5}, progress=False)


def test_skinny_linear_computes_the_same_products_and_always_restores_nn_linear():
    from rlhf_magic.engine.generation import skinny_linear

    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 40), torch.nn.Linear(24, 40, bias=False)]
    inputs = [torch.randn(3, 24), torch.randn(2, 5, 24), torch.randn(24), torch.randn(300, 24)]  # 300 rows: plain
    expected = [[layer(x) for x in inputs] for layer in layers]
    original = torch.nn.Linear.forward
    with skinny_linear(torch.device("cpu")):
        assert torch.nn.Linear.forward is not original
        got = [[layer(x) for x in inputs] for layer in layers]
    assert torch.nn.Linear.forward is original
    for want_row, got_row in zip(expected, got):
        for want, have in zip(want_row, got_row):
            assert have.shape == want.shape and torch.allclose(have, want, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), skinny_linear(torch.device("cpu")):
        raise RuntimeError("boom")
    assert torch.nn.Linear.forward is original


def test_native_decode_kernel_matches_torch_and_steps_aside_where_it_does_not_apply(monkeypatch):
    """The native product for decode steps equals x @ W.T + b for 1 to MAX_ROWS rows (K not a multiple of 8, with
    and without bias); it declines more rows, gradients and other dtypes, and a missing compiler or
    RLHF_MAGIC_NATIVE=0 leave no kernel (torch is used) instead of an error."""
    import shutil

    from rlhf_magic.engine import native

    if not native._cpu_supported() or not shutil.which("gcc"):
        pytest.skip("the native kernel needs Linux x86-64 with AVX2/FMA and a C compiler")
    assert native.skinny_kernel() is not None  # builds, loads and passes its own check product
    torch.manual_seed(0)
    weight, bias = torch.randn(70, 43), torch.randn(70)
    for rows in (1, 5, 8, 9, native.MAX_ROWS):
        x = torch.randn(rows, 43)
        for b in (bias, None):
            want = x @ weight.t() + (0 if b is None else b)
            torch.testing.assert_close(native.skinny_linear(x, weight, b), want, rtol=1e-5, atol=1e-5)
    x = torch.randn(4, 43)
    assert native.skinny_linear(torch.randn(native.MAX_ROWS + 1, 43), weight, bias) is None
    assert native.skinny_linear(x.double(), weight.double(), None) is None
    assert native.skinny_linear(x.requires_grad_(), weight, bias) is None
    with torch.no_grad():
        assert native.skinny_linear(x, weight, bias) is not None
    try:
        for env, value in (("RLHF_MAGIC_NATIVE", "0"), ("CC", "/nonexistent/cc")):
            with monkeypatch.context() as m:
                m.setenv(env, value)
                native.skinny_kernel.cache_clear()
                assert native.skinny_kernel() is None
                assert native.skinny_linear(x.detach(), weight, bias) is None
    finally:
        native.skinny_kernel.cache_clear()


def test_fast_sampling_draws_from_the_distribution_and_never_a_zero_probability_token():
    """The inverse-CDF draw that replaces torch.multinomial(probs, 1) during CPU generation: frequencies match the
    (unnormalised) probabilities within 5 standard errors, including entries in different blocks, the last entry and
    a vocabulary that is not a multiple of the block; zero-probability entries are never drawn."""
    from rlhf_magic.engine.generation import _MULTINOMIAL, fast_sampling
    from rlhf_magic.ops import categorical

    torch.manual_seed(0)
    width, draws = 1000, 40_000
    probs = torch.zeros(width)
    support = {3: 0.5, 255: 2.0, 256: 1.0, 700: 0.25, 999: 1.25}  # block edges, a later block, the last entry
    for i, w in support.items():
        probs[i] = w
    got = categorical(probs.expand(draws, width).contiguous()).squeeze(1)
    counts = torch.bincount(got, minlength=width).double()
    assert set(counts.nonzero().squeeze(1).tolist()) <= set(support)
    share = probs.double() / probs.sum()
    err = (counts / draws - share).abs()
    assert (err <= 5 * (share * (1 - share) / draws).sqrt() + 1e-12).all(), err[list(support)]
    one_hot = torch.zeros(4, 600)
    one_hot[:, 599] = 1.0  # all the mass on the last entry of a padded last block
    assert categorical(one_hot).squeeze(1).tolist() == [599] * 4
    with fast_sampling(torch.device("cpu")):
        assert torch.multinomial is not _MULTINOMIAL
        assert torch.multinomial(share.float().expand(3, width), 2).shape == (3, 2)  # other calls: the original
        with pytest.raises(RuntimeError, match="nan"):  # bad probabilities: multinomial's own error
            torch.multinomial(torch.full((2, width), float("nan")), 1)
    assert torch.multinomial is _MULTINOMIAL


def test_lean_lora_forward_gives_peft_outputs_and_gradients_for_stacked_adapters_and_is_undone():
    """Generation and PPO run peft's LoRA layers through a leaner forward: the same logits (adapters stacked, one,
    or off) and the same gradients for the adapter weights; peft's forward comes back, even after an error."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from rlhf_magic.config import LoraConfig
    from rlhf_magic.engine.adapters import adapter_parameters, add_adapter, lean_lora, train_only, use_adapter
    from rlhf_magic.engine.generation import skinny_linear
    from rlhf_magic.engine.models import load_model

    lm = load_model("tiny", torch.device("cpu"))
    names = [add_adapter(lm, "one", LoraConfig(r=4)), add_adapter(lm, "two", LoraConfig(r=2, alpha=8))]
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in lm.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)  # non-zero updates, so a dropped or mis-scaled adapter would show
    ids = torch.randint(5, 40, (3, 7))
    original = LoraLinear.forward
    lm.model.eval()
    for active in (names, names[1], None):
        with use_adapter(lm, active), torch.no_grad():
            want = lm.model(input_ids=ids).logits
            with skinny_linear(torch.device("cpu")):
                assert LoraLinear.forward is not original
                got = lm.model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert LoraLinear.forward is original
    params = [p for n in names for p in adapter_parameters(lm, n)]
    train_only(lm.model, params)
    grads = []
    for lean in (False, True):
        with use_adapter(lm, names), lean_lora() if lean else contextlib.nullcontext():
            lm.model(input_ids=ids).logits.square().mean().backward()
        grads.append([p.grad.clone() for p in params])
        lm.model.zero_grad(set_to_none=True)
    train_only(lm.model, [])
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), lean_lora(), lean_lora():  # re-entrant, restored on error
        raise RuntimeError("boom")
    assert LoraLinear.forward is original
