"""Validation in one place: every range and rule of the configs, checked the same way on every entry path (cell,
Python API, CLI, panels), and max_new_tokens against the model's context wherever sampling starts."""

from __future__ import annotations

import dataclasses
import typing
from types import SimpleNamespace

import pytest

from rlhf_magic import api
from rlhf_magic.cli import build_parser, main
from rlhf_magic.config import STAGES, LoraConfig, PPOConfig, RankConfig, RewardConfig, SFTConfig
from rlhf_magic.engine import generation
from rlhf_magic.errors import ConfigError
from rlhf_magic.parsing import parse_cell
from rlhf_magic.session import Session
from rlhf_magic.validation import build_config, describe, with_options

MINI = "use at most batch_size (4), or None for the whole batch"
# (stage, settings in the order written, the whole one-line error)
BAD = [
    ("sft", {"lr": -1}, "lr = -1: use a number > 0, or None"),
    ("sft", {"batch_size": 0}, "batch_size = 0: use a positive integer"),
    ("sft", {"eval_fraction": 1.5}, "eval_fraction = 1.5: use a number from 0 up to (not including) 1"),
    ("sft", {"lora.r": 0}, "lora.r = 0: use a positive integer"),
    ("sft", {"max_steps": 0}, "max_steps = 0: use a positive integer, or None"),
    ("sft", {"max_steps": -1}, "max_steps = -1: use a positive integer, or None"),
    ("sft", {"epochs": 0}, "epochs = 0: use a number > 0"),
    ("sft", {"epochs": -1}, "epochs = -1: use a number > 0"),
    ("sft", {"grad_accum": 0}, "grad_accum = 0: use a positive integer"),
    ("sft", {"max_length": 1}, "max_length = 1: use an integer >= 2 (room for a prompt token and an answer token)"),
    ("sft", {"lora.dropout": 1.0}, "lora.dropout = 1.0: use a number from 0 up to (not including) 1"),
    ("sft", {"lora.alpha": 0}, "lora.alpha = 0: use a number > 0"),
    ("sft", {"lora.layers": 0}, "lora.layers = 0: use a positive integer, or None"),
    ("sft", {"epochs": 2, "lr": 1e-4, "batch_size": -3}, "batch_size = -3: use a positive integer"),
    ("reward", {"lr": -1}, "lr = -1: use a number > 0, or None"),
    ("reward", {"eval_fraction": -0.1}, "eval_fraction = -0.1: use a number from 0 up to (not including) 1"),
    ("reward", {"margin": float("inf")}, "margin = inf: use a finite number"),
    ("ppo", {"lr": -1}, "lr = -1: use a number > 0, or None"),
    ("ppo", {"batch_size": 4, "mini_batch_size": 16}, f"mini_batch_size = 16: {MINI}"),
    ("ppo", {"mini_batch_size": 16, "batch_size": 4}, f"mini_batch_size = 16: {MINI}"),
    ("ppo", {"steps": 0}, "steps = 0: use a positive integer"),
    ("ppo", {"max_new_tokens": 0}, "max_new_tokens = 0: use a positive integer"),
    ("ppo", {"micro_batch_size": 0}, "micro_batch_size = 0: use a positive integer, or None"),
    ("ppo", {"num_ppo_epochs": 0}, "num_ppo_epochs = 0: use a positive integer"),
    ("ppo", {"temperature": 0}, "temperature = 0: PPO samples, so use a number > 0 (e.g. 0.7)"),
    ("ppo", {"kl_coef": -0.1}, "kl_coef = -0.1: use a number >= 0"),
    ("ppo", {"target_kl": 0}, "target_kl = 0: use a number > 0, or None"),
    ("ppo", {"target_kl": 6, "kl_coef": 0}, "kl_coef = 0: target_kl = 6.0 adapts kl_coef by scaling it, so use a "
                                            "number > 0"),
    ("ppo", {"gamma": 0}, "gamma = 0: use a number in (0, 1]"),
    ("ppo", {"lam": 1.5}, "lam = 1.5: use a number from 0 to 1"),
    ("ppo", {"cliprange": 0}, "cliprange = 0: use a number > 0"),
    ("ppo", {"vf_coef": -1}, "vf_coef = -1: use a number >= 0"),
    ("ppo", {"max_grad_norm": 0}, "max_grad_norm = 0: use a number > 0"),
]  # fmt: skip
IDS = [f"{stage}-" + "-".join(f"{k}={v}" for k, v in settings.items()) for stage, settings, _ in BAD]


