"""A saved reward model is a standard `AutoModelForSequenceClassification` checkpoint (issue 22, item 2).

Its logits on rlhf-magic's own tokens are `rm.score()`, on an RMSNorm backbone (the tiny Llama) and on one that ends
in a LayerNorm (a tiny GPT-2) alike; `config.rlhf_magic` holds the normalisation, reward = (score - mean) * gain.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from planted import q_rankings
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

from rlhf_magic import api
from rlhf_magic.engine.adapters import merged_copy
from rlhf_magic.engine.reward_model import HEAD_FILE, RewardHandle, answer_ids, load_reward, make_head, right_pad
from rlhf_magic.engine.tiny import tiny_tokenizer
from rlhf_magic.errors import ConfigError, DataError, ModelError

PROMPTS = ["Hi", "What is two plus two?", "Write one long sentence about the sea, please.", "Say something, 3."]
ANSWERS = ["yo", "It is four, of course.", "The sea is wide and grey and it never stops moving at all.", "qqqq"]


@pytest.fixture(scope="module")
def rm():
    """A reward model trained on the tiny model through a LoRA adapter, normalised with a mean and a gain."""
    h = api.reward(
        "judge", model="tiny", data=q_rankings(8), max_steps=3, lr=3e-3, batch_size=4, normalize="gain", progress=False
    )
    assert h.adapter and h.mean != 0.0 and h.gain != 1.0 and h.head.bias is None
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
    assert "score_offset" not in norm and torch.equal(weights["score.weight"], rm.head.weight.detach())
    card = (saved / "README.md").read_text()
    assert "judge" in card and "reward" in card


def test_logits_are_the_handles_scores_and_the_config_turns_them_into_its_rewards(rm, saved):
    """Texts of four lengths in one padded batch: the logit at the last non-pad token is rm.score() (the LoRA adapter
    merged in), on the tiny Llama's RMSNorm backbone; (logit - mean) * gain is rm.reward()."""
    model = AutoModelForSequenceClassification.from_pretrained(saved)
    logits, scores = hf_logits(model, rm.tokenizer), torch.tensor(rm.score(PROMPTS, ANSWERS))
    torch.testing.assert_close(logits, scores, atol=1e-4, rtol=0)
    norm = model.config.rlhf_magic
    rewards = torch.tensor(rm.reward(PROMPTS, ANSWERS))
    torch.testing.assert_close((logits - norm["mean"]) * norm["gain"], rewards, atol=1e-4, rtol=0)
    assert rm(PROMPTS, ANSWERS) == rm.reward(PROMPTS, ANSWERS)


def test_score_and_reward_take_one_string_of_each_or_two_equal_lists_and_name_themselves_when_not(rm):
    assert rm.reward(PROMPTS[0], ANSWERS[0]) == pytest.approx(rm.reward(PROMPTS[:1], ANSWERS[:1]), abs=1e-6)
    for method in ("score", "reward"):
        call = getattr(rm, method)
        with pytest.raises(DataError, match=rf"^{method}\(\) got 2 prompts and 1 responses; give one each$"):
            call(PROMPTS[:2], ANSWERS[:1])
        with pytest.raises(DataError, match=rf"^{method}\(\) takes a list of prompts and a list of responses"):
            call(PROMPTS[0], ANSWERS)


def test_load_reward_reads_the_folder_back_with_the_same_scores_and_lineage(rm, saved):
    back = api.load_reward(str(saved))
    assert back.score(PROMPTS, ANSWERS) == pytest.approx(rm.score(PROMPTS, ANSWERS), abs=1e-4)
    assert back.reward(PROMPTS, ANSWERS) == pytest.approx(rm.reward(PROMPTS, ANSWERS), abs=1e-4)
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


def test_the_older_folder_format_still_loads_with_its_head_bias_in_the_mean(rm, tmp_path):
    """A causal LM + reward_head.pt (a head with a bias) + rlhf_magic.json, as earlier versions saved it: the bias
    moves into the mean, so the rewards are the old ones."""
    old = tmp_path / "old"
    merged_copy(rm.lm, rm.adapter).save_pretrained(old)
    rm.tokenizer.save_pretrained(old)
    torch.save({"weight": rm.head.weight.detach(), "bias": torch.tensor([0.25])}, old / HEAD_FILE)
    meta = {**rm.describe(), "mean": rm.mean, "gain": rm.gain, "max_length": rm.max_length}
    (old / "rlhf_magic.json").write_text(json.dumps(meta))
    back = load_reward(old, rm.runtime)
    assert back.score(PROMPTS, ANSWERS) == pytest.approx(rm.score(PROMPTS, ANSWERS), abs=1e-4)
    want = [(s + 0.25 - rm.mean) * rm.gain for s in rm.score(PROMPTS, ANSWERS)]
    assert back.reward(PROMPTS, ANSWERS) == pytest.approx(want, abs=1e-4) and back.head.bias is None
    with pytest.raises(ModelError, match="not a saved reward model"):
        load_reward(tmp_path, rm.runtime)


def test_a_checkpoint_with_a_score_offset_loads_with_the_rewards_it_meant(rm, saved, tmp_path):
    """The format of the last release: score.weight = gain * w and logits + score_offset = the reward."""
    older = tmp_path / "older"
    shutil.copytree(saved, older)
    config = json.loads((older / "config.json").read_text())
    config["rlhf_magic"]["score_offset"] = offset = -0.4
    (older / "config.json").write_text(json.dumps(config))
    weights = load_file(older / "model.safetensors")
    weights["score.weight"] = weights["score.weight"] * rm.gain
    save_file(weights, older / "model.safetensors", metadata={"format": "pt"})
    logits = hf_logits(AutoModelForSequenceClassification.from_pretrained(older), rm.tokenizer)
    back = load_reward(older, rm.runtime)
    torch.testing.assert_close(torch.tensor(back.reward(PROMPTS, ANSWERS)), logits + offset, atol=1e-4, rtol=0)


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
    """An untrained reward handle on a tiny GPT-2 (its final LayerNorm has a bias), with a mean and a gain."""
    tok = tiny_tokenizer()
    ids = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    torch.manual_seed(0)
    GPT2LMHeadModel(
        GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=2, **ids)
    ).save_pretrained(tmp_path / "gpt2")
    tok.save_pretrained(tmp_path / "gpt2")
    lm = runtime.load_fresh(str(tmp_path / "gpt2"))
    h = RewardHandle("g", lm, make_head(32, runtime.device, bias=False), runtime=runtime)
    h.mean, h.gain = 0.7, 2.5
    return h


def test_on_a_layernorm_backbone_too_the_logits_equal_the_scores_and_the_backbone_is_saved_as_it_is(
    gpt2_reward, tmp_path
):
    h = gpt2_reward
    scores, rewards = h.score(PROMPTS, ANSWERS), h.reward(PROMPTS, ANSWERS)
    assert rewards == pytest.approx([(s - 0.7) * 2.5 for s in scores], abs=1e-6)
    out = h.save(tmp_path / "rm")
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    torch.testing.assert_close(hf_logits(model, h.tokenizer), torch.tensor(scores), atol=1e-4, rtol=0)
    assert torch.equal(model.transformer.ln_f.bias, h.lm.model.transformer.ln_f.bias)  # nothing folded into it
    back = load_reward(out, h.runtime)
    assert back.reward(PROMPTS, ANSWERS) == pytest.approx(rewards, abs=1e-4)
