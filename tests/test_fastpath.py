"""The CPU fast path (engine/fastpath): its one patch helper, its switch, and the specialisations that replace
third-party code (decode products, the categorical draw, the lean LoRA forward)."""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import threading

import pytest
import torch

from rlhf_magic.engine.fastpath import native
from rlhf_magic.engine.fastpath.lean import lean_lora
from rlhf_magic.engine.fastpath.sampling import fast_sampling, skinny_linear
from rlhf_magic.engine.patching import PROCESS, is_patched, original, patched


@pytest.mark.fastpath
def test_skinny_linear_computes_the_same_products_and_always_restores_nn_linear():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(24, 40), torch.nn.Linear(24, 40, bias=False)]
    inputs = [torch.randn(3, 24), torch.randn(2, 5, 24), torch.randn(24), torch.randn(300, 24)]  # 300 rows: plain
    expected = [[layer(x) for x in inputs] for layer in layers]
    original = torch.nn.Linear.forward
    with skinny_linear():
        assert torch.nn.Linear.forward is not original
        got = [[layer(x) for x in inputs] for layer in layers]
    assert torch.nn.Linear.forward is original
    for want_row, got_row in zip(expected, got):
        for want, have in zip(want_row, got_row):
            assert have.shape == want.shape and torch.allclose(have, want, atol=1e-6)
    with pytest.raises(RuntimeError, match="boom"), skinny_linear():
        raise RuntimeError("boom")
    assert torch.nn.Linear.forward is original


@pytest.mark.fastpath
def test_native_decode_kernel_matches_torch_and_steps_aside_where_it_does_not_apply(monkeypatch, native_kernels):
    """The native product for decode steps equals x @ W.T + b for 1 to MAX_ROWS rows (K not a multiple of 8, with
    and without bias); it declines more rows, gradients and other dtypes, and a missing compiler or
    RLHF_MAGIC_NATIVE=0 leave no kernel (torch is used) instead of an error."""
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


@pytest.mark.fastpath
def test_fast_sampling_draws_from_the_distribution_and_never_a_zero_probability_token():
    """The inverse-CDF draw that replaces torch.multinomial(probs, 1) during CPU generation: frequencies match the
    (unnormalised) probabilities within 5 standard errors, including entries in different blocks, the last entry and
    a vocabulary that is not a multiple of the block; zero-probability entries are never drawn."""
    from rlhf_magic.ops import categorical

    torch_multinomial = torch.multinomial

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
    with fast_sampling():
        assert torch.multinomial is not torch_multinomial
        assert torch.multinomial(share.float().expand(3, width), 2).shape == (3, 2)  # other calls: the original
        with pytest.raises(RuntimeError, match="nan"):  # bad probabilities: multinomial's own error
            torch.multinomial(torch.full((2, width), float("nan")), 1)
    assert torch.multinomial is torch_multinomial