def _body(settings: dict) -> str:
    return "\n".join(
        f"{key} = {value!r}" if value != float("inf") else f"{key} = 1e999" for key, value in settings.items()
    )


def _line(settings: dict, message: str) -> int:
    return list(settings).index(message.split(" = ")[0]) + 1


def _api_settings(settings: dict) -> dict:
    """`lora.r = 0` in a cell is `lora={"r": 0}` in Python."""
    out = {k: v for k, v in settings.items() if not k.startswith("lora.")}
    lora = {k[5:]: v for k, v in settings.items() if k.startswith("lora.")}
    return {**out, "lora": lora} if lora else out


@pytest.mark.parametrize(("stage", "settings", "message"), BAD, ids=IDS)
def test_a_bad_value_in_a_cell_is_one_line_naming_the_setting_the_value_and_the_range(stage, settings, message):
    with pytest.raises(ConfigError) as e:
        parse_cell(stage, "bad", _body(settings), {})
    assert str(e.value) == f"line {_line(settings, message)}: {message}"


@pytest.fixture
def no_training(monkeypatch):
    """Records every attempt to load a model or train: a refused config must reach neither."""
    calls = []

    def record(what):
        return lambda *a, **k: calls.append(what)

    for module, fn in (
        ("rlhf_magic.engine.runtime", "resolve_runtime"),
        ("rlhf_magic.engine.sft", "train_sft"),
        ("rlhf_magic.engine.reward", "train_reward"),
        ("rlhf_magic.engine.ppo", "train_ppo"),
    ):
        monkeypatch.setattr(f"{module}.{fn}", record(fn))
    return calls


@pytest.mark.parametrize(("stage", "settings", "message"), BAD, ids=IDS)
def test_the_python_api_refuses_the_same_values_with_the_same_line_and_trains_nothing(
    no_training, stage, settings, message
):
    session = Session()
    needs = {"sft": {"model": "tiny", "data": [{"prompt": "a", "response": "b"}]}, "reward": {"data": [1]}}
    needs["ppo"] = {"reward": lambda p, r: [0.0] * len(r), "prompts": ["a"]}
    with pytest.raises(ConfigError) as e:
        getattr(api, stage)("bad", session=session, progress=False, **needs[stage], **_api_settings(settings))
    assert str(e.value) == message
    assert no_training == [] and list(session) == []


def test_a_config_made_by_hand_is_checked_too(no_training):
    with pytest.raises(ConfigError, match=r"^lr = -1\.0: use a number > 0, or None$"):
        api.sft("bad", config=SFTConfig(model="tiny", data=[{"prompt": "a", "response": "b"}], lr=-1.0))
    with pytest.raises(ConfigError, match=r"^lora\.r = 0: use a positive integer$"):
        api.sft("bad", model="tiny", data=[{"prompt": "a", "response": "b"}], lora=LoraConfig(r=0))
    with pytest.raises(ConfigError, match=r"^mini_batch_size = 16: use at most batch_size \(8\), or None for the"):
        api.ppo("bad", config=PPOConfig(mini_batch_size=16), reward=lambda p, r: [0.0], prompts=["a"])
    with pytest.raises(ConfigError, match=r"^lr = 'fast' is not valid; expected float or None$"):
        api.reward("bad", config=RewardConfig(lr="fast"))  # type: ignore[arg-type]
    assert no_training == []


