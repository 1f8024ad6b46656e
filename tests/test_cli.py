"""`rlhf-magic STAGE CONFIG`: the same functions as the magics, every stage from files, also under accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_magic import api
from rlhf_magic.cli import main, read_config_file
from rlhf_magic.errors import ConfigError

BIN = Path(sys.executable).parent


def _write(tmp_path: Path, pairs: list[dict], extra: str = "") -> Path:
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = tmp_path / "sft.toml"
    cfg.write_text(
        f'model = "tiny"\ndata = "{data}"\nepochs = 2\nbatch_size = 4\nlr = 0.003\neval_fraction = 0\n'
        f'output_dir = "{tmp_path / "out"}"\n{extra}[lora]\nr = 4\n'
    )
    return cfg


def test_toml_and_cell_style_files_give_the_same_settings(tmp_path):
    (tmp_path / "a.toml").write_text("epochs = 2\n[lora]\nr = 8\n")
    (tmp_path / "a.txt").write_text("epochs = 2\nlora.r = 8\n")
    assert read_config_file(tmp_path / "a.toml") == read_config_file(tmp_path / "a.txt") == {"epochs": 2, "lora.r": 8}


def test_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("epoch = 2\n")
    assert main(["sft", str(tmp_path / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert "unknown setting 'epoch' (did you mean 'epochs'?)" in err and len(err.strip().splitlines()) == 1


def test_cli_trains_and_saves_a_loadable_model(tmp_path, pairs):
    cfg = _write(tmp_path, pairs)
    assert main(["sft", str(cfg), "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_processes"] == 1 and summary["metrics"]["steps"] == 20
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_train_data_parallel(tmp_path, pairs):
    """Two processes split each epoch (half the steps) and end with identical weights.

    accelerate 1.x sends `--cpu` to its single-process launcher, so two CPU processes are started the way its
    multi-process launcher does it, with ACCELERATE_USE_CPU set (gloo backend, DistributedType.MULTI_CPU).
    """
    cfg = _write(tmp_path, pairs)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "rlhf_magic.cli",
        "sft",
        str(cfg),
        "--summary",
        str(tmp_path / "s.json"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["metrics"]["steps"] == 10  # 40 examples, batch 4, 2 epochs, split over 2 processes
    a, b = summary["param_checksums"]
    assert a == pytest.approx(b, rel=1e-12) and a > 0
    loaded = api.load_policy(str(tmp_path / "out"))
    assert len(loaded.generate(["What is 2 plus 2?"], max_new_tokens=5)) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ from files
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A saved tiny policy, a saved reward model on it (untrained: the files are what matters) and prompts."""
    from rlhf_magic.engine.reward_model import RewardHandle, make_head

    root = tmp_path_factory.mktemp("runs")
    policy = api.load_policy("tiny")
    policy.save(root / "sft")
    head = make_head(policy.lm.model.config.hidden_size, policy.runtime.device)
    RewardHandle("judge", policy.lm, head, runtime=policy.runtime).save(root / "rm")
    (root / "prompts.txt").write_text("".join(f"Count to {i}.\n" for i in range(8)))
    return root


PPO_FAST = "steps = 2\nbatch_size = 2\nmini_batch_size = 2\nnum_ppo_epochs = 1\nmax_new_tokens = 6\n"


def test_cli_runs_ppo_from_a_saved_policy_a_saved_reward_model_and_a_prompts_file(saved, tmp_path, capsys):
    cfg = tmp_path / "ppo.toml"
    cfg.write_text(
        f'policy = "{saved / "sft"}"\nreward = "{saved / "rm"}"\nprompts = "{saved / "prompts.txt"}"\n{PPO_FAST}'
        f'output_dir = "{tmp_path / "out"}"\n'
    )
    assert main(["ppo", str(cfg), "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metrics"]["steps"] == 2 and summary["num_processes"] == 1
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0]) == summary["metrics"]  # one JSON line (and the text view)
    assert len(api.load_policy(str(tmp_path / "out")).generate(["Count to 3."], max_new_tokens=4)) == 1


