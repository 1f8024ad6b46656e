"""Divergence on the tiny model: NaN, inf and blow-ups stop a run with one line and the last good weights.

At lr = 1e6 every stage's numbers stay finite but the model is ruined (an overflow inside a norm layer zeroes the
hidden states: SFT makes a uniform guess, the reward model scores every answer the same, PPO's value loss explodes);
at lr = 1e38 the weights themselves become NaN. Either way the run stops at once with one line, the handle keeps
the weights of the last good step, and it still generates and scores finite values.
"""

from __future__ import annotations

import io
import json
import math
import random
import re

import pytest
import torch
from planted import q_rankings

from rlhf_magic import api
from rlhf_magic.engine import divergence as D
from rlhf_magic.engine.generation import sample
from rlhf_magic.events import Emitter, Event, StopControl

PROMPTS = [f"List letters {i}" for i in range(32)]


SFT_LINES = {
    1e6: "training diverged at step 2: the gradients vanished and the loss is stuck at 5.557, a uniform guess over 259 "
    "tokens; the result keeps the weights of step 0 (lower lr: it is 1e+06, the default is 0.0002)",
    1e38: "training diverged at step 1: the weights became nan; the result keeps the weights of step 0 (lower lr: it "
    "is 1e+38, the default is 0.0002)",
}
REWARD_LINES = {
    1e6: "training diverged at step 2: the gradients vanished and the loss is stuck at 0.6931: the reward model gives "
    "every answer the same score; the result keeps the weights of step 0 (lower lr: it is 1e+06, the default is "
    "0.0001)",
    1e38: "training diverged at step 1: the weights became nan; the result keeps the weights of step 0 (lower lr: it "
    "is 1e+38, the default is 0.0001)",
}
PPO_LINES = {
    1e6: r"training diverged at step 1: the value loss exploded to \S+ \(its first: \S+\); the result keeps the "
    r"policy of step 0 \(lower lr: it is 1e\+06, the default is 0.0001\)",
    1e38: r"training diverged at step 1: the weights became nan; the result keeps the policy of step 0 \(lower lr: it "
    r"is 1e\+38, the default is 0.0001\)",
}


class Watch:
    """A callback: the trainable weights at the start and after every step, and every alarm."""

    def __init__(self):
        self.handle, self.weights, self.alarms = None, {}, []

    def __call__(self, ev: Event) -> None:
        if ev.kind == "start":
            self.handle = ev.payload["handle"]
            self.weights[ev.step] = self.trained()
        elif ev.kind == "step":
            self.weights[ev.step] = self.trained()
        elif ev.kind == "alarm":
            self.alarms.append((ev.step, ev.payload))

    def trained(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.handle.trainable_parameters()]

    def kept(self, handle, step: int) -> bool:
        return all(torch.equal(a, p.detach()) for a, p in zip(self.weights[step], handle.trainable_parameters()))


def _finite(handle) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in handle.trainable_parameters())


def _stopped_once(handle, watch: Watch) -> str:
    """The one line the run stopped with: in the summary and in exactly one alarm event, which says it stopped."""
    line = handle.metrics.summary["stopped"]
    assert "\n" not in line and handle.metrics.summary["divergence"] == line
    assert [(p["message"], p["stopped"]) for _, p in watch.alarms] == [(line, True)]
    return line


@pytest.fixture(scope="module")
def policy():
    rng = random.Random(0)
    data = [{"prompt": p, "response": " ".join(rng.choice("abcd") for _ in range(4))} for p in PROMPTS]
    return api.sft("sft", model="tiny", data=data, max_steps=60, lr=1e-2, lora=False, progress=False)


def share_of_a(prompts, responses):
    return [r.count("a") / max(len(r.split()), 1) for r in responses]


