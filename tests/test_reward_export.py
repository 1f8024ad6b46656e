"""A saved reward model is a standard `AutoModelForSequenceClassification` checkpoint (issue 22, item 2).

Its logits on rlhf-magic's own tokens are `rm.score()` less `config.rlhf_magic["score_offset"]`; the offset is 0 where
the backbone ends in a LayerNorm with a bias (checked exactly on a tiny GPT-2), and for RMSNorm backbones such as the
tiny Llama it is the one constant a bias-free `score` head cannot hold (see rlhf_magic/engine/reward_export.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from planted import q_rankings
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from rlhf_magic import api
from rlhf_magic.engine.adapters import merged_copy
from rlhf_magic.engine.reward_model import HEAD_FILE, RewardHandle, answer_ids, load_reward, make_head, right_pad
from rlhf_magic.engine.tiny import tiny_tokenizer
from rlhf_magic.errors import ConfigError, ModelError

PROMPTS = ["Hi", "What is two plus two?", "Write one long sentence about the sea, please.", "Say something, 3."]
ANSWERS = ["yo", "It is four, of course.", "The sea is wide and grey and it never stops moving at all.", "qqqq"]


@pytest.fixture(scope="module")
def rm():
    """A reward model trained on the tiny model through a LoRA adapter, normalised with a mean and a gain."""
    h = api.reward(
        "judge", model="tiny", data=q_rankings(8), max_steps=3, lr=3e-3, batch_size=4, normalize="gain", progress=False
    )
    with torch.no_grad():
        h.head.bias.add_(0.25)  # the ranking loss leaves the bias (near) 0: make every term of the offset count
    assert h.adapter and h.mean != 0.0 and h.gain != 1.0
    return h


@pytest.fixture(scope="module")
def saved(rm, tmp_path_factory):
    return rm.save(tmp_path_factory.mktemp("export") / "rm")


def hf_logits(model, tokenizer, prompts=PROMPTS, answers=ANSWERS, max_length=512) -> torch.Tensor:
    """The sequence classifier's logits on rlhf-magic's own tokens, all rows in one right-padded batch."""
    rows = [answer_ids(tokenizer, p, a, max_length) for p, a in zip(prompts, answers)]
    assert len({len(r) for r in rows}) == len(rows)  # every row a different length: padding is exercised
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def test_the_folder_loads_as_a_sequence_classifier_with_every_weight_from_the_file(rm, saved):
    model, info = AutoModelForSequenceClassification.from_pretrained(saved, output_loading_info=True)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    weights = load_file(saved / "model.safetensors")
    state = model.state_dict()
    assert weights.keys() == state.keys() and "score.weight" in weights  # nothing initialised at load
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert not any("lora" in k for k in weights) and not (saved / HEAD_FILE).exists()  # a plain, merged model
    cfg, tok = model.config, rm.tokenizer
    assert cfg.num_labels == 1 and cfg.pad_token_id == tok.pad_token_id != tok.eos_token_id
    norm = cfg.rlhf_magic
    assert (norm["mean"], norm["gain"], norm["max_length"]) == (rm.mean, rm.gain, rm.max_length)
    assert norm["score_offset"] == pytest.approx((float(rm.head.bias.detach()) - rm.mean) * rm.gain, rel=1e-6)
    assert norm["folded_into"] is None  # the tiny Llama ends in an RMSNorm: no bias to carry the offset
    card = (saved / "README.md").read_text()
    assert "judge" in card and "reward" in card


def test_logits_are_the_handles_scores_less_the_recorded_offset(rm, saved):
    """Texts of four lengths in one padded batch: the logit at the last non-pad token is rm.score() - offset, so
    every difference between two answers' scores is the handle's own (the LoRA adapter merged in)."""
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    logits, scores = hf_logits(model, rm.tokenizer), torch.tensor(rm.score(PROMPTS, ANSWERS))
    torch.testing.assert_close(logits + model.config.rlhf_magic["score_offset"], scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(logits - logits[0], scores - scores[0], atol=1e-4, rtol=0)


def test_load_reward_reads_the_folder_back_with_the_same_scores_and_lineage(rm, saved):
    back = api.load_reward(str(saved))
    assert back.score(PROMPTS, ANSWERS) == pytest.approx(rm.score(PROMPTS, ANSWERS), abs=1e-4)
    assert (back.name, back.mean, back.gain, back.max_length) == (rm.name, rm.mean, rm.gain, rm.max_length)
    assert back.lineage == rm.lineage and back.accuracy == rm.accuracy


def test_ppo_takes_the_folder_and_scores_as_the_handle_does(rm, saved):
    settings = {"policy": "tiny", "prompts": PROMPTS, "steps": 1, "batch_size": 2, "mini_batch_size": 2}
    settings |= {"max_new_tokens": 6, "seed": 3, "progress": False}
    from_folder = api.ppo("p", reward=str(saved), **settings)
    from_handle = api.ppo("p", reward=rm, **settings)
    assert from_folder.parents == ("tiny", "judge")
    key = "ppo/objective/scores"
    assert from_folder.metrics[key] == pytest.approx(from_handle.metrics[key], abs=1e-4)


def test_saving_over_a_folder_needs_overwrite(rm, saved, tmp_path):
    out = rm.save(tmp_path / "rm")
    before = (out / "config.json").read_text()
    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="overwrite=True"):
        rm.save(out)
    assert (out / "config.json").read_text() == "{}"  # refused before anything was written
    rm.save(out, overwrite=True)
    assert (out / "config.json").read_text() == before and not list(tmp_path.glob(".rm-*"))


def test_the_older_folder_format_still_loads(rm, tmp_path):
    """A causal LM + reward_head.pt + rlhf_magic.json, as earlier versions saved it."""
    old = tmp_path / "old"
    merged_copy(rm.lm, rm.adapter).save_pretrained(old)
    rm.tokenizer.save_pretrained(old)
    torch.save({k: v.detach() for k, v in rm.head.state_dict().items()}, old / HEAD_FILE)
    meta = {**rm.describe(), "mean": rm.mean, "gain": rm.gain, "max_length": rm.max_length}
    (old / "rlhf_magic.json").write_text(json.dumps(meta))
    back = load_reward(old, rm.runtime)
    assert back.score(PROMPTS, ANSWERS) == pytest.approx(rm.score(PROMPTS, ANSWERS), abs=1e-4)
    with pytest.raises(ModelError, match="not a saved reward model"):
        load_reward(tmp_path, rm.runtime)


def test_a_sequence_classifier_from_another_trainer_loads_and_scores_its_logits(rm, tmp_path):
    """No rlhf_magic entry in its config (a TRL reward model, say): load_reward scores with its logits, raw."""
    config = merged_copy(rm.lm, rm.adapter).config.to_dict()
    config.update(num_labels=1, architectures=None)
    torch.manual_seed(1)
    other = AutoModelForSequenceClassification.from_config(type(rm.lm.model.config).from_dict(config))
    other.save_pretrained(tmp_path / "trl")
    rm.tokenizer.save_pretrained(tmp_path / "trl")
    back = load_reward(tmp_path / "trl", rm.runtime)
    want = hf_logits(other.eval(), rm.tokenizer)
    torch.testing.assert_close(torch.tensor(back.score(PROMPTS, ANSWERS)), want, atol=1e-4, rtol=0)
    assert (back.mean, back.gain) == (0.0, 1.0)
    (tmp_path / "two").mkdir()
    two = {"architectures": ["LlamaForSequenceClassification"], "id2label": {"0": "bad", "1": "good"}}
    (tmp_path / "two" / "config.json").write_text(json.dumps(two))
    with pytest.raises(ModelError, match="2 labels; a reward model has one"):
        load_reward(tmp_path / "two", rm.runtime)


@pytest.fixture
def gpt2_reward(tmp_path, runtime):
    """An untrained reward handle on a tiny GPT-2 (its final LayerNorm has a bias), with a head bias, mean and gain."""
    tok = tiny_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, **ids)
    ).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    lm = runtime.load_fresh(str(tmp_path / "gpt2"))
    head = make_head(32, runtime.device)
    with torch.no_grad():
        head.bias.fill_(0.3)
    h = RewardHandle("g", lm, head, runtime=runtime)
    h.mean, h.gain = 0.7, 2.5
    return h


def test_where_the_backbone_ends_in_a_layernorm_the_logits_equal_the_scores_exactly(gpt2_reward, tmp_path):
    h = gpt2_reward
    ln_f = h.lm.model.transformer.ln_f.bias.detach().clone()
    scores = h.score(PROMPTS, ANSWERS)
    out = h.save(tmp_path / "rm")
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    norm = model.config.rlhf_magic
    assert (norm["score_offset"], norm["folded_into"]) == (0.0, "transformer.ln_f.bias")
    torch.testing.assert_close(hf_logits(model, h.tokenizer), torch.tensor(scores), atol=1e-4, rtol=0)
    assert torch.equal(h.lm.model.transformer.ln_f.bias, ln_f) and h.score(PROMPTS, ANSWERS) == scores  # untouched
    assert load_reward(out, h.runtime).score(PROMPTS, ANSWERS) == pytest.approx(scores, abs=1e-4)
