"""Code paths that GPUs run, proved on a CPU: fp16 loss-scale overflows, complete sampling settings, the value head's
start, gradient checkpointing.

fp16 runs through accelerate's own machinery (its backward scales the loss, clip_grad_norm_ unscales, the prepared
optimizer's step runs torch's GradScaler.step and .update) with a real torch GradScaler: accelerate gives a CPU no
scaler, so `_FP16OnCPU` hands it one. The arithmetic stays fp32, so an overflow is injected as an infinite gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random

import pytest
import torch
from accelerate import Accelerator

from rlhf_magic import api
from rlhf_magic.engine import fastpath
from rlhf_magic.engine import rollout as R
from rlhf_magic.engine.generation import sample
from rlhf_magic.engine.loop import MAX_SKIPPED_STEPS, linear_schedule
from rlhf_magic.engine.models import LoadedModel
from rlhf_magic.engine.runtime import Runtime
from rlhf_magic.engine.tiny import tiny_model

INIT_SCALE = 2.0**16
PROMPTS = [f"List letters {i}" for i in range(16)]


@pytest.fixture(scope="module")
def policy():
    """A LoRA SFT policy of the tiny model (what it learned does not matter here)."""
    return api.sft("sft", model="tiny", data=[{"prompt": p, "response": "a b c d"} for p in PROMPTS], max_steps=2,
                   progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------------ fp16 on a CPU
class _FP16OnCPU(Accelerator):
    mixed_precision = "fp16"  # over accelerate's property: its unscale_gradients acts as under fp16 on a GPU

    def prepare(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = super().prepare(*args, **kwargs)
        self.native_amp = True  # after prepare, so that no (bf16) CPU autocast wraps the model's forward
        return out

    def autocast(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return contextlib.nullcontext()


class _FP16Runtime(Runtime):
    """A CPU runtime whose accelerator trains like accelerate's fp16 on a GPU, with torch's GradScaler."""

    def accelerator(self, grad_accum: int = 1):  # type: ignore[no-untyped-def]
        acc = super().accelerator(grad_accum)
        if type(acc) is not _FP16OnCPU:
            acc.__class__ = _FP16OnCPU
            acc.scaler = torch.amp.GradScaler("cpu", init_scale=INIT_SCALE)
        return acc


class _Session:
    def __init__(self, runtime: Runtime):
        self.runtime = runtime

    def add(self, handle):  # type: ignore[no-untyped-def]
        return handle


class _InfGrad(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: what an fp16 overflow in backward leaves."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def, override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def, override]
        return torch.full_like(grad, math.inf)


class _Watch:
    """A callback: the handle at 'start', a copy of its trainable weights at every 'step', the warnings, and the
    number of the step under way."""

    def __init__(self):
        self.handle, self.weights, self.warnings, self.now = None, {}, [], 1

    def __call__(self, ev):  # type: ignore[no-untyped-def]
        if ev.kind == "start":
            self.handle = ev.payload["handle"]
            self.weights[0] = self.trained()
        elif ev.kind == "step":
            self.weights[ev.step], self.now = self.trained(), ev.step + 1
        elif ev.kind == "warning":
            self.warnings.append((ev.step, ev.payload))

    def trained(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.handle.trainable_parameters()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _poison_sft(monkeypatch, watch: _Watch, bad: set[int]) -> list[list[torch.Tensor]]:
    """SFT's forward calls numbered from 1; those in `bad` overflow in backward. Returns the weights at each call."""
    from rlhf_magic.engine import modules

    real, seen = modules.TokenLoss.forward, []

    def forward(self, **batch):  # type: ignore[no-untyped-def]
        seen.append(watch.trained())
        loss = real(self, **batch)
        return _InfGrad.apply(loss) if len(seen) in bad else loss

    monkeypatch.setattr(modules.TokenLoss, "forward", forward)
    return seen


