"""`rlhf-magic sft CONFIG`: the same function as the magic, also data-parallel under accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_magic.cli import main, read_config_file

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
    from rlhf_magic import api

    loaded = api.load_policy(str(tmp_path / "out"))
    assert len(loaded.generate(["What is 2 plus 2?"], max_new_tokens=5)) == 1