def test_cli_trains_a_reward_model_from_a_saved_policy_folder(saved, tmp_path):
    from rlhf_magic.engine.reward_model import load_reward
    from rlhf_magic.engine.runtime import Runtime

    records = [
        {"prompt": f"Say {i}.", "responses": ["q" * (i % 3 + 1), "ab", "z"], "ranking": [0, 1, 2]} for i in range(8)
    ]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = tmp_path / "rm.txt"  # the cell-body form: `key = value` lines
    cfg.write_text(
        f'model = "{saved / "sft"}"\ndata = "{tmp_path / "prefs.jsonl"}"\nmax_steps = 2\nbatch_size = 2\n'
        f'normalize = False\noutput_dir = "{tmp_path / "rm"}"\n'
    )
    assert main(["reward", str(cfg), "--summary", str(tmp_path / "s.json")]) == 0
    rm = load_reward(tmp_path / "rm", Runtime("cpu"))
    assert (
        rm.parents[0] == str(saved / "sft") and json.loads((tmp_path / "s.json").read_text())["metrics"]["steps"] == 2
    )


RULES = "def score(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"


def test_reward_module_function_is_imported_from_the_current_folder(saved, tmp_path, monkeypatch):
    """`reward = "module:function"` from the Python API; the `rlhf-magic` script's sys.path lacks the current
    folder, which is searched too."""
    name = "rules_cli_a"
    (tmp_path / f"{name}.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        h = api.ppo(
            "p",
            policy=str(saved / "sft"),
            reward=f"{name}:score",
            prompts=str(saved / "prompts.txt"),
            steps=1,
            batch_size=2,
            max_new_tokens=6,
            progress=False,
        )
    finally:
        sys.modules.pop(name, None)
    assert h.parents == (str(saved / "sft"), "score")
    assert h.metrics["ppo/objective/scores"][0] > 0  # len(answer) / 10 of non-empty answers


def test_magic_takes_saved_folders_as_strings(ip, saved):
    res = ip.run_cell(
        f'%%ppo tuned\npolicy = "{saved / "sft"}"\nreward = "{saved / "rm"}"\nprompts = "{saved / "prompts.txt"}"\n'
        f"{PPO_FAST}"
    )
    assert res.success, res.error_in_exec
    assert ip.user_ns["tuned"].parents == (str(saved / "sft"), "judge")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"reward": "no_such_module_xyz:score"}, "cannot import module 'no_such_module_xyz'"),
        ({"reward": "json:no_such_fn"}, "module 'json' has no 'no_such_fn'"),
        ({"reward": "os:sep"}, "sep is a str, not a function"),
        ({"reward": "rules_cli_boom:score"}, "importing module 'rules_cli_boom' raised ValueError: boom"),
        ({"reward": "judge"}, "reward = 'judge': no such folder"),
        ({"reward": "runs/rm"}, "reward = 'runs/rm': no such folder"),
        ({"policy": "runs/sft"}, "policy = 'runs/sft': no such folder"),
        ({"policy": "./sft"}, "write it first (output_dir = './sft' in the SFT config"),
    ],
)
def test_strings_that_name_nothing_get_one_line_errors(tmp_path, monkeypatch, settings, message):
    (tmp_path / "rules_cli_boom.py").write_text("raise ValueError('boom')\n")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the current folder may be searched: put sys.path back after
    kw = {"policy": "tiny", "reward": lambda p, r: [0.0] * len(r), "prompts": ["a"], "progress": False, **settings}
    try:
        with pytest.raises(ConfigError) as e:
            api.ppo("x", **kw)
    finally:
        sys.modules.pop("rules_cli_boom", None)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_policy_folder_from_the_cli_names_the_fix(tmp_path, capsys):
    cfg = tmp_path / "ppo.toml"
    cfg.write_text(
        f'policy = "{tmp_path / "runs" / "sft"}"\nreward = "rules:score"\nprompts = "p.txt"\noutput_dir = "o"\n'
    )
    assert main(["ppo", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no such folder" in err and "output_dir" in err and len(err.splitlines()) == 1


def test_reward_model_folder_that_is_missing_fails_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"model = .*: no such folder"):
        api.reward("rm", model=str(tmp_path / "runs" / "sft"), data=[{"prompt": "a", "chosen": "b", "rejected": "c"}])
