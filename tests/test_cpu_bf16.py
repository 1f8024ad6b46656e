"""precision = 'bf16' on a CPU: kept bf16 copies of frozen weights, fp32 attention, a bf16 LM-head product, saved
activations kept in bf16, and a PPO run that still starts at zero KL and trains every adapter weight."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rlhf_magic import api
from rlhf_magic.engine.fastpath import cpu_bf16
from rlhf_magic.engine.patching import is_patched
from rlhf_magic.head_logprobs import logprobs_from_head

pytestmark = pytest.mark.fastpath


def test_frozen_linear_multiplies_in_bf16_with_a_kept_copy_that_follows_in_place_changes():
    torch.manual_seed(0)
    lin = nn.Linear(64, 32).requires_grad_(False)
    x = torch.randn(5, 64)
    exact = lin(x)
    with cpu_bf16.autocast():
        y = lin(x)
        copy = cpu_bf16.frozen_copy(lin.weight)
        assert cpu_bf16.frozen_copy(lin.weight) is copy  # made once, not per call
        assert y.dtype == torch.bfloat16 and torch.allclose(y.float(), exact, rtol=0.03, atol=0.03)
        lin.weight.mul_(2.0)  # an in-place change (merging an adapter, say): a new copy
        assert torch.allclose(lin(x).float(), exact * 2 - lin.bias, rtol=0.05, atol=0.05)
    assert nn.Linear.forward is cpu_bf16._TORCH_LINEAR  # torch's own again outside
    trained = nn.Linear(64, 32)
    with cpu_bf16.autocast():
        trained(x).float().sum().backward()  # trainable weights: autocast's own cast, gradients in fp32
    assert trained.weight.grad is not None and trained.weight.grad.dtype == torch.float32


def test_attention_runs_in_fp32_under_the_kernels():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    with cpu_bf16.autocast():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.float32
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6)
    assert F.scaled_dot_product_attention is cpu_bf16._TORCH_SDPA


def test_bf16_head_product_stays_close_to_fp32_and_keeps_the_chosen_logit_exact():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=gen, requires_grad=True)
    weight = torch.randn(300, 16, generator=gen)  # frozen: no grad
    tokens = torch.randint(0, 300, (3, 7), generator=gen)
    exact = logprobs_from_head(hidden, weight, None, tokens, temperature=0.7, chunk=64)
    (g_exact,) = torch.autograd.grad(exact.logprobs.sum(), hidden)
    low = logprobs_from_head(hidden, weight, None, tokens, temperature=0.7, chunk=64, low=weight.bfloat16())
    (g_low,) = torch.autograd.grad(low.logprobs.sum(), hidden)
    assert (low.logprobs - exact.logprobs).abs().max() < 0.05
    assert ((g_low - g_exact).norm() / g_exact.norm()) < 0.02
    with pytest.raises(ValueError, match="frozen weight"):
        logprobs_from_head(hidden, weight.requires_grad_(True), None, tokens, low=weight.detach().bfloat16())


def test_ppo_in_bf16_on_a_cpu_starts_at_zero_kl_and_trains_every_adapter_weight(pairs, monkeypatch):
    sft = api.sft("bsft", model="tiny", data=pairs, max_steps=3, lr=3e-3, progress=False)
    snap: dict = {"packed": 0}
    monkeypatch.setattr(cpu_bf16, "SAVED_MIN_NUMEL", 1)  # the tiny model's activations are small: pack them all
    packer = cpu_bf16.bf16_packer

    def counting_packer():
        pack, unpack = packer()

        def counted(t):
            out = pack(t)
            snap["packed"] += out is not t
            return out

        return counted, unpack

    monkeypatch.setattr(cpu_bf16, "bf16_packer", counting_packer)

    def grab(ev):
        if ev.kind == "start":
            snap["w"] = [p.detach().clone() for p in ev.payload["handle"].trainable_parameters()]

    h = api.ppo(
        "bppo",
        policy=sft,
        reward=lambda p, r: [len(x) / 10 for x in r],
        prompts=[f"Say {i}" for i in range(8)],
        steps=2,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,  # chunks: old logprobs from a separate bf16 forward, as on the embedded model
        num_ppo_epochs=1,  # one optimizer step per rollout: its forward runs on the rollout's weights
        max_new_tokens=6,
        lr=1e-2,
        precision="bf16",
        progress=False,
        callbacks=[grab],
    )
    assert h.runtime.precision == "bf16"
    # policy and reference, and the old and the new logprobs, come from the same bf16 numerics (old logprobs
    # taken while sampling, in fp32, give a KL of ~3e-5 and an approx-KL of ~1.5e-7 here)
    assert abs(h.metrics["ppo/objective/kl"][0]) < 1e-5
    assert max(h.metrics["ppo/policy/approxkl"]) < 1e-9
    assert snap["packed"] > 100  # the update's backward read bf16 activations
    assert all(not torch.equal(a, b.detach()) for a, b in zip(snap["w"], h.trainable_parameters()))
    assert nn.Linear.forward is cpu_bf16._TORCH_LINEAR and F.scaled_dot_product_attention is cpu_bf16._TORCH_SDPA


def test_sampling_with_bf16_weights_reads_bf16_copies_of_the_frozen_trunk_but_keeps_the_head_fp32():
    from rlhf_magic.engine.fastpath.sampling import skinny_linear
    from rlhf_magic.engine.generation import sample
    from rlhf_magic.engine.models import load_model
    from rlhf_magic.engine.modules import trunk_and_head
    from rlhf_magic.engine.patching import PROCESS

    lm = load_model("tiny", torch.device("cpu"))
    lm.model.requires_grad_(False)
    _, head = trunk_and_head(lm.model)
    trunk_linear = next(m for m in lm.model.modules() if type(m) is nn.Linear and m is not head)
    x = torch.randn(3, trunk_linear.in_features)
    with torch.no_grad(), skinny_linear(head):
        low, head_out = trunk_linear(x), head(torch.randn(2, head.in_features))
    assert low.dtype == head_out.dtype == torch.float32
    with torch.no_grad():
        exact = trunk_linear(x)
    assert 1e-4 < (low - exact).abs().max() < 0.05  # the bf16 product: close, not equal (fp32 paths: ~1e-7)
    assert PROCESS.bf16_copies.get(head.weight) is None  # the LM head is never copied: logits stay fp32
    out = sample(lm, ["hi", "there"], max_new_tokens=4, temperature=0.7, seed=0, bf16_weights=True)
    assert out.responses.shape == (2, 4) and not is_patched(nn.Linear, "forward")
    assert PROCESS.bf16_copies.get(head.weight) is None and nn.Linear.forward is cpu_bf16._TORCH_LINEAR


def test_saved_activations_are_packed_once_in_bf16_and_gradients_stay_close():
    pack, unpack = cpu_bf16.bf16_packer()
    w = nn.Parameter(torch.randn(256, 512))
    act = (w * 2).t()  # an activation: fp32, has a grad_fn, 2**17 elements
    small, mask = (w * 2)[:4], torch.zeros(256, 512)
    first = pack(act)
    assert pack(act) is first and unpack(first).dtype == torch.float32  # a tensor saved twice is packed once
    assert torch.allclose(unpack(first), act, rtol=0.01) and not torch.equal(unpack(first), act)
    assert all(pack(t) is t for t in (w, small, mask))  # parameters, small tensors, tensors without gradients

    torch.manual_seed(0)
    first_layer, frozen = nn.Linear(64, 512), nn.Linear(512, 512).requires_grad_(False)
    x = torch.randn(512, 64)

    def grads(packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        first_layer.zero_grad()
        h = first_layer(x)  # fp32 values that bf16 cannot hold exactly
        with cpu_bf16.autocast(), cpu_bf16.saved_activations() if packed else contextlib.nullcontext():
            s = F.silu(h)
            out = (frozen(s).float() * s).sum()
        out.backward()
        return out.detach(), first_layer.weight.grad.clone()

    (y0, g0), (y1, g1) = grads(False), grads(True)
    assert torch.equal(y0, y1)  # forward values are untouched
    assert not torch.equal(g0, g1) and (g1 - g0).norm() / g0.norm() < 0.02  # backward read bf16 activations
    assert isinstance(cpu_bf16.saved_activations(), contextlib.nullcontext)  # outside kernels(): nothing
