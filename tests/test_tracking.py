"""report_to: runs that experiment trackers see. TensorBoard for real (event files read back with TensorBoard's own
reader); W&B's tables and histograms through a stand-in tracker; a tracker that is not installed is refused before
anything loads; the README's callback example runs."""

from __future__ import annotations

import math
import re
import sys
import types
import warnings
from pathlib import Path
from typing import ClassVar

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from rlhf_magic import api
from rlhf_magic.engine import tracking
from rlhf_magic.errors import ConfigError
from rlhf_magic.events import Event, StopControl

PAIRS = [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(20)]
PROMPTS = [f"List letters {i}" for i in range(8)]


@pytest.fixture
def logdir(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_MAGIC_LOGGING_DIR", str(tmp_path / "tb"))
    return tmp_path / "tb"


def events_of(kind):
    seen = []
    return seen, lambda ev: seen.append(ev) if ev.kind == kind else None


def only_run(root: Path, name: str) -> Path:
    runs = [p for p in root.iterdir() if p.name.startswith(f"{name}-")]
    assert len(runs) == 1, runs
    return runs[0]


def reader(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    acc.Reload()
    return acc


def hparams(run: Path) -> dict:
    """The hyperparameters TensorBoard's HParams tab shows (add_hparams writes them in a sub-folder)."""
    for sub in run.iterdir():
        if sub.is_dir() and any(f.name.startswith("events.out") for f in sub.iterdir()):
            content = reader(sub).PluginTagToContent("hparams")
            info = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
            return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.session_start_info.hparams.items()}
    raise AssertionError(f"no hparams under {run}")


def texts(acc: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(tag)]


def assert_scalars_match(acc: EventAccumulator, steps: list[Event]) -> None:
    """Every metric of every step event is a scalar at that step, with that value (float32 in the file)."""
    keys = {k for ev in steps for k in ev.metrics}
    assert set(acc.Tags()["scalars"]) == keys
    for key in keys:
        want = [(ev.step, ev.metrics[key]) for ev in steps if key in ev.metrics]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-5, abs=1e-6), key
        assert all(math.isfinite(v) for _, v in got), key


def test_sft_run_lands_in_tensorboard(logdir):
    steps, record = events_of("step")
    h = api.sft("s", model="tiny", data=PAIRS, max_steps=6, lr=1e-3, progress=False, callbacks=[record],
                report_to="tensorboard", lora={"r": 4})  # fmt: skip
    run = only_run(logdir, "s")
    acc = reader(run)
    assert len(steps) == 6
    assert_scalars_match(acc, steps)
    assert {"train/loss", "eval/loss", "train/grad_norm"} <= set(acc.Tags()["scalars"])  # the live view's and TRL's
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(h.metrics["train/loss"], rel=1e-5)
    hp = hparams(run)
    assert hp["stage"] == "sft" and hp["max_steps"] == 6 and hp["lora.r"] == 4 and hp["report_to"] == "tensorboard"
    assert hp["lr"] == pytest.approx(1e-3) and hp["data"] == "<list of 20>"
    (step, table), *_ = texts(acc, "sft/samples/text_summary")
    assert step == 6 and "before / after SFT" in table and "| prompt | before | after |" in table


@pytest.fixture(scope="module")
def policy():
    return api.sft("base", model="tiny", data=PAIRS, max_steps=2, progress=False)


def share_of_a(prompts, responses):
    return [r.count("a") / max(len(r), 1) for r in responses]


def test_ppo_run_lands_in_tensorboard_with_samples_each_step(logdir, policy):
    from rlhf_magic.widgets.live import DEFAULT_PANELS

    steps, record = events_of("step")
    api.ppo("p", policy=policy, reward=share_of_a, prompts=PROMPTS, steps=3, batch_size=4, max_new_tokens=6,
            progress=False, callbacks=[record], report_to="tensorboard")  # fmt: skip
    run = only_run(logdir, "p")
    acc = reader(run)
    assert_scalars_match(acc, steps)
    plotted = {k for _, keys in DEFAULT_PANELS["ppo"] for k in keys}
    assert plotted <= set(acc.Tags()["scalars"])  # every metric the live view plots
    assert [e.step for e in acc.Scalars("ppo/objective/kl")] == [1, 2, 3]
    samples = texts(acc, "ppo/samples/text_summary")
    assert [s for s, _ in samples] == [1, 2, 3]
    assert all("| prompt | answer | score | KL |" in t and "List letters" in t for _, t in samples)
    hp = hparams(run)
    assert hp["stage"] == "ppo" and hp["steps"] == 3 and hp["policy"] == "<policy base>"
    assert hp["reward"] == "<function>" and hp["kl_coef"] == pytest.approx(0.05)


