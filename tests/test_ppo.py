"""PPO on the tiny model: it learns a rule reward with bounded KL, shares one base, and fails cleanly."""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_magic import api
from rlhf_magic.errors import ConfigError, DataError

PROMPTS = [f"List letters {i}" for i in range(32)]


@pytest.fixture(scope="module")
def sft():
    """A tiny policy that answers with four letters from a-d (full fine-tuning learns that in seconds)."""
    rng = random.Random(0)
    data = [{"prompt": p, "response": " ".join(rng.choice("abcd") for _ in range(4))} for p in PROMPTS]
    return api.sft("sft", model="tiny", data=data, max_steps=60, lr=1e-2, lora=False, progress=False)


def share_of_a(prompts, responses):
    """Rule reward: the share of letters that are 'a'."""
    return [r.count("a") / max(len(r.split()), 1) for r in responses]


def test_score_rises_while_kl_stays_bounded(sft):
    h = api.ppo(
        "p",
        policy=sft,
        reward=share_of_a,
        prompts=PROMPTS,
        steps=40,
        batch_size=8,
        max_new_tokens=12,
        lr=3e-3,
        kl_coef=0.05,
        progress=False,
    )
    scores, kl = h.metrics["ppo/objective/scores"], h.metrics["ppo/objective/kl"]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.25, (first, last)
    assert abs(kl[0]) < 1e-3  # the policy starts as the SFT policy, which is the reference
    # bounded, not diverging: one batch of 8 answers can spike (to ~10 on some CPUs' numerics), so the last ten
    # steps' mean is what is bounded (~2.3 here)
    assert sum(kl[-10:]) / 10 < 5 and all(math.isfinite(k) for k in kl)
    assert h.stage == "ppo" and h.parents == ("sft", "share_of_a")


def test_roles_share_one_base_and_every_trainable_weight_changes(sft):
    snap = {}

    def grab(ev):
        if ev.kind == "start":
            snap["w"] = [p.detach().clone() for p in ev.payload["handle"].trainable_parameters()]

    before = sft.generate(PROMPTS[:4], max_new_tokens=8)
    h = api.ppo(
        "p2",
        policy=sft,
        reward=share_of_a,
        prompts=PROMPTS,
        steps=3,
        batch_size=8,
        max_new_tokens=8,
        lr=3e-3,
        progress=False,
        callbacks=[grab],
    )
    assert h.lm is sft.lm  # policy, reference and value share the SFT model: no second copy
    assert all(not torch.equal(a, b.detach()) for a, b in zip(snap["w"], h.trainable_parameters()))
    assert sft.generate(PROMPTS[:4], max_new_tokens=8) == before  # the reference (SFT) policy is untouched
    base = [p for n, p in h.lm.model.named_parameters() if "lora_" not in n]
    assert not any(p.requires_grad for p in base)


def test_lora_policy_stacks_on_a_lora_sft_and_starts_equal_to_it(pairs):
    sft = api.sft("lsft", model="tiny", data=pairs, max_steps=5, lr=3e-3, progress=False)
    h = api.ppo(
        "p.3",  # a dot in the name: peft adapter names cannot hold one
        policy=sft,
        reward=lambda p, r: [len(x) / 10 for x in r],
        prompts=PROMPTS[:8],
        steps=1,
        batch_size=4,
        max_new_tokens=6,
        progress=False,
    )
    assert h.adapter[0] == sft.adapter and h.lm is sft.lm
    assert abs(h.metrics["ppo/objective/kl"][0]) < 1e-3


def test_stop_nan_rewards_keep_the_last_good_policy(sft):
    calls = {"n": 0}

    def flaky(prompts, responses):
        calls["n"] += 1
        return [float("nan")] * len(responses) if calls["n"] == 3 else [0.5] * len(responses)

    h = api.ppo(
        "p4", policy=sft, reward=flaky, prompts=PROMPTS, steps=10, batch_size=4, max_new_tokens=6, progress=False
    )
    assert h.metrics.summary["steps"] == 2
    assert "the reward was nan" in h.metrics.summary["stopped"]
    assert all(torch.isfinite(p).all() for p in h.trainable_parameters())