def test_sft_fp16_overflows_skip_their_steps_lower_the_scale_and_training_goes_on(pairs, monkeypatch):
    watch, runtime = _Watch(), _FP16Runtime("cpu")
    seen = _poison_sft(monkeypatch, watch, bad={3, 4, 5})
    h = api.sft("s16", model="tiny", data=pairs, max_steps=6, eval_fraction=0, lr=3e-3, progress=False,
                session=_Session(runtime), callbacks=[watch])  # fmt: skip
    assert "stopped" not in h.metrics.summary and h.metrics.summary["steps"] == 6
    assert len(seen) == 6 + 3 and runtime._accelerator.scaler.get_scale() == INIT_SCALE / 2**3
    assert not _same(seen[1], seen[2])  # step 2 moved the weights (call 3 sees them) ...
    assert _same(seen[2], seen[5])  # ... the three overflowed steps did not (call 6 sees the same) ...
    assert not _same(seen[5], watch.weights[3])  # ... and the next step did
    assert [row["step"] for row in h.metrics.history] == list(range(1, 7))
    assert h.metrics["train/lr"] == pytest.approx(_schedule(3e-3, 6))  # the skips did not advance the schedule
    assert all(math.isfinite(x) for x in h.metrics["train/loss"] + h.metrics["train/grad_norm"])


def _schedule(lr: float, steps: int) -> list[float]:
    """The learning rate after each of `steps` optimizer steps of the loop's schedule."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched, out = linear_schedule(opt, steps), []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def test_sft_fp16_stops_after_too_many_overflows_in_a_row_keeping_the_last_good_weights(pairs, monkeypatch):
    watch, runtime = _Watch(), _FP16Runtime("cpu")
    seen = _poison_sft(monkeypatch, watch, bad=set(range(3, 1000)))
    h = api.sft("s16", model="tiny", data=pairs, max_steps=40, eval_fraction=0, lr=3e-3, progress=False,
                session=_Session(runtime), callbacks=[watch])  # fmt: skip
    scale = INIT_SCALE / 2**MAX_SKIPPED_STEPS
    assert h.metrics.summary["steps"] == 2 and len(seen) == 2 + MAX_SKIPPED_STEPS
    assert h.metrics.summary["stopped"] == (
        f"the gradients overflowed fp16 (loss scale now {scale:g}) in {MAX_SKIPPED_STEPS} optimizer steps in a row; "
        f"the result keeps the weights of step 2 (try a lower lr, or bf16 / fp32)"
    )
    assert _same(watch.weights[2], watch.trained())


def test_reward_fp16_overflows_skip_their_steps(monkeypatch):
    from rlhf_magic.engine import reward_model

    real, calls = reward_model.RankingLoss.forward, []

    def forward(self, **batch):  # type: ignore[no-untyped-def]
        calls.append(1)
        loss, extra = real(self, **batch)
        return (_InfGrad.apply(loss) if len(calls) in (2, 3) else loss), extra

    monkeypatch.setattr(reward_model.RankingLoss, "forward", forward)
    runtime = _FP16Runtime("cpu")
    h = api.reward("r16", model="tiny", data=_rankings(8), max_steps=3, normalize=False, eval_fraction=0,
                   progress=False, session=_Session(runtime))  # fmt: skip
    assert h.metrics.summary["steps"] == 3 and "stopped" not in h.metrics.summary
    assert len(calls) == 5 and runtime._accelerator.scaler.get_scale() == INIT_SCALE / 4


def _poison_ppo(monkeypatch, bad: set[int]) -> _Watch:
    """PPO steps (from 1) in `bad` get an infinite value gradient in every backward; values stay finite."""
    from rlhf_magic.engine import rollout

    real, watch = rollout.policy_forward, _Watch()

    def forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        lp, v, ent = real(*args, **kwargs)
        return lp, (_InfGrad.apply(v) if torch.is_grad_enabled() and watch.now in bad else v), ent

    monkeypatch.setattr(rollout, "policy_forward", forward)
    return watch


def _ppo(policy, watch, **settings):  # type: ignore[no-untyped-def]
    kw = dict(policy=policy, reward=_letters, prompts=PROMPTS, batch_size=4, mini_batch_size=4, num_ppo_epochs=1,
              max_new_tokens=6, lr=3e-3, progress=False, callbacks=[watch])  # fmt: skip
    return api.ppo("p16", **{**kw, **settings})


def test_ppo_fp16_overflows_skip_their_minibatch_steps_and_training_goes_on(monkeypatch, pairs):
    runtime = _FP16Runtime("cpu")
    policy = api.sft("sft16", model="tiny", data=pairs, max_steps=2, progress=False, session=_Session(runtime))
    assert runtime._accelerator.scaler.get_scale() == INIT_SCALE  # the SFT run took every step
    watch = _poison_ppo(monkeypatch, bad={2, 3})
    h = _ppo(policy, watch, steps=5)
    assert h.metrics.summary["steps"] == 5 and "stopped" not in h.metrics.summary
    assert h.metrics["ppo/skipped_steps"] == [0, 1, 1, 0, 0]
    assert runtime._accelerator.scaler.get_scale() == INIT_SCALE / 4
    w = watch.weights
    assert not _same(w[0], w[1]) and _same(w[1], w[3]) and not _same(w[3], w[4])
    assert not any("skipped" in text for _, text in watch.warnings)  # the scaler finding its scale is no news


def test_ppo_never_skips_a_non_finite_step_silently_and_stops_after_too_many(monkeypatch, policy):
    watch = _poison_ppo(monkeypatch, bad=set(range(2, 1000)))
    h = _ppo(policy, watch, steps=MAX_SKIPPED_STEPS + 5)
    assert h.metrics.summary["steps"] == 1 + MAX_SKIPPED_STEPS
    assert h.metrics["ppo/skipped_steps"] == [0] + [1] * MAX_SKIPPED_STEPS
    said = [(s, text) for s, text in watch.warnings if "skipped" in text]
    note = "1 of 1 optimizer steps were skipped: the gradients were not finite"
    assert said == [(step, note) for step in range(2, 2 + MAX_SKIPPED_STEPS)]  # at every skipped step
    assert h.metrics.summary["stopped"] == (
        f"the gradients were not finite in {MAX_SKIPPED_STEPS} optimizer steps in a row; the result keeps the "
        f"policy from before them (try a lower lr)"
    )
    assert any(h.metrics.summary["stopped"] == text for _, text in watch.warnings)
    assert _same(watch.weights[1], watch.trained())


# ------------------------------------------------------------------------------------------------ sampling settings
def _tiny_with_checkpoint_defaults() -> LoadedModel:
    """The tiny model as a checkpoint whose generation_config.json asks for penalties, top-k and suppressed tokens."""
    model, tok = tiny_model(seed=3)
    gen = model.generation_config
    gen.repetition_penalty, gen.no_repeat_ngram_size, gen.top_k = 1.8, 1, 5
    gen.suppress_tokens = list(range(3, 120))  # a None-neutral field: no explicit value can turn it off
    return LoadedModel("tiny", model, tok, "tiny")


@pytest.fixture
def processed(monkeypatch):
    """Every call of generate()'s logits processors: (their names, the scores that the token is drawn from)."""
    from transformers import LogitsProcessorList

    real, calls = LogitsProcessorList.__call__, []

    def spy(self, input_ids, scores, **kwargs):  # type: ignore[no-untyped-def]
        out = real(self, input_ids, scores, **kwargs)
        calls.append(([type(p).__name__ for p in self], out.detach().clone()))
        return out

    monkeypatch.setattr(LogitsProcessorList, "__call__", spy)
    return calls


