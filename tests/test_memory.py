"""Memory estimates before big work (engine/memory.py): sampling's KV cache and logits, and training's gradients,
optimizer state and activations for SFT, reward and PPO at the configured batch sizes. The machine's free memory
is stood in small; nothing big is ever allocated."""

from __future__ import annotations

import re
import types

import pytest
import torch

from rlhf_magic import api
from rlhf_magic.config import LoraConfig, PPOConfig, RewardConfig, SFTConfig
from rlhf_magic.engine import fastpath, generation, memory
from rlhf_magic.errors import ConfigError

MIB = 2**20
# SmolLM2-135M's sizes: 30 layers, 9 query and 3 key/value heads of 64, hidden 576, vocabulary 49152
SMOLLM2 = types.SimpleNamespace(
    num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, vocab_size=49152
)
SMOLLM2.get_text_config = lambda: SMOLLM2


@pytest.fixture(scope="module")
def base():
    return api.load_policy("tiny")


def free_memory(monkeypatch, n: int) -> list[torch.device]:
    """The machine has `n` bytes free; returns the devices asked about."""
    asked: list[torch.device] = []
    monkeypatch.setattr(memory, "available_memory", lambda device: asked.append(device) or n)
    return asked


def no_decoding(monkeypatch) -> None:
    """Any decoder that would start fails the test."""

    def sampler(*a, **k):
        raise AssertionError("sampling started")

    monkeypatch.setattr(fastpath, "sampler", sampler)


# ------------------------------------------------------------------------------------------- sampling
def test_the_sampling_estimate_of_a_known_config():
    est = memory.estimate_sampling(SMOLLM2, 32, 1064, 1000, kv_bytes=4)
    per_position = 2 * 30 * 3 * 64 * 4 + 2 * 64 * 4 + 32  # keys + values of every layer, rotary tables, ids
    assert est.kv_cache == 32 * 1064 * per_position
    assert est.logits == 3 * 32 * 49152 * 4 and est.states == 0
    assert memory.estimate_sampling(SMOLLM2, 32, 1064, 1000, kv_bytes=2).kv_cache < est.kv_cache * 0.51
    captured = memory.estimate_sampling(SMOLLM2, 32, 1064, 1000, kv_bytes=4, capture=True)
    assert captured.states == 32 * 1000 * (2 * 576 * 4 + 4)  # PPO keeps each new token's final hidden state
    assert memory.estimate_sampling(types.SimpleNamespace(), 1, 1, 1, kv_bytes=4) is None  # no sizes: no guess


def test_sampling_that_cannot_fit_is_refused_with_the_numbers_before_decoding(base, monkeypatch):
    prompts = ["Say hi.", "Count to 3.", "Name a colour.", "Spell cat."]
    width = max(map(len, generation.encode_prompts(base.lm, prompts)))
    need = memory.estimate_sampling(base.lm.model.config, 4, width + 1000, 1000, kv_bytes=4).total
    asked = free_memory(monkeypatch, need - 1)
    no_decoding(monkeypatch)
    with pytest.raises(ConfigError) as e:
        base.generate(prompts, max_new_tokens=1000)
    assert str(e.value) == (
        f"sampling 4 answers of up to {width + 1000} tokens needs about {memory.size(need)} of KV cache and "
        f"logits, but only {memory.size(need - 1)} of RAM is free on cpu; lower max_new_tokens or the batch"
    )
    assert asked == [torch.device("cpu")]  # the device the weights are on


def test_sampling_that_fits_runs(base, monkeypatch):
    prompts = ["Say hi.", "Count to 3."]
    width = max(map(len, generation.encode_prompts(base.lm, prompts)))
    free_memory(monkeypatch, memory.estimate_sampling(base.lm.model.config, 2, width + 5, 5, kv_bytes=4).total)
    assert len(base.generate(prompts, max_new_tokens=5)) == 2


def test_every_answer_of_every_prompt_counts(base, monkeypatch):
    """%rank and %compare sample k answers per prompt in one batch: the estimate is for all of them."""
    free_memory(monkeypatch, 64 * 1024)
    no_decoding(monkeypatch)
    with pytest.raises(ConfigError, match=r"^sampling 12 answers of up to \d+ tokens needs about [\d.]+ KiB"):
        base.sample(["a", "b", "c"], 4, max_new_tokens=20)


def test_gpu_free_memory_counts_what_torchs_cache_holds_unused(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * MIB, 80 * MIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 10 * MIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 4 * MIB)
    assert memory.available_memory(cuda) == 9 * MIB
    assert memory.available_memory(torch.device("meta")) is None
    assert memory.available_memory(torch.device("cpu")) > 0