def test_the_first_bad_setting_in_the_cell_is_named_and_an_explicit_lora_key_beats_the_dict():
    with pytest.raises(ConfigError, match=r"^line 2: epochs = 0: "):
        parse_cell("sft", "bad", "lr = 1e-4\nepochs = 0\nbatch_size = 0", {})
    cfg = build_config(SFTConfig, {"lora.r": 4, "lora": {"r": 0, "alpha": 8}})
    assert cfg.lora == LoraConfig(r=4, alpha=8)
    with pytest.raises(ConfigError, match=r"^lora\.alpha = -8: use a number > 0$"):
        build_config(SFTConfig, {"lora": {"alpha": -8}})
    with pytest.raises(ConfigError, match=r"^line 1: unknown setting 'lora.rank'"):
        build_config(SFTConfig, {"lora": {"rank": 8}}, {"lora": "line 1"})


def test_good_defaults_and_edges_of_every_range_build():
    for cls in (*STAGES.values(), LoraConfig, RankConfig):
        assert build_config(cls, {}) == cls()
    edges = {"eval_fraction": 0, "max_steps": 1, "epochs": 0.5, "lr": 1e-9, "lora.dropout": 0.99, "lora.layers": 1}
    cfg = build_config(SFTConfig, edges)
    assert (cfg.eval_fraction, cfg.max_steps, cfg.lora.layers) == (0.0, 1, 1)
    ppo = build_config(PPOConfig, {"batch_size": 4, "mini_batch_size": 4, "gamma": 1, "lam": 0, "kl_coef": 0})
    assert ppo.mini_batch_size == ppo.batch_size == 4
    assert with_options(PPOConfig, ppo, {"target_kl": 3.0, "kl_coef": 0.1}).target_kl == 3.0


def test_every_number_a_stage_takes_has_a_range():
    """A new numeric setting without a check would let a bad value reach torch: name it here or give it one."""
    unchecked = {"seed"}
    for cls in (*STAGES.values(), LoraConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            numeric = {int, float} & {hints[f.name], *typing.get_args(hints[f.name])}
            if numeric and f.name not in unchecked:
                assert "check" in f.metadata, f"{cls.__name__}.{f.name}"


def test_help_shows_the_accepted_range_next_to_the_default(ip):
    text = describe(SFTConfig)
    assert "  batch_size           examples per optimizer step (before gradient accumulation) (default 8, >= 1)" in text
    assert "(default 0.1, in [0, 1))" in text and "(default None, > 0)" in text and "(default 16, >= 1)" in text
    assert "(default 'smollm2-135m')" in text  # no range where none applies
    assert describe(SFTConfig) in ip.find_cell_magic("sft").__doc__  # what %%sft? shows
    cli_help = build_parser()._subparsers._group_actions[0].choices["ppo"].format_help()
    assert "(default 8, >= 1)" in cli_help and "(default 0.95, in [0, 1])" in cli_help


def test_cell_magic_refuses_with_one_usage_error_line(ip, capsys):
    ip.user_ns.pop("bad", None)
    capsys.readouterr()
    res = ip.run_cell("%%ppo bad\nbatch_size = 4\nmini_batch_size = 16\n")
    err = capsys.readouterr().err
    assert not res.success and "bad" not in ip.user_ns and list(ip.user_ns["rlhf"]) == []
    assert err.strip() == f"UsageError: line 2: mini_batch_size = 16: {MINI}"


@pytest.mark.parametrize(
    ("toml", "extra", "message"),
    [
        ("lr = -1\n", [], "lr = -1: use a number > 0, or None"),
        ("[lora]\nr = 0\n", [], "lora.r = 0: use a positive integer"),
        ("max_steps = 5\n", ["--set", "max_steps=0"], "max_steps = 0: use a positive integer, or None"),
    ],
)
def test_the_cli_refuses_a_config_file_with_the_same_line(tmp_path, capsys, no_training, toml, extra, message):
    path = tmp_path / "sft.toml"
    path.write_text(f'model = "tiny"\ndata = "pairs.jsonl"\noutput_dir = "out"\n{toml}')
    assert main(["sft", str(path), *extra]) == 2
    assert capsys.readouterr().err == f"rlhf-magic: error: {message}\n"
    assert no_training == []


# ------------------------------------------------------------------------------------ max_new_tokens and context
PROMPTS = ["What is 2 plus 2?", "Say something long about the sea, please."]


@pytest.fixture(scope="module")
def tiny():
    return api.load_policy("tiny", "tiny")


def _room(handle) -> tuple[int, int]:
    """(the tiny model's context, tokens of the longest chat-formatted prompt)."""
    rows = generation.encode_prompts(handle.lm, PROMPTS)
    return handle.lm.model.config.max_position_embeddings, max(map(len, rows))


def test_max_new_tokens_must_fit_the_context_after_the_longest_prompt(tiny):
    context, longest = _room(tiny)
    assert context == 2048 and 20 < longest < 100
    rows = generation.encode_prompts(tiny.lm, PROMPTS)
    generation.check_new_tokens(tiny.lm, rows, context - longest)  # exactly full: allowed
    expected = (
        f"max_new_tokens = {context - longest + 1}: the model's context is {context} tokens and the longest prompt "
        f"has {longest}, so use at most {context - longest}"
    )
    with pytest.raises(ConfigError) as e:
        generation.check_new_tokens(tiny.lm, rows, context - longest + 1)
    assert str(e.value) == expected
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ConfigError, match=rf"^max_new_tokens = {bad!r}: use a positive integer$"):
            tiny.generate(PROMPTS, max_new_tokens=bad)