def test_resume_continues_the_same_policy(sft):
    h = api.ppo(
        "p5", policy=sft, reward=share_of_a, prompts=PROMPTS, steps=2, batch_size=4, max_new_tokens=6, progress=False
    )

    class Session(dict):
        def add(self, handle):
            self[handle.name] = handle

        @property
        def runtime(self):
            return h.runtime

    session = Session(p5=h)
    again = api.ppo(
        "p5",
        policy=sft,
        reward=share_of_a,
        prompts=PROMPTS,
        steps=2,
        batch_size=4,
        max_new_tokens=6,
        resume=True,
        progress=False,
        session=session,
    )
    assert again is h and h.metrics.summary["steps"] == 4 and len(h.metrics.history) == 4


@pytest.mark.parametrize(
    ("reward", "message"),
    [
        (lambda p, r: [1.0], "returned 1 scores for 4 answers"),
        (lambda p, r: ["good"] * len(r), "must return a list of numbers"),
        (lambda p, r: None, "must return a list of numbers"),
    ],
)
def test_bad_reward_callables_get_one_line_errors(sft, reward, message):
    with pytest.raises(ConfigError) as e:
        api.ppo(
            "bad", policy=sft, reward=reward, prompts=PROMPTS, steps=2, batch_size=4, max_new_tokens=4, progress=False
        )
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"steps": 0}, ConfigError, "steps = 0: use a positive integer"),
        ({"prompts": []}, DataError, "prompts is empty"),
        ({"temperature": 0.0}, ConfigError, "PPO samples"),
        ({"reward": 3}, ConfigError, "expected a reward handle or a callable"),
        ({"resume": True}, ConfigError, "no PPO result named"),
    ],
)
def test_bad_settings(sft, settings, error, message):
    kw = {
        "policy": sft,
        "reward": share_of_a,
        "prompts": PROMPTS,
        "steps": 1,
        "batch_size": 2,
        "max_new_tokens": 4,
        "progress": False,
        **settings,
    }
    with pytest.raises(error, match=message):
        api.ppo("x", **kw)


def test_magic_runs_ppo_with_a_notebook_callable(ip, sft):
    ip.user_ns.update(policy=sft, rule=share_of_a, prompts=PROMPTS)
    res = ip.run_cell(
        "%%ppo tuned\npolicy = policy\nreward = rule\nprompts = prompts\nsteps = 2\nbatch_size = 4\n"
        "max_new_tokens = 6\n"
    )
    assert res.success, res.error_in_exec
    assert ip.user_ns["rlhf"]["tuned"] is ip.user_ns["tuned"]
    assert len(ip.user_ns["tuned"].generate(["List letters 1"], max_new_tokens=6)) == 1


def _seeded_run(name, sft, **settings):
    """One short PPO run with fixed seed and settings; returns the handle and a copy of what it trained."""
    kw = dict(policy=sft, reward=share_of_a, prompts=PROMPTS, batch_size=8, num_ppo_epochs=2, max_new_tokens=8)
    h = api.ppo(name, **{**kw, "lr": 1e-2, "seed": 5, "progress": False, **settings})
    return h, [p.detach().clone() for p in h.trainable_parameters()]


def _assert_same(trained_a, trained_b):
    """The same update up to float noise. Adam's first step is about lr * sign(grad), so a gradient near zero can
    move its weight by up to ~lr/50 on 1e-7 noise: every weight within that, and nearly all of them within 1e-5."""
    for a, b in zip(trained_a, trained_b):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)
        far = ((a - b).abs() > 1e-5 + 1e-4 * b.abs()).float().mean()
        assert far < 0.01, f"{far:.1%} of the weights differ by more than float noise"