# ------------------------------------------------------------------------------------------------ each stage
@pytest.mark.parametrize("lr", [1e6, 1e38])
def test_sft_at_a_huge_lr_stops_with_one_line_and_the_last_good_weights(pairs, lr):
    watch = Watch()
    h = api.sft("s", model="tiny", data=pairs, max_steps=10, lr=lr, progress=False, callbacks=[watch])
    assert _stopped_once(h, watch) == SFT_LINES[lr]
    assert h.metrics.summary["steps"] == 0 and watch.kept(h, 0) and _finite(h)
    assert all(isinstance(a, str) for a in h.generate(["What is 3 plus 3?", "hi"], temperature=1.0, seed=0))
    assert all(math.isfinite(x) for x in h.logprobs(["What is 3 plus 3?"], ["The answer is 6."]))


def test_sft_whose_weights_give_a_nan_loss_goes_back_to_the_step_before_them(pairs):
    """lr = 1e20: the weights of step 1 are finite but give a NaN loss (and gradients) at step 2."""
    watch = Watch()
    h = api.sft("s", model="tiny", data=pairs, max_steps=10, lr=1e20, progress=False, callbacks=[watch])
    assert _stopped_once(h, watch).startswith("training diverged at step 2: the loss became nan; the result keeps the "
                                              "weights of step 0 (lower lr")  # fmt: skip
    assert watch.kept(h, 0) and len(watch.weights) == 2  # step 1 ran, and is undone


@pytest.mark.parametrize("lr", [1e6, 1e38])
def test_reward_at_a_huge_lr_stops_with_one_line_and_still_scores_apart(lr):
    watch = Watch()
    h = api.reward("rm", model="tiny", data=q_rankings(24), lr=lr, batch_size=4, max_steps=8, progress=False,
                   callbacks=[watch])  # fmt: skip
    assert _stopped_once(h, watch) == REWARD_LINES[lr]
    assert watch.kept(h, 0) and _finite(h)
    scores = h.score(["Say something."] * 3, ["abc", "qqqq", "a long answer"])
    assert all(math.isfinite(s) for s in scores) and len(set(scores)) == 3


@pytest.mark.parametrize("lr", [1e6, 1e38])
def test_ppo_at_a_huge_lr_stops_with_one_line_and_keeps_the_sft_start(policy, lr):
    watch = Watch()
    h = api.ppo("p", policy=policy, reward=share_of_a, prompts=PROMPTS, steps=4, batch_size=8, max_new_tokens=8,
                lr=lr, progress=False, callbacks=[watch])  # fmt: skip
    assert re.fullmatch(PPO_LINES[lr], _stopped_once(h, watch))
    assert h.metrics.summary["steps"] == h.ppo.step == 0 and h.ppo.optimizer_state is None  # resume: Adam afresh
    assert watch.kept(h, 0) and _finite(h)
    assert all(isinstance(a, str) for a in h.generate(PROMPTS[:3], temperature=1.0, seed=0))


def test_a_non_finite_reward_from_a_callable_stops_ppo_with_one_line(policy):
    calls = {"n": 0}

    def flaky(prompts, responses):
        calls["n"] += 1
        return [math.inf if calls["n"] == 2 else 0.5] * len(responses)

    watch = Watch()
    h = api.ppo("p", policy=policy, reward=flaky, prompts=PROMPTS, steps=5, batch_size=4, max_new_tokens=6,
                progress=False, callbacks=[watch])  # fmt: skip
    line = _stopped_once(h, watch)
    assert line.startswith("the reward was inf for answer 0 (") and line.endswith(
        "; the result keeps the policy of step 1 (a reward must be a finite number)"
    )
    assert h.metrics.summary["steps"] == 1 and watch.kept(h, 1)