class FakeWandB:
    """accelerate's WandBTracker as seen from outside: start, store_init_configuration, log, log_table, finish."""

    name, requires_logging_directory, main_process_only = "wandb", False, False
    made: ClassVar[list[FakeWandB]] = []

    def __init__(self, project, **kwargs):
        self.project, self.kwargs, self.calls = project, kwargs, []
        FakeWandB.made.append(self)

    def __getattr__(self, method):
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda *args, **kwargs: self.calls.append((method, args, kwargs))


def test_tables_histograms_and_notes_go_to_a_tracker_that_has_them(monkeypatch):
    from accelerate import tracking as acc_tracking

    monkeypatch.setitem(acc_tracking.LOGGER_TYPE_TO_CLASS, "wandb", FakeWandB)
    monkeypatch.setattr(tracking, "installed", lambda name: True)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Histogram=lambda values: ("hist", values)))
    monkeypatch.setenv("WANDB_PROJECT", "proj")
    FakeWandB.made.clear()
    view = tracking.tracker_view("wandb", "reward", "rm")
    cfg = api._config(api.RewardConfig, None, {"report_to": "wandb", "margin": 0.5})
    view(Event("start", "reward", payload={"config": cfg}))
    view(Event("step", "reward", 5, metrics={"train/loss": 0.5, "train/accuracy": 1}))
    rows = [{"prompt": "p", "answer": "a", "reward": 1.5}, {"prompt": "q", "answer": "b"}]
    view(Event("samples", "reward", payload={"title": "best and worst", "rows": rows}))  # the end: no step number
    view(Event("histogram", "reward", payload={"title": "held-out rewards", "series": {"chosen": [1.0, math.nan]}}))
    view(Event("warning", "reward", payload="left out 2 flagged prompts"))
    view(Event("end", "reward", 5, payload={"reason": "done"}))
    view(Event("step", "reward", 6, metrics={"train/loss": 0.1}))  # after the end: nothing more is sent
    (fake,) = FakeWandB.made
    assert fake.project == "proj" and re.fullmatch(r"rm-\d{8}-\d{6}", fake.kwargs["name"])
    names = [c[0] for c in fake.calls]
    assert names == ["start", "store_init_configuration", "log", "log_table", "log", "log", "finish"]
    config = fake.calls[1][1][0]
    assert config["margin"] == 0.5 and config["stage"] == "reward" and config["lora.r"] == 16
    assert fake.calls[2][1:] == (({"train/loss": 0.5, "train/accuracy": 1.0},), {"step": 5})
    _, (key,), table = fake.calls[3]
    assert key == "reward/samples" and table["step"] == 5  # the latest step, never back to 0
    assert table["columns"] == ["prompt", "answer", "reward"] and table["data"] == [["p", "a", 1.5], ["q", "b", ""]]
    assert fake.calls[4][1] == ({"reward/held-out_rewards/chosen": ("hist", [1.0])},)  # NaN left out
    assert fake.calls[5][1] == ({"reward/warning": "left out 2 flagged prompts"},)