def test_micro_batches_give_the_same_update_as_one_forward_pass(sft, monkeypatch):
    """Chunking a minibatch (less memory) must not change the step: the chunk losses are token-weighted.

    Chunked updates take the rollout's logprobs and values from the decode steps, or (monkeypatched) from a
    forward pass; either way the step is the same up to float noise."""
    from rlhf_magic.engine import ppo as ppo_engine

    trained = []
    for micro in (8, 2):
        h, params = _seeded_run(f"m{micro}", sft, steps=1, mini_batch_size=8, micro_batch_size=micro)
        trained.append(params)
        assert h.metrics.summary["steps"] == 1
    real = ppo_engine.R.generate
    monkeypatch.setattr(ppo_engine.R, "generate", lambda *a, capture, **k: real(*a, capture=False, **k))
    _, recomputed = _seeded_run("m2-forward", sft, steps=1, mini_batch_size=8, micro_batch_size=2)
    _assert_same(trained[0], recomputed)
    _assert_same(trained[0], trained[1])


def test_micro_batch_gradients_sum_to_the_whole_minibatch_gradient(sft):
    """Answers of different lengths in chunks of 2: each chunk's loss is weighted by its share of the tokens, so
    the summed gradient is the minibatch's (a weighting by rows, or by chunks, would differ)."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from rlhf_magic.engine import ppo as P
    from rlhf_magic.engine import rollout as R
    from rlhf_magic.engine.adapters import train_only, use_adapter
    from rlhf_magic.engine.modules import PolicyValue
    from rlhf_magic.engine.reward_model import make_head

    roles = R.Roles(sft.lm, None, None, sft.lm, None, sft.runtime.autocast)
    cfg = SimpleNamespace(
        max_new_tokens=8, temperature=0.7, mini_batch_size=8, num_ppo_epochs=1, cliprange=0.2, cliprange_value=0.2,
        vf_coef=0.1, max_grad_norm=1e9, whiten_rewards=False, kl_estimator="k1", gamma=1.0, lam=0.95,
    )  # fmt: skip
    torch.manual_seed(0)
    head = make_head(sft.lm.model.config.hidden_size, torch.device("cpu"))
    weights = [p for n, p in sft.lm.model.named_parameters() if "lora_" not in n]  # earlier tests add adapters
    module, params = PolicyValue(sft.lm.model, head), [*weights, *head.parameters()]
    grads: dict[int, list[torch.Tensor]] = {}
    with use_adapter(sft.lm, None):
        ro = R.generate(roles, PROMPTS[:8], cfg, seed=1)
        for i, length in enumerate([8, 1, 5, 8, 2, 7, 3, 8]):  # as if EOS had cut the answers
            ro.mask[i, length:] = 0
            ro.attention_mask[i, ro.start + length :] = 0
        with torch.no_grad():
            ro.logprobs, ro.values, _ = R.policy_forward(module, ro, 0.7, entropy=False)
        ro.ref_logprobs = ro.logprobs - 0.3 * torch.rand(ro.logprobs.shape, generator=torch.Generator().manual_seed(1))
        ro.scores = torch.linspace(-1, 1, 8)
        try:
            train_only(sft.lm.model, params)
            for micro in (8, 2):
                opt = SimpleNamespace(
                    step=lambda micro=micro: grads.setdefault(micro, [p.grad.clone() for p in params]),
                    zero_grad=lambda set_to_none=True: [setattr(p, "grad", None) for p in params],
                )
                acc = SimpleNamespace(
                    device=torch.device("cpu"), autocast=nullcontext, backward=lambda loss: loss.backward(),
                    clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
                )  # fmt: skip
                state = SimpleNamespace(kl_ctl=SimpleNamespace(value=0.1), trained=params, roles=roles)
                settings = SimpleNamespace(**vars(cfg), micro_batch_size=micro)
                P.update(P.PPORun(module, opt, acc, state, settings, emit=None, stop=None), ro)
        finally:
            train_only(sft.lm.model, [])
    assert len(grads[8]) == len(grads[2]) and any(g.abs().sum() > 0 for g in grads[2])
    for whole, chunked in zip(grads[8], grads[2]):
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-6)


def test_decode_steps_give_the_logprobs_and_values_of_a_forward_pass(sft):
    """Captured while sampling (no extra forward pass): they must equal the policy forward on the answer tokens."""
    from types import SimpleNamespace

    from rlhf_magic.engine import rollout as R
    from rlhf_magic.engine.adapters import use_adapter
    from rlhf_magic.engine.modules import PolicyValue
    from rlhf_magic.engine.reward_model import make_head

    roles = R.Roles(sft.lm, None, None, sft.lm, None, sft.runtime.autocast)
    prompts = ["List letters 1", "List letters 10 and then some more", "x", "List letters 3"]  # left padding
    cfg = SimpleNamespace(max_new_tokens=10, temperature=0.7)
    ro = R.generate(roles, prompts, cfg, seed=3, capture=True)
    assert ro.logprobs is not None and ro.hidden is not None
    assert ro.logprobs.shape == ro.responses.shape and ro.hidden.shape[:2] == ro.responses.shape
    torch.manual_seed(0)
    head = make_head(sft.lm.model.config.hidden_size, torch.device("cpu"))
    with torch.no_grad(), use_adapter(sft.lm, None):  # earlier tests left PPO adapters on this model
        logprobs, values, _ = R.policy_forward(PolicyValue(sft.lm.model, head), ro, 0.7, entropy=False)
        captured = head(ro.hidden).squeeze(-1)
    real = ro.mask.bool()  # after the first EOS the answer is PAD and masked out
    assert real.sum() > 10
    torch.testing.assert_close(ro.logprobs[real], logprobs[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(captured[real], values[real], rtol=1e-4, atol=1e-4)
    assert R.generate(roles, prompts, cfg, seed=3).logprobs is None  # off unless asked for


@pytest.mark.fastpath
def test_shared_frozen_prefix_gives_the_same_hidden_states_and_scores(sft):
    """Bottom layers without adapters run once per rollout; every role's result must equal the full forward."""
    from rlhf_magic.config import LoraConfig
    from rlhf_magic.engine.adapters import add_adapter, train_only, use_adapter
    from rlhf_magic.engine.fastpath.prefix import frozen_depth, prefix_states
    from rlhf_magic.engine.models import load_model
    from rlhf_magic.engine.modules import hidden_states
    from rlhf_magic.engine.reward_model import last_token_scores, make_head

    lm = load_model("tiny", torch.device("cpu"))  # a private copy: the adapters below stay out of other tests
    top = add_adapter(lm, "top", LoraConfig(r=4, layers=1))
    model = lm.model
    train_only(model, [])
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so that a wrong split would show
        for n, p in model.named_parameters():
            if "lora_B" in n and ".top" in n:
                p.normal_(0, 0.5)
    assert frozen_depth(model, [top]) == 1  # tiny has 2 layers; the adapter sits in the top one
    ids = torch.randint(5, 40, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    head = make_head(model.config.hidden_size, ids.device)
    prefix = prefix_states(model, ids, mask, 1)
    real = mask.bool()  # states on padding mean nothing (packed rows leave zeros there)
    with torch.no_grad(), use_adapter(lm, top):
        full = hidden_states(model, ids, mask)
        torch.testing.assert_close(hidden_states(model, ids, mask, prefix)[real], full[real])
        torch.testing.assert_close(
            last_token_scores(model, head, ids, mask, prefix), last_token_scores(model, head, ids, mask)
        )
    with torch.no_grad(), use_adapter(lm, None):  # the reference role (adapters off) shares it too
        shared, full = hidden_states(model, ids, mask, prefix), hidden_states(model, ids, mask)
        torch.testing.assert_close(shared[real], full[real])
    everywhere = add_adapter(lm, "all", LoraConfig(r=4))
    assert frozen_depth(model, [top]) == 1 and frozen_depth(model, [top, everywhere]) == 0
    train_only(model, [next(model.get_input_embeddings().parameters())])
    assert frozen_depth(model, [top]) == 0  # a trainable embedding: nothing below the adapters is frozen


@pytest.mark.fastpath
def test_ppo_with_a_shared_prefix_makes_the_same_update(sft, monkeypatch):
    """lora.layers = 1: the bottom layer runs once per rollout; the step must equal the one without sharing."""
    from rlhf_magic.engine import fastpath

    trained, depths = [], []
    real = fastpath.prefix_depth
    for share in (True, False):
        monkeypatch.setattr(fastpath, "prefix_depth", real if share else lambda model, adapters: 0)
        h, params = _seeded_run(f"prefix{share}", sft, steps=2, micro_batch_size=4, lora={"r": 4, "layers": 1})
        depths.append(h.ppo.roles.depth)
        trained.append(params)
    assert depths == [1, 0]
    _assert_same(*trained)


@pytest.mark.fastpath
def test_default_micro_batch_holds_a_token_budget_and_grows_when_only_the_top_layers_need_gradients():
    from rlhf_magic.config import PPOConfig
    from rlhf_magic.engine.fastpath import CPU_CHUNK_TOKENS
    from rlhf_magic.engine.ppo import micro_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    cfg = PPOConfig(policy="p", reward=len, prompts=["x"], mini_batch_size=8)
    assert CPU_CHUNK_TOKENS // 89 == 8
    assert micro_batch_size(cfg, cpu, 1.0, 89) == 8  # 41 prompt + 48 answer tokens through every layer
    assert micro_batch_size(cfg, cpu, 1.0, 300) == 2  # long rows: two at a time
    assert micro_batch_size(cfg, cpu, 1.0, 3000) == 1
    assert micro_batch_size(cfg, cpu, 8 / 30, 89) == 32  # lora.layers = 8 of 30: about the same memory
    assert micro_batch_size(cfg, gpu, 1.0, 89) == 8
    assert micro_batch_size(PPOConfig(policy="p", reward=len, prompts=["x"], micro_batch_size=3), cpu, 0.1, 89) == 3


@pytest.mark.fastpath
@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_freed_tensor_memory_goes_back_to_the_os_between_micro_batches():
    """glibc keeps freed heap blocks; release_free_memory (called before each micro-batch) hands them back."""
    from rlhf_magic.engine.fastpath.cpu_pool import _malloc_trim, release_free_memory

    if _malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")

    def rss_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [torch.ones(16 * 1024) for _ in range(3000)]  # 64 KiB each (under glibc's mmap threshold): 188 MiB
    pin = torch.ones(16 * 1024)  # allocated after them, so the heap cannot simply shrink from the top
    del blocks
    held = rss_mib()
    release_free_memory()
    assert rss_mib() < held - 100, (held, rss_mib())
    del pin


@pytest.mark.fastpath
def test_ppo_on_packed_rows_makes_the_same_update(sft, monkeypatch):
    """The chat prompt every answer starts with runs once per forward and padding not at all: the same step."""
    from rlhf_magic.engine.fastpath import packing

    trained, packed = [], []
    real, limit = packing.pack_rows, packing.MAX_TOKENS

    def spy(*args):
        out = real(*args)
        packed.append(out is not None)
        return out

    monkeypatch.setattr(packing, "pack_rows", spy)
    trained.append(_seeded_run("packed", sft, steps=2, micro_batch_size=4)[1])
    assert packed and all(packed)  # every policy, reference and update forward ran on packed rows
    packed.clear()
    monkeypatch.setattr(packing, "MAX_TOKENS", 0)
    trained.append(_seeded_run("padded", sft, steps=2, micro_batch_size=4)[1])
    assert packed and not any(packed) and limit > 0
    _assert_same(*trained)


@pytest.mark.fastpath
@pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU memory pool needs g++")
def test_ppo_in_the_cpu_memory_pool_makes_the_same_update(sft, monkeypatch):
    """Every tensor of the update through the pool (any size): reused blocks must not change a single weight."""
    from rlhf_magic.engine.fastpath import cpu_pool

    trained, hits = [], []
    for pool in (True, False):
        monkeypatch.setattr(cpu_pool, "POOL_MIN_BYTES", 0 if pool else 1 << 62)
        trained.append(_seeded_run(f"pool{pool}", sft, steps=2, micro_batch_size=2)[1])
        hits.append(cpu_pool.stats()["hits"])
    assert hits[0] > 1000 and hits[1] == 0
    for a, b in zip(*trained):
        assert torch.equal(a, b)