def test_non_finite_sampling_probabilities_stop_ppo_before_a_draw(policy):
    """A weight turned NaN after step 1: step 2 samples from NaN probabilities; the run goes back to step 0 (the
    weights of step 1 made them)."""
    watch = Watch()

    def poison(ev):
        if ev.kind == "step" and ev.step == 1:
            with torch.no_grad():
                watch.handle.trainable_parameters()[0].fill_(math.nan)

    h = api.ppo("p", policy=policy, reward=share_of_a, prompts=PROMPTS, steps=4, batch_size=4, max_new_tokens=6,
                lr=1e-3, progress=False, callbacks=[watch, poison])  # fmt: skip
    assert _stopped_once(h, watch) == (
        "training diverged at step 2: the next-token probabilities became nan; the result keeps the policy of step 0 "
        "(lower lr: it is 0.001, the default is 0.0001)"
    )
    assert watch.kept(h, 0) and _finite(h)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generating_from_nan_weights_is_one_line_not_a_torch_error(pairs, temperature):
    h = api.sft("s", model="tiny", data=pairs, max_steps=1, progress=False)
    with torch.no_grad():
        h.trainable_parameters()[0].fill_(math.nan)
    with pytest.raises(D.NonFiniteError, match=r"^the model's next-token probabilities are nan: its weights diverged"):
        h.generate(["What is 3 plus 3?"], temperature=temperature, seed=0)
    with pytest.raises(D.NonFiniteError):  # the capture path PPO samples with
        sample(h.lm, ["hi"], max_new_tokens=4, temperature=1.0, seed=0, capture=True)


# ------------------------------------------------------------------------------------------------ alarm or warning
def test_stop_on_divergence_false_warns_and_goes_on(pairs):
    watch = Watch()
    h = api.sft("s", model="tiny", data=pairs, max_steps=6, lr=1e6, stop_on_divergence=False, progress=False,
                callbacks=[watch])  # fmt: skip
    assert "stopped" not in h.metrics.summary and h.metrics.summary["steps"] == 6
    assert watch.alarms == [(2, {"message": h.metrics.summary["divergence"], "stopped": False})]
    assert h.metrics.summary["divergence"].endswith("; stop_on_divergence = False, so training goes on")
    assert watch.kept(h, 6)  # the weights of the last step, diverged as they are


def test_stop_on_divergence_false_still_stops_on_nan(pairs, policy):
    h = api.sft("s", model="tiny", data=pairs, max_steps=6, lr=1e38, stop_on_divergence=False, progress=False)
    assert h.metrics.summary["stopped"] == SFT_LINES[1e38] and _finite(h)
    watch = Watch()  # lr = 1e30: the weights stay finite, the step's losses do not
    h = api.ppo("p", policy=policy, reward=share_of_a, prompts=PROMPTS, steps=4, batch_size=8, max_new_tokens=8,
                lr=1e30, stop_on_divergence=False, progress=False, callbacks=[watch])  # fmt: skip
    assert re.fullmatch(r"training diverged at step 1: the \S+ loss became nan; the result keeps the policy of step 0 "
                        r"\(lower lr: it is 1e\+30, the default is 0.0001\)", _stopped_once(h, watch))  # fmt: skip
    assert watch.kept(h, 0) and _finite(h)


@pytest.mark.fastpath
def test_the_fast_draw_turns_non_finite_probabilities_into_the_one_line():
    from rlhf_magic.engine.fastpath import sampling

    probs = torch.full((2, 512), 1 / 512)
    probs[1, 7] = math.inf
    with sampling.fast_sampling(), pytest.raises(D.NonFiniteError, match="probabilities are inf"):
        torch.multinomial(probs, 1)


def test_healthy_tiny_runs_raise_no_alarm(pairs, policy):
    watch = Watch()
    api.sft("s", model="tiny", data=pairs, max_steps=30, lr=3e-3, batch_size=8, progress=False, callbacks=[watch])
    api.sft("f", model="tiny", data=pairs, max_steps=10, lr=1e-3, lora=False, progress=False, callbacks=[watch])
    api.reward("rm", model="tiny", data=q_rankings(40), lr=3e-3, batch_size=4, progress=False, callbacks=[watch])
    h = api.ppo("p", policy=policy, reward=share_of_a, prompts=PROMPTS, steps=12, batch_size=8, max_new_tokens=12,
                lr=3e-3, kl_coef=0.05, progress=False, callbacks=[watch])  # fmt: skip
    assert watch.alarms == [] and "divergence" not in h.metrics.summary