def test_the_logprobs_ppo_keeps_are_those_the_plain_sampler_drew_from(processed):
    lm = _tiny_with_checkpoint_defaults()
    prompts = ["List letters 1", "x", "List letters 10 and then some more"]
    with fastpath.scope(False, "cpu"):  # the plain generate() path that every GPU runs
        out = sample(lm, prompts, max_new_tokens=12, temperature=0.7, seed=0, capture=True)
    assert out.logprobs is not None and len(processed) == out.responses.shape[1]
    assert all(names == ["TemperatureLogitsWarper"] for names, _ in processed)
    drawn = torch.stack(
        [torch.log_softmax(s.float(), -1).gather(1, out.responses[:, t : t + 1])[:, 0] for t, (_, s) in
         enumerate(processed)], 1
    )  # fmt: skip
    eos = out.responses == lm.tokenizer.eos_token_id
    real = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first EOS: PAD follows it
    assert real.sum() > 20
    torch.testing.assert_close(out.logprobs[real], drawn[real], rtol=1e-5, atol=1e-5)


def test_top_p_and_greedy_add_nothing_of_the_checkpoints_own(processed):
    lm = _tiny_with_checkpoint_defaults()
    with fastpath.scope(False, "cpu"):
        sample(lm, ["List letters 1"], max_new_tokens=3, temperature=0.7, top_p=0.9, seed=0)
        nucleus = {tuple(names) for names, _ in processed}
        processed.clear()
        sample(lm, ["List letters 1"], max_new_tokens=3, temperature=0.0)
    assert nucleus == {("TemperatureLogitsWarper", "TopPLogitsWarper")}
    assert {tuple(names) for names, _ in processed} == {()}
    assert lm.model.generation_config.repetition_penalty == 1.8  # the model's own config is back