@pytest.mark.fastpath
def test_lean_lora_forward_gives_peft_outputs_and_gradients_for_stacked_adapters_and_is_undone():
    """Generation and PPO run peft's LoRA layers through a leaner forward: the same logits (adapters stacked, one,
    or off) and the same gradients for the adapter weights; peft's forward comes back, even after an error."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    from rlhf_magic.config import LoraConfig
    from rlhf_magic.engine.adapters import adapter_parameters, add_adapter, train_only, use_adapter
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
            with skinny_linear():
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


class _Owner:
    value = "original"


def test_patched_nests_restores_on_error_and_keeps_the_original():
    with patched(_Owner, "value", "outer") as first:
        assert first == "original" and _Owner.value == "outer"
        with patched(_Owner, "value", "inner") as again:
            assert again == "original" and _Owner.value == "inner" and original(_Owner, "value") == "original"
        assert _Owner.value == "outer" and is_patched(_Owner, "value")
        with pytest.raises(RuntimeError, match="boom"), patched(_Owner, "value", "failing"):
            raise RuntimeError("boom")
        assert _Owner.value == "outer"
    assert _Owner.value == "original" and not is_patched(_Owner, "value") and not PROCESS.patches


def test_patched_blocks_in_several_threads_end_in_any_order_and_leave_the_original():
    """Two threads patch one attribute; the first to enter ends last, then the other way round. The attribute
    always shows a value of a block still running, and the original when none is."""
    for first_ends_first in (True, False):
        entered, release = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]

        def block(i: int, entered: list = entered, release: list = release) -> None:
            with patched(_Owner, "value", f"thread {i}"):
                entered[i].set()
                release[i].wait(5)

        threads = [threading.Thread(target=block, args=(i,)) for i in (0, 1)]
        threads[0].start()
        entered[0].wait(5)
        threads[1].start()
        entered[1].wait(5)
        order = (0, 1) if first_ends_first else (1, 0)
        release[order[0]].set()
        threads[order[0]].join(5)
        assert _Owner.value == f"thread {order[1]}"  # the block still running
        release[order[1]].set()
        threads[order[1]].join(5)
        assert _Owner.value == "original" and not PROCESS.patches


def test_patched_instance_attributes_of_modules_come_back():
    trunk = torch.nn.Module()
    trunk.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    layers = trunk.layers
    with patched(trunk, "layers", torch.nn.ModuleList(list(layers)[1:])):
        assert len(trunk.layers) == 2
    assert trunk.layers is layers


@pytest.mark.fastpath
def test_a_thread_outside_the_fast_path_runs_torch_products_while_another_is_inside():
    layer = torch.nn.Linear(8, 4).requires_grad_(False)
    x = torch.randn(3, 8)
    want = torch.nn.functional.linear(x, layer.weight, layer.bias)
    inside, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def sampler() -> None:
        with torch.no_grad(), skinny_linear(layer):  # every frozen layer but this one would read bf16 copies
            inside.set()
            done.wait(5)

    thread = threading.Thread(target=sampler)
    thread.start()
    inside.wait(5)
    assert is_patched(torch.nn.Linear, "forward")
    seen["outside"] = layer(x)  # this thread is not inside: torch's own product
    done.set()
    thread.join(5)
    assert torch.equal(seen["outside"], want) and not is_patched(torch.nn.Linear, "forward")


def test_the_switch_runs_a_whole_pipeline_without_any_fast_path_code(pairs, monkeypatch):
    """fast_path = False: SFT, reward and PPO on the tiny model run with none of the fast path's patches installed
    and none of its decoder, memory pool, packing or prefix entered (the plain path a GPU runs); on the fast path
    (where the environment allows it) they are.
    Runs in both test modes."""
    from rlhf_magic import api
    from rlhf_magic.engine import fastpath, patching
    from rlhf_magic.engine.fastpath import cpu_pool, packing, prefix, sampling  # noqa: F401

    installed: list[str] = []
    real = patching.patched

    @contextlib.contextmanager
    def spy(owner, name, value):
        installed.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{name}")
        with real(owner, name, value) as orig:
            yield orig

    # every fast-path module that patches (the plain path's own patches, e.g. generation's config, do not count)
    patching_modules = [m.name for m in pkgutil.iter_modules(fastpath.__path__)]
    for module in patching_modules:
        loaded = importlib.import_module(f"rlhf_magic.engine.fastpath.{module}")
        if getattr(loaded, "patched", None) is real:
            monkeypatch.setattr(loaded, "patched", spy)
    assert {"cpu_bf16", "lean", "packing", "prefix", "sampling"} <= set(patching_modules)
    for target in ("sampling.decoder", "cpu_pool.pooled", "packing.pack_rows", "prefix.frozen_depth"):
        module, name = target.split(".")
        real_fn = getattr(getattr(fastpath, module), name)

        def entered(*args, _name=target, _fn=real_fn, **kwargs):
            installed.append(_name)
            return _fn(*args, **kwargs)

        monkeypatch.setattr(f"rlhf_magic.engine.fastpath.{target}", entered)
    for on in (False, True):
        installed.clear()
        sft = api.sft("s", model="tiny", data=pairs, max_steps=3, lr=3e-3, fast_path=on, progress=False)
        ranked = [{"prompt": p["prompt"], "chosen": p["response"], "rejected": "no"} for p in pairs[:8]]
        rm = api.reward("r", model=sft, data=ranked, max_steps=2, fast_path=on, progress=False)
        ppo = api.ppo("p", policy=sft, reward=rm, prompts=[p["prompt"] for p in pairs[:8]], steps=1, batch_size=4,
                      mini_batch_size=4, max_new_tokens=6, fast_path=on, progress=False)  # fmt: skip
        assert len(ppo.generate([p["prompt"] for p in pairs[:3]], max_new_tokens=6)) == 3
        assert bool(installed) == (on and fastpath.enabled_by_env()), installed
    assert not PROCESS.patches


def test_the_plain_path_trains_under_bf16_autocast_as_a_gpu_would(pairs):
    """fast_path = False with precision 'bf16': torch's own autocast, no kept copies or fp32 attention (the path a
    bf16 GPU runs). PPO starts at zero KL (policy and reference are computed alike) and trains every weight."""
    from rlhf_magic import api

    sft = api.sft("pbf", model="tiny", data=pairs, max_steps=3, lr=3e-3, precision="bf16", fast_path=False,
                  progress=False)  # fmt: skip
    start: dict = {}

    def grab(ev):
        if ev.kind == "start":
            start["w"] = [p.detach().clone() for p in ev.payload["handle"].trainable_parameters()]

    h = api.ppo("pbf-ppo", policy=sft, reward=lambda p, r: [len(x) / 10 for x in r], prompts=[f"Say {i}" for i in
                range(8)], steps=2, batch_size=8, mini_batch_size=8, num_ppo_epochs=1, max_new_tokens=6, lr=1e-2,
                precision="bf16", fast_path=False, progress=False, callbacks=[grab])  # fmt: skip
    assert h.runtime.precision == "bf16" and not h.runtime.fast_path
    assert abs(h.metrics["ppo/objective/kl"][0]) < 1e-6
    assert all(not torch.equal(a, b.detach()) for a, b in zip(start["w"], h.trainable_parameters()))
    assert not PROCESS.patches and all(PROCESS.bf16_copies.get(p) is None for p in h.lm.model.parameters())