# ------------------------------------------------------------------------------------------------ the rules
def _rules(stage: str = "ppo", uniform: float | None = None) -> D.Rules:
    return D.Rules(stage, 259, "lower lr", uniform=uniform)


PPO_ROW = {"ppo/val/loss": 0.1, "ppo/policy/entropy": 0.7, "ppo/response/length": 8.0, "ppo/policy/loss": 0.0}


@pytest.mark.parametrize(
    "key, near, far, said",
    [
        ("ppo/val/loss", 999.0, 1001.0, "the value loss exploded to 1e+03 (its first: 0.1)"),
        ("ppo/policy/entropy", 0.011, 0.005, "the policy's entropy collapsed to 0.005 nats per token (from 0.7)"),
        ("ppo/policy/entropy", 4.9, 5.2, "the policy's entropy rose to 5.2 nats per token (from 0.7; a uniform guess"),
        ("ppo/response/length", 1.1, 1.0, "every answer is empty (from 8 tokens on average)"),
        ("ppo/val/loss", 0.2, math.nan, "the value loss became nan"),
    ],
)
def test_each_ppo_alarm_trips_past_its_threshold_and_not_before(key, near, far, said):
    rules = _rules()
    assert rules.check(1, PPO_ROW) is None and rules.check(2, {**PPO_ROW, key: near}) is None
    alarm = rules.check(3, {**PPO_ROW, key: far})
    assert alarm is not None and alarm.text.startswith(f"training diverged at step 3: {said}")
    assert alarm.finite == math.isfinite(far)
    if alarm.finite:
        assert rules.check(4, {**PPO_ROW, key: far}) is None  # each finite rule alarms once a run


def test_the_value_loss_alarm_reads_its_first_minibatch_not_the_first_step():
    rules = _rules()
    rules.start("ppo/val/loss", 0.1)  # before any update; the first step's mean already holds the blow-up
    assert rules.check(1, {**PPO_ROW, "ppo/val/loss": 5e4}) is not None


def test_the_loss_alarm_reads_a_window_above_twice_the_start_and_the_ceiling():
    sft = _rules("sft")  # ceiling: max(2 x 2.5, ln 259 = 5.557)
    for step, loss in enumerate([2.5, 8.0, 6.0], 1):  # window means 2.5, 5.25, 5.5
        assert sft.check(step, {"train/loss": loss, "train/grad_norm": 1.0}) is None
    alarm = sft.check(4, {"train/loss": 6.5, "train/grad_norm": 1.0})  # mean 6.833
    assert alarm is not None and "the loss rose to 6.833 (its start: 2.5; a uniform guess over 259 tokens: 5.557)" in (
        alarm.text
    )
    rm = _rules("reward", uniform=math.log(2))  # ceiling: 2 ln 2 = 1.386 > 2 x 0.5
    assert rm.check(1, {"train/loss": 0.5, "train/grad_norm": 1.0}) is None
    assert rm.check(2, {"train/loss": 1.3, "train/grad_norm": 1.0}) is None  # one unlucky batch: mean 0.9
    assert rm.check(3, {"train/loss": 0.9, "train/grad_norm": 1.0}) is None
    alarm = rm.check(4, {"train/loss": 2.5, "train/grad_norm": 1.0})
    assert alarm is not None and "the loss rose to 1.567 (its start: 0.5; equal scores: 0.6931)" in alarm.text


def test_vanishing_gradients_alarm_only_while_the_loss_has_not_fallen():
    rules = _rules("reward", uniform=math.log(2))
    rules.check(1, {"train/loss": 0.74, "train/grad_norm": 1.3})
    assert rules.check(2, {"train/loss": 1e-6, "train/grad_norm": 1e-6}) is None  # learned: tiny loss, tiny gradients
    alarm = rules.check(3, {"train/loss": math.log(2), "train/grad_norm": 7e-9})
    assert alarm is not None and "the reward model gives every answer the same score" in alarm.text