# ------------------------------------------------------------------------------------------- training
def test_an_absurd_sft_batch_is_refused_in_one_line_before_any_step(pairs, monkeypatch):
    free_memory(monkeypatch, 2**30)
    events = []
    with pytest.raises(ConfigError) as e:
        api.sft("big", model="tiny", data=pairs, batch_size=100000, max_length=100000, progress=False,
                callbacks=[events.append])  # fmt: skip
    msg = str(e.value)
    assert "\n" not in msg and not events  # not even the start event
    assert re.fullmatch(
        r"model = 'tiny' needs about \d+\.\d TiB \(\d+\.\d KiB gradients \+ optimizer state, \d+\.\d TiB activations "
        r"at 100000 x 100000 tokens\) but only 1\.0 GiB of RAM is free on cpu; lower batch_size or max_length, set "
        r"gradient_checkpointing = True, or pick a smaller model",
        msg,
    ), msg


def test_training_estimates_follow_the_stage(monkeypatch):
    """Reward batches hold two answers per prompt and never form vocabulary logits; bf16 halves activations."""
    shape = memory.ModelShape(params=1000, hidden=64, layers=2, intermediate=128, vocab=1000)
    sft = memory.Workload.of(SFTConfig(model="tiny", data=[], batch_size=4, max_length=100))
    rm = memory.Workload.of(RewardConfig(model="tiny", data=[], batch_size=4, max_length=100, lora=False))
    assert (sft.rows, sft.logits, sft.train) == (4, True, "lora") and (rm.rows, rm.logits, rm.train) == (
        8,
        False,
        "full",
    )
    per_token = 2 * (6 * 64 + 4 * 128) * 4
    assert memory.estimate_memory(shape, rm, weight_bytes=4).activations == 8 * 100 * per_token
    assert memory.estimate_memory(shape, sft, weight_bytes=4).activations == 4 * 100 * (per_token + 1000 * 8)
    bf16 = types.SimpleNamespace(precision="bf16", device=torch.device("cpu"))
    assert sft.under(bf16).act_bytes == 2 and sft.under(types.SimpleNamespace(precision="fp32")).act_bytes == 4


def test_a_stage_on_a_model_in_memory_is_checked_too(base, monkeypatch):
    """A handle (or a model cached by an earlier stage) never passes the check at load: the stage checks what it
    adds, and a full fine-tuning copy of the weights."""
    free_memory(monkeypatch, 4 * MIB)
    prefs = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 4
    with pytest.raises(ConfigError, match=r"^model = 'base' needs about .* activations at 2000 x 4096 tokens\)"):
        api.reward("rm", model=base, data=prefs, batch_size=1000, max_length=4096, progress=False)
    params = sum(p.numel() for p in base.lm.model.parameters())
    weights = memory.size(params * 4)
    with pytest.raises(ConfigError, match=rf"^model = 'base' needs about .* \({re.escape(weights)} weights in float32"):
        api.sft("full", model=base, data=[{"prompt": "a", "response": "b"}] * 4, lora=False, batch_size=64,
                max_length=2048, progress=False)  # fmt: skip
    assert base.lm.peft is None  # nothing was added to the shared model


def test_a_ppo_update_that_cannot_fit_is_refused_before_anything_is_set_up(base, monkeypatch):
    free_memory(monkeypatch, MIB)
    with pytest.raises(ConfigError) as e:
        api.ppo("p", policy=base, reward=lambda p, r: [0.0] * len(r), prompts=["x", "y"] * 4, batch_size=8,
                mini_batch_size=8, micro_batch_size=8, max_new_tokens=1000, progress=False)  # fmt: skip
    assert re.fullmatch(
        r"PPO on 'base' needs about [\d.]+ MiB \([\d.]+ KiB gradients \+ optimizer state, [\d.]+ MiB activations at "
        r"8 x \d+ tokens\) but only 1\.0 MiB of RAM is free on cpu; lower mini_batch_size, micro_batch_size or "
        r"max_new_tokens, set gradient_checkpointing = True, or pick a smaller model",
        str(e.value),
    ), str(e.value)
    assert base.lm.peft is None  # no PPO adapter was added


def test_ppo_counts_one_chunk_of_rows_without_vocabulary_logits(base, monkeypatch):
    seen = []
    monkeypatch.setattr(memory, "check_work", lambda work, *a, **k: seen.append((work, k["copy"])))
    cfg = PPOConfig(policy=base, reward=len, prompts=["x"], batch_size=8, mini_batch_size=4, micro_batch_size=2,
                    max_new_tokens=50, lora=LoraConfig(r=4))  # fmt: skip
    memory.check_ppo(cfg, ["x", "a longer prompt"], types.SimpleNamespace(device=torch.device("cpu"), precision="fp32"))
    width = max(map(len, generation.encode_prompts(base.lm, ["x", "a longer prompt"]))) + 50
    ((work, copy),) = seen
    assert (work.train, work.rows, work.max_length, work.lora_r, work.logits, copy) == (
        "lora",
        2,
        width,
        4,
        False,
        False,
    )