# ------------------------------------------------------------------------------------------------ the value head
def test_the_value_head_starts_as_the_normalised_reward_model():
    from rlhf_magic.engine.modules import hidden_states
    from rlhf_magic.engine.reward_model import RewardHandle, make_head, right_pad

    model, tok = tiny_model(seed=1)
    lm, runtime = LoadedModel("tiny", model, tok, "tiny"), Runtime("cpu")
    torch.manual_seed(0)
    head = make_head(model.config.hidden_size, torch.device("cpu"), bias=False)
    rm = RewardHandle("rm", lm, head, runtime=runtime)
    rm.mean, rm.gain = 1.7, 0.4
    value = R.value_head_for(rm, lm, runtime)
    ids, mask = right_pad([tok.encode("an answer"), tok.encode("another, longer answer")], tok.pad_token_id)
    with torch.no_grad():
        states = hidden_states(model, ids, mask)
        last = states[torch.arange(2), mask.sum(1) - 1]
        torch.testing.assert_close(value(last).squeeze(-1), rm.reward_tokens(ids, mask), rtol=1e-5, atol=1e-6)
    assert value.weight.data_ptr() != head.weight.data_ptr()  # its own weights: training it leaves the reward alone


def test_a_reward_model_with_another_tokenizer_is_refused_with_the_lambda_that_scores_its_rewards():
    from rlhf_magic.engine.handles import PolicyHandle
    from rlhf_magic.engine.reward_model import RewardHandle, make_head
    from rlhf_magic.errors import ConfigError

    model, tok = tiny_model(seed=1)
    runtime = Runtime("cpu")
    lm = LoadedModel("tiny", model, tok, "tiny")
    pol = PolicyHandle("pol", "sft", lm, runtime=runtime)
    other_tok = copy.deepcopy(tok)
    other_tok.add_tokens(["<another>"])
    head = make_head(model.config.hidden_size, torch.device("cpu"), bias=False)
    rm = RewardHandle("rm", LoadedModel("t2", model, other_tok, "t2"), head, runtime=runtime)
    with pytest.raises(
        ConfigError, match=r"uses a different tokenizer than policy 'pol'.*lambda p, r: rm\.reward\(p, r\)"
    ):
        R.scorer_for(rm, pol, lm, runtime)
    assert R.scorer_for(lambda p, r: [0.0] * len(r), pol, lm, runtime) is not None


# ------------------------------------------------------------------------------------------------ checkpointing
class _Recomputes:
    """Counts the attention blocks' forwards that record gradients (checkpointing runs each twice: forward and
    recompute) and the tensors saved for backward outside checkpointed layers, over one stage call."""

    def __init__(self):
        self.forwards, self.saved, self.model, self.hooks = 0, 0, None, []

    def __call__(self, ev):  # type: ignore[no-untyped-def]
        if ev.kind == "start":
            self.model = ev.payload["handle"].lm.model
            self.hooks = [layer.self_attn.register_forward_pre_hook(self._count) for layer in self.model.model.layers]
        elif ev.kind == "end":
            for hook in self.hooks:
                hook.remove()

    def _count(self, module, args):  # type: ignore[no-untyped-def]
        self.forwards += torch.is_grad_enabled()

    def run(self, stage, name: str, **settings):  # type: ignore[no-untyped-def]
        def pack(t: torch.Tensor) -> torch.Tensor:
            self.saved += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            handle = stage(name, progress=False, callbacks=[self], **settings)
        return [p.detach().clone() for p in handle.trainable_parameters()]