def test_the_last_good_weights_of_a_large_model_live_on_the_cpu(monkeypatch):
    monkeypatch.setattr(D, "SMALL_SNAPSHOT", 0)
    w = torch.nn.Parameter(torch.ones(3))
    good = D.LastGood([w], 0)
    assert good.device == torch.device("cpu")
    for step in (1, 2):
        with torch.no_grad():
            w.add_(1)
        good.save(step)
    with torch.no_grad():
        w.fill_(math.nan)
    assert math.isnan(D.first_bad([w])) and D.first_bad([torch.ones(2)]) is None
    assert good.restore(older=True) == 1 and torch.equal(w, torch.full((3,), 2.0))


def test_a_divergence_replaces_an_earlier_stop_reason():
    stop = StopControl()
    stop.request("stopped with the Stop button")
    stop.request("later")
    assert stop.reason == "stopped with the Stop button"
    stop.request("training diverged", replace=True)
    assert stop.reason == "training diverged"


# ------------------------------------------------------------------------------------------------ the views
def test_the_live_view_turns_red_and_says_what_happened(ip):
    from rlhf_magic.widgets.live import DEFAULT_PANELS, RED, WidgetView

    healthy, view = (WidgetView(f"%%sft {n}", DEFAULT_PANELS["sft"], None) for n in ("ok", "s"))
    line = SFT_LINES[1e6]
    for v, alarm in ((healthy, False), (view, True)):
        emit = Emitter("sft", [v])
        emit.total = 10
        emit("start")
        emit("step", 1, {"train/loss": 5.5})
        if alarm:
            emit("alarm", 2, payload={"message": line, "stopped": True})
        emit("end", 0 if alarm else 1, payload={"reason": line if alarm else "done"})
    assert view.bar.bar_style == "danger" and "rlhf-diverged" in view.box._dom_classes
    assert view.alarm == {"message": line, "stopped": True}
    assert (
        "Stopped: diverged" in view.alerts.value and "lower lr: it is 1e+06, the default is 0.0002" in view.alerts.value
    )
    assert RED in view.label.value and "stopped for divergence" in view.label.value
    assert healthy.bar.bar_style != "danger" and "rlhf-diverged" not in healthy.box._dom_classes


def test_the_text_view_and_the_magic_print_the_line(ip, capsys, pairs):
    ip.user_ns["pairs"] = pairs
    capsys.readouterr()
    res = ip.run_cell("%%sft diverged\nmodel = 'tiny'\ndata = pairs\nmax_steps = 10\nlr = 1e6\n")
    out = capsys.readouterr().out
    assert res.success and ip.user_ns["diverged"].metrics.summary["stopped"] == SFT_LINES[1e6]
    assert f"[%%sft diverged] stopped: {SFT_LINES[1e6]}\n" in out
    assert "[%%sft diverged] finished: stopped for divergence (see above)" in out


def test_the_cli_prints_the_line(tmp_path, pairs, capsys):
    from rlhf_magic.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = tmp_path / "sft.toml"
    cfg.write_text(f'model = "tiny"\ndata = "{data}"\nmax_steps = 10\nlr = 1e38\noutput_dir = "{tmp_path / "out"}"\n')
    assert main(["sft", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert f"stopped: {SFT_LINES[1e38]}\n" in out
    summary = next(line for line in out.splitlines() if line.startswith("{"))  # then the one-line summary
    assert json.loads(summary)["stopped"] == SFT_LINES[1e38]
    assert out.splitlines()[-1].startswith("rlhf-magic: sft") and "stopped (" in out.splitlines()[-1]


def test_the_text_view_warns_on_a_divergence_that_does_not_stop():
    from rlhf_magic.widgets.live import TextView

    out = io.StringIO()
    view = TextView("%%ppo p", [], stream=out)
    view(Event("alarm", "ppo", 3, payload={"message": "training diverged at step 3: x (y); ...", "stopped": False}))
    view(Event("end", "ppo", 5, payload={"reason": "done"}))
    assert out.getvalue() == "[%%ppo p] warning: training diverged at step 3: x (y); ...\n[%%ppo p] finished: done\n"
