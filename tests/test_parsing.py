"""The cell-body parser and the config schema: ast only, typed, near-miss hints."""

from __future__ import annotations

import pytest

from rlhf_magic.config import CompareConfig, LoraConfig, PPOConfig, RankConfig, SFTConfig
from rlhf_magic.errors import ConfigError
from rlhf_magic.parsing import parse_body, parse_cell, parse_line_args, parse_name
from rlhf_magic.validation import build_config, describe, with_options


def test_literals_names_attributes_and_comments():
    ns = {"my_pairs": [{"prompt": "a", "response": "b"}], "obj": type("O", (), {"x": 5})()}
    body = """
# a comment
epochs = 2
lr = 1e-4
lora.r = 8
data = my_pairs
max_steps = obj.x
lora.target_modules = ["q_proj", "v_proj"]
"""
    values, where = parse_body(body, ns)
    assert values == {
        "epochs": 2,
        "lr": 1e-4,
        "lora.r": 8,
        "data": ns["my_pairs"],
        "max_steps": 5,
        "lora.target_modules": ["q_proj", "v_proj"],
    }
    assert where["lora.r"] == "line 5"
    name, cfg = parse_cell("sft", "s1", body, ns)
    assert name == "s1" and isinstance(cfg, SFTConfig)
    assert cfg.epochs == 2.0 and cfg.lora == LoraConfig(r=8, target_modules=("q_proj", "v_proj"))
    assert cfg.data is ns["my_pairs"]


def test_body_is_never_executed():
    with pytest.raises(ConfigError, match="not a literal or a notebook variable"):
        parse_body("data = __import__('os').system('echo hacked')", {})
    with pytest.raises(ConfigError, match="only `key = value`"):
        parse_body("print('x')", {})


def test_lora_false_means_full_finetuning_and_true_means_defaults():
    assert build_config(SFTConfig, {"lora": False}).lora is None
    assert build_config(SFTConfig, {"lora": True}).lora == LoraConfig()
    assert build_config(SFTConfig, {"lora": {"r": 4}}).lora == LoraConfig(r=4)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("epoch = 2", "unknown setting 'epoch' (did you mean 'epochs'?)"),
        ("lora.rank = 2", "unknown setting 'lora.rank'"),
        ("epochs = 'two'", "epochs = 'two' is not valid; expected float"),
        ("max_steps = 2.5", "max_steps = 2.5 is not valid; expected int or None"),
        ("lora.r = True", "lora.r = True is not valid; expected int"),
        ("device = 'tpu'", "expected 'cuda' or 'mps' or 'cpu' or None"),
        ("epochs = (", "line 1: cannot read this setting"),
        ("\n\nlr = 1\nlr = 2", "line 4: 'lr' is set twice (first on line 3)"),
        ("data = missing_var", "no notebook variable named 'missing_var'"),
    ],
)
def test_errors_are_one_line_and_name_the_problem(body, message):
    with pytest.raises(ConfigError) as e:
        parse_cell("sft", "s", body, {"missing_vat": 1})
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_error_names_the_line_number():
    with pytest.raises(ConfigError, match=r"^line 3: unknown setting 'bach_size' \(did you mean 'batch_size'\?\)"):
        parse_cell("sft", "s", "epochs = 1\n\nbach_size = 3", {})


@pytest.mark.parametrize("line", ["", "1abc", "rlhf", "a b"])
def test_result_name_must_be_an_identifier(line):
    with pytest.raises(ConfigError):
        parse_name(line, "sft")


def test_line_args_for_line_magics():
    pos, opts = parse_line_args('prefs policy=sft k=4 file="p.jsonl" ties=True', {"sft": "HANDLE"}, "rank")
    assert pos == ["prefs"] and opts == {"policy": "HANDLE", "k": 4, "file": "p.jsonl", "ties": True}


def test_help_comes_from_the_dataclass():
    text = describe(PPOConfig)
    assert "kl_coef" in text and "weight of the per-token KL penalty" in text and "lora.r" in text


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"k": 1}, "k = 1: the number of answers per prompt must be an integer from 2 to 9"),
        ({"k": True}, "k = True is not valid; expected int or None"),
        ({"top_p": 0.0}, "top_p = 0.0: use a number in (0, 1]"),
        ({"kk": 3}, "unknown setting 'kk' (did you mean 'k'?); settings are: file, k, labeler, "),
    ],
)
def test_panel_configs_check_types_and_ranges_in_build_config(values, message):
    with pytest.raises(ConfigError) as e:
        build_config(RankConfig, values, {key: "%rank" for key in values})
    assert str(e.value).startswith(f"%rank: {message}")
    assert "\n" not in str(e.value)


def test_with_options_puts_options_over_a_config_and_checks_both():
    base = build_config(CompareConfig, {"n": 3, "temperature": 1})
    assert base.temperature == 1.0 and isinstance(base.temperature, float)
    cfg = with_options(CompareConfig, base, {"blind": True}, "%compare")
    assert (cfg.n, cfg.blind, cfg.seed) == (3, True, 0)
    with pytest.raises(ConfigError, match=r"^%compare: blind = 'yes' is not valid; expected bool$"):
        with_options(CompareConfig, base, {"blind": "yes"}, "%compare")
    with pytest.raises(ConfigError, match=r"^config must be a CompareConfig, not RankConfig"):
        with_options(CompareConfig, RankConfig(), {})
    with pytest.raises(ConfigError, match=r"^n = 0: the number of prompts"):  # no prefix: not one of the options
        with_options(CompareConfig, CompareConfig(n=0), {}, "%compare")