def _checkpointed_and_not(stage, **settings):  # type: ignore[no-untyped-def]
    runs = {}
    for on in (False, True):
        count = _Recomputes()
        trained = count.run(stage, f"gc{int(on)}", gradient_checkpointing=on, **settings)
        runs[on] = (count, trained)
        modules = list(count.model.modules())
        assert not any(getattr(m, "gradient_checkpointing", False) for m in modules)  # off again afterwards
        assert not getattr(count.model, "_require_grads_hooks", None)
        assert all(m.training == count.model.training for m in modules)  # every mode flag as before
    (plain, trained), (ckpt, trained_ckpt) = runs[False], runs[True]
    assert plain.forwards > 0 and ckpt.forwards == 2 * plain.forwards  # every training forward was recomputed
    assert len(trained) == len(trained_ckpt)
    for a, b in zip(trained, trained_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    return plain, ckpt


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_sft_with_gradient_checkpointing_recomputes_every_layer_and_trains_the_same_weights(pairs, lora):
    settings = dict(model="tiny", data=pairs, max_steps=2, lr=3e-3, **({} if lora else {"lora": False}))
    plain, ckpt = _checkpointed_and_not(api.sft, **settings)
    assert ckpt.saved < plain.saved / 2  # the layers' activations were not kept for backward


def test_reward_in_eval_mode_with_gradient_checkpointing_trains_the_same_weights():
    plain, ckpt = _checkpointed_and_not(
        api.reward, model="tiny", data=_rankings(8), max_steps=2, normalize=False, lr=3e-3, batch_size=4
    )
    assert ckpt.saved < plain.saved / 2


def test_ppo_with_gradient_checkpointing_trains_the_same_weights(policy):
    _checkpointed_and_not(api.ppo, policy=policy, reward=_letters, prompts=PROMPTS, steps=2, batch_size=8,
                          mini_batch_size=4, num_ppo_epochs=2, max_new_tokens=8, lr=3e-3, seed=5)  # fmt: skip


@pytest.mark.fastpath
def test_ppo_on_packed_rows_with_gradient_checkpointing_recomputes_on_packed_rows(policy, monkeypatch):
    """The packed rows' attention is switched on for their forward alone: the recompute must run it too."""
    from rlhf_magic.engine.fastpath import packing

    real, packed = packing.pack_rows, []

    def spy(*args):  # type: ignore[no-untyped-def]
        out = real(*args)
        packed.append(out is not None and torch.is_grad_enabled())
        return out

    monkeypatch.setattr(packing, "pack_rows", spy)
    _checkpointed_and_not(api.ppo, policy=policy, reward=_letters, prompts=PROMPTS, steps=1, batch_size=8,
                          micro_batch_size=4, max_new_tokens=8, lr=3e-3, seed=5)  # fmt: skip
    assert any(packed)  # update forwards ran on packed rows


# ------------------------------------------------------------------------------------------------ data
def _letters(prompts, responses):  # type: ignore[no-untyped-def]
    return [r.count("a") / max(len(r), 1) for r in responses]


def _rankings(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        answers = ["".join(rng.choice("abcdq") for _ in range(rng.randint(4, 9))) for _ in range(3)]
        order = sorted(range(3), key=lambda j: -answers[j].count("q"))
        out.append({"prompt": f"Say something, {i}.", "responses": answers, "ranking": order})
    return out


# ------------------------------------------------------------------------------------------- bench/gpu_check.py
@pytest.mark.slow
def test_the_gpu_check_script_runs_and_its_invariants_hold_in_its_cpu_smoke_mode(tmp_path):
    """bench/gpu_check.py has never had a GPU to run on: its CPU smoke mode (fp32 and bf16, toy shapes) keeps the
    script itself working, so the first GPU lent runs it rather than debugs it."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--quick"], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    stages = ("sft", "reward", "ppo", "dpo", "grpo")
    for precision in ("fp32", "bf16"):
        checks = result["checks"][precision]
        assert all(checks.values()) and {f"{s}_every_param_changed" for s in stages} <= set(checks), checks
    assert result["ok"] and result["timings"]["toy-shape"]["ppo_step_s"] > 0, result
