"""Launching the CLI in two CPU processes (gloo) for the distributed tests, and the configs those runs share.

Each launched process runs `tests/launched.py`. The stages chain through files: SFT saves runs/sft, the reward
model trains from it and saves runs/rm, PPO loads both. conftest.py holds the runs as session fixtures, so the DDP
runs that tests/test_distributed.py checks are also what tests/test_sharded.py compares FSDP2 with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
LAUNCHED = Path(__file__).with_name("launched.py")  # what each launched process runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHED: dict[tuple[str, str, str, bool], dict[str, Any]] = {}  # each run once a session, whoever asks first


def launch(root: Path, stage: str, config: str, *, fsdp2: bool = False) -> dict[str, Any]:
    """`rlhf-magic STAGE CONFIG` in two CPU processes (gloo); returns the summary, stdout and each rank's log.
    `fsdp2`: launched with examples/accelerate/fsdp2.yaml, and accelerate prepares the model with FSDP2 (see
    `tests/launched.py: _as_fsdp2`). The same launch asked for again (a test and a fixture) runs once."""
    key = (str(root), stage, config, fsdp2)
    if key not in _LAUNCHED:
        _LAUNCHED[key] = _launch(root, stage, config, fsdp2=fsdp2)
    return _LAUNCHED[key]


def _launch(root: Path, stage: str, config: str, *, fsdp2: bool) -> dict[str, Any]:
    (root / f"{stage}.toml").write_text(config)
    spies = root / f"spy-{stage}"
    spies.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["RLHF_MAGIC_TEST_SPIES"] = str(spies)
    env["RLHF_MAGIC_TEST_FSDP2"] = "1" if fsdp2 else ""
    how = ["--config_file", str(ROOT / "examples" / "accelerate" / "fsdp2.yaml")] if fsdp2 else ["--multi_gpu"]
    cmd = [str(BIN / "accelerate"), "launch", *how, "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd += [str(LAUNCHED), stage, str(root / f"{stage}.toml"), "--summary", str(root / f"{stage}.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    (root / f"{stage}.stderr").write_text(proc.stderr)  # the whole of it, for a failure's first error
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [json.loads((spies / f"rank{r}.json").read_text()) for r in (0, 1)]
    summary = json.loads((root / f"{stage}.json").read_text())
    return {"summary": summary, "stdout": proc.stdout, "logs": logs}


OUT = {"sft": "sft", "reward": "rm", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}


def check_common(run: dict[str, Any], out: Path) -> None:
    """Identical weights, metrics identical on both ranks and printed once, one save by rank 0."""
    a, b = run["summary"]["param_checksums"]
    assert run["summary"]["num_processes"] == 2 and a == pytest.approx(b, rel=1e-12) and a > 0
    assert run["logs"][0]["history"] == run["logs"][1]["history"]  # reduced: the same on every process
    printed = [line for line in run["stdout"].splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0]) == run["summary"]["metrics"]
    assert run["logs"][0]["saved"] == [str(out.resolve())] and run["logs"][1]["saved"] == []


CONFIGS = {  # the stages chain through files: runs/sft, then runs/rm from it, then PPO and GRPO on both, DPO on sft
    "sft": 'model = "tiny"\ndata = "pairs.jsonl"\nepochs = 2\nbatch_size = 4\nlr = 0.003\neval_fraction = 0.2\n'
    'output_dir = "sft"\n[lora]\nr = 4\n',
    "reward": 'model = "sft"\ndata = "prefs.jsonl"\nbatch_size = 4\nlr = 0.003\neval_fraction = 0.2\n'
    'normalize = false\noutput_dir = "rm"\n[lora]\nr = 4\n',
    "ppo": 'policy = "sft"\nreward = "rm"\nprompts = "prompts.txt"\nsteps = 2\nbatch_size = 2\nmini_batch_size = 2\n'
    'num_ppo_epochs = 1\nmax_new_tokens = 8\nlr = 0.001\noutput_dir = "ppo"\n[lora]\nr = 4\n',
    "dpo": 'policy = "sft"\ndata = "prefs.jsonl"\nbatch_size = 4\nlr = 0.003\neval_fraction = 0.2\noutput_dir = "dpo"\n'
    "[lora]\nr = 4\n",
    "grpo": 'policy = "sft"\nreward = "rm"\nprompts = "prompts.txt"\nsteps = 2\nbatch_size = 2\nnum_generations = 3\n'
    'max_new_tokens = 6\nlr = 0.001\noutput_dir = "grpo"\n[lora]\nr = 4\n',
}


def write_data(root: Path) -> None:
    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}." + "!" * (i % 5)} for i in range(20)]
    (root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    answers = [["q" * (i % 4 + 1), "ab" * (i % 3 + 1), "z"] for i in range(20)]
    records = [{"prompt": f"Say something, {i}.", "responses": a, "ranking": [0, 1, 2]} for i, a in enumerate(answers)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "prompts.txt").write_text("".join(f"Tell me about number {i}.\n" for i in range(8)))
