"""SFT on the tiny model: the loss falls, every trainable weight changes, stops keep the last step."""

from __future__ import annotations

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