def test_every_sampling_entry_refuses_a_huge_max_new_tokens_before_allocating(tiny, tmp_path):
    from rlhf_magic.widgets.ranking import RankingPanel

    context, longest = _room(tiny)
    message = (
        f"max_new_tokens = 1000000000: the model's context is {context} tokens and the longest prompt has "
        f"{longest}, so use at most {context - longest}"
    )
    attempts = {
        "generate": lambda: tiny.generate(PROMPTS, max_new_tokens=10**9),
        "compare": lambda: api.compare(tiny, tiny, PROMPTS, max_new_tokens=10**9),
        "rank": lambda: RankingPanel(PROMPTS, tiny, max_new_tokens=10**9, file=str(tmp_path / "p.jsonl")),
    }
    for what, attempt in attempts.items():
        with pytest.raises(ConfigError) as e:
            attempt()
        assert str(e.value) == message, what
    assert not (tmp_path / "p.jsonl").exists()


def test_ppo_refuses_a_huge_max_new_tokens_and_publishes_nothing(pairs):
    session = Session()
    sft = api.sft("sft", model="tiny", data=pairs, max_steps=1, session=session, progress=False)
    with pytest.raises(ConfigError, match=r"^max_new_tokens = 1000000000: the model's context is 2048 tokens and"):
        api.ppo(
            "p", policy=sft, reward=lambda p, r: [0.0] * len(r), prompts=PROMPTS, steps=1, batch_size=2,
            max_new_tokens=10**9, session=session, progress=False,
        )  # fmt: skip
    assert [h.name for h in session] == ["sft"]


def test_the_context_comes_from_the_config_else_the_tokenizer():
    def lm(config, limit):
        return SimpleNamespace(model=SimpleNamespace(config=config), tokenizer=SimpleNamespace(model_max_length=limit))

    assert generation.context_length(lm(SimpleNamespace(max_position_embeddings=8192), 512)) == 8192
    assert generation.context_length(lm(SimpleNamespace(n_positions=1024), int(1e30))) == 1024
    assert generation.context_length(lm(SimpleNamespace(), 512)) == 512
    assert generation.context_length(lm(SimpleNamespace(), int(1e30))) is None  # transformers' "unknown"
    with pytest.raises(ConfigError, match=r"^max_new_tokens = 8: the model's context is 512 tokens and the longest "):
        generation.check_new_tokens(lm(SimpleNamespace(), 512), [[1] * 510], 8)
    with pytest.raises(ConfigError, match=r"has 600, so shorten the prompts$"):
        generation.check_new_tokens(lm(SimpleNamespace(), 512), [[1] * 600], 8)