def test_an_extra_the_tracker_refuses_is_warned_about_once_and_the_metrics_go_on(monkeypatch):
    from accelerate import tracking as acc_tracking

    class Refusing(FakeWandB):
        def log_table(self, *args, **kwargs):
            raise TypeError("no tables here")

    monkeypatch.setitem(acc_tracking.LOGGER_TYPE_TO_CLASS, "wandb", Refusing)
    monkeypatch.setattr(tracking, "installed", lambda name: True)
    FakeWandB.made.clear()
    view = tracking.tracker_view("wandb", "ppo", "p")
    view(Event("start", "ppo", payload={"config": None}))
    samples = {"rows": [{"prompt": "p", "answer": "a"}]}
    with pytest.warns(UserWarning, match=r"wandb did not take the samples of 'p': TypeError\('no tables here'\)"):
        view(Event("samples", "ppo", 1, payload=samples))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once is enough
        view(Event("samples", "ppo", 2, payload=samples))
    view(Event("step", "ppo", 2, metrics={"ppo/objective/kl": 0.25}))
    (fake,) = FakeWandB.made
    assert fake.calls[-1][1:] == (({"ppo/objective/kl": 0.25},), {"step": 2})


def test_tensorboard_histograms_alarms_and_a_run_that_raised(logdir):
    first = tracking.tracker_view("tensorboard", "dpo", "d")
    first(Event("start", "dpo", payload={"config": None}))
    first(Event("step", "dpo", 1, metrics={"train/loss": 0.7}))  # then the stage raises: no 'end'
    second = tracking.tracker_view("tensorboard", "dpo", "d")
    second(Event("start", "dpo", payload={"config": None}))  # closes the run left open
    assert first.tracker is None and second.tracker is not None
    second(Event("step", "dpo", 2, metrics={"train/loss": 0.6}))
    hist = {"title": "implicit rewards (3 pairs, eval)", "series": {"chosen": [0.0, 1.0, 2.0]}}
    second(Event("histogram", "dpo", payload=hist))
    second(Event("alarm", "dpo", 2, payload={"message": "loss blew up; lower lr", "stopped": True}))
    second(Event("end", "dpo", 2, payload={"reason": "done"}))
    assert second.tracker is None and first.logging_dir != second.logging_dir
    acc = reader(second.logging_dir)
    (hist,) = acc.Histograms("dpo/implicit_rewards_eval/chosen")  # the count left out: runs on other data compare
    assert (hist.step, hist.histogram_value.num, hist.histogram_value.max) == (2, 3, 2.0)
    assert texts(acc, "dpo/alarm/text_summary") == [(2, "loss blew up; lower lr")]
    assert [e.value for e in reader(first.logging_dir).Scalars("train/loss")] == pytest.approx([0.7])


@pytest.mark.parametrize("stage", ["sft", "reward", "dpo", "ppo", "grpo"])
def test_a_tracker_that_is_not_installed_is_refused_before_anything_loads(stage, tmp_path, monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        getattr(api, stage)("x", report_to="wandb", output_dir="out", progress=False)
    msg = str(err.value)
    assert msg == "report_to = 'wandb' but wandb is not installed; pip install wandb (or set report_to = 'none')"
    assert list(tmp_path.iterdir()) == []  # no output folder, no runs/


def test_an_unknown_tracker_names_the_ones_accepted():
    with pytest.raises(ConfigError) as err:
        api.sft("x", model="tiny", data=PAIRS, report_to="tensorbord", progress=False)
    assert "report_to" in str(err.value) and "'tensorboard'" in str(err.value) and "\n" not in str(err.value)


def test_only_the_main_process_reports(monkeypatch):
    cfg = api._config(api.SFTConfig, None, {"report_to": "tensorboard"})
    views = api._views("sft", "s", False, [print], StopControl(), cfg)
    assert views[0] is print and isinstance(views[-1], tracking.TrackerView)
    monkeypatch.setenv("RANK", "1")
    assert api._views("sft", "s", False, [print], StopControl(), cfg) == [print]
    none = api._config(api.SFTConfig, None, {})
    assert none.report_to == "none" and api._views("sft", "s", False, [], StopControl(), none) == []


def test_the_readme_callback_example_runs(logdir, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### Experiment tracking and callbacks", 1)[1].split("\n### ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    assert '"smollm2-135m"' in code
    scope: dict = {}
    exec(code.replace('"smollm2-135m"', '"tiny"'), scope)  # the tiny model: the same events, in a second
    assert len(scope["losses"]) == 5 and all(math.isfinite(v) for v in scope["losses"])
    assert "sft ended at step 5 of 5: done" in capsys.readouterr().out
    assert len(reader(only_run(logdir, "sft")).Scalars("train/loss")) == 5
