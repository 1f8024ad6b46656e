"""The CLI's progress: a tqdm bar in a terminal, plain step lines otherwise, rank 0 only, and a one-line summary."""

from __future__ import annotations

import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from rlhf_magic.cli import BarView, main, progress_view, summary_line
from rlhf_magic.events import Emitter
from rlhf_magic.widgets.live import TextView

BIN = Path(sys.executable).parent


class Terminal(io.StringIO):
    """What the CLI writes to, standing for a terminal."""

    def isatty(self) -> bool:
        return True


def _config(tmp_path: Path, pairs: list[dict], steps: int = 3) -> Path:
    from test_cli import _write  # the same tiny SFT config, stopped after `steps` steps

    return _write(tmp_path, pairs, f"max_steps = {steps}\n")


def _run(tmp_path: Path, pairs: list[dict], stream: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["sft", str(_config(tmp_path, pairs)), "--name", "demo"]) == 0
    monkeypatch.undo()
    return stream.getvalue()


def _check_summary(out: str, tmp_path: Path) -> None:
    lines = out.rstrip("\n").splitlines()
    metrics = json.loads(lines[-2])
    assert metrics["steps"] == 3
    last = lines[-1]
    assert last.startswith("rlhf-magic: sft 'demo' done: 3 steps in ") and " s; " in last
    assert f"train/loss {metrics['train/loss']:.4g}" in last
    assert last.endswith(f"saved to {(tmp_path / 'out').resolve()}")


def test_a_terminal_gets_a_progress_bar_and_a_summary_line(tmp_path, pairs, monkeypatch):
    out = _run(tmp_path, pairs, Terminal(), monkeypatch)
    assert "sft demo:   0%|" in out and "| 0/3 [" in out  # tqdm's bar, drawn on the stream the CLI prints to
    assert "sft demo: 100%|" in out and "| 3/3 [" in out and "train/loss=" in out
    assert "\r" in out and "[sft demo] step " not in out  # redrawn in place: no step lines
    assert "[sft demo] before / after SFT:" in out  # other events are printed above the bar
    _check_summary(out, tmp_path)


def test_output_that_is_not_a_terminal_gets_plain_step_lines(tmp_path, pairs, monkeypatch):
    out = _run(tmp_path, pairs, io.StringIO(), monkeypatch)
    assert "[sft demo] step 1/3 · " in out and "[sft demo] step 3/3 · " in out
    assert "\r" not in out and "%|" not in out
    _check_summary(out, tmp_path)


def test_only_the_main_process_shows_progress(monkeypatch):
    monkeypatch.setenv("RANK", "1")  # what accelerate launch (torchrun) sets on the second process
    assert progress_view("sft", "sft demo", Terminal()) is None
    assert progress_view("sft", "sft demo", io.StringIO()) is None
    monkeypatch.setenv("RANK", "0")
    assert isinstance(progress_view("sft", "sft demo", Terminal()), BarView)
    assert isinstance(progress_view("sft", "sft demo", io.StringIO()), TextView)


def test_the_bar_follows_every_kind_of_event():
    out = Terminal()
    emit = Emitter("dpo", [BarView("dpo x", [("loss", ["train/loss", "eval/loss"])], out)])
    emit.total = 4
    emit("eval", 0, {"eval/loss": 0.9})  # before any step: the bar opens
    emit("step", 1, {"train/loss": 1.5, "other": 2.0})
    emit("samples", 1, payload={"title": "answers", "rows": [{"prompt": "hi", "answer": "yo"}]})
    emit("warning", 1, payload="a warning")
    emit("alarm", 1, payload={"message": "loss is nan", "stopped": True})
    emit("step", 2, {"train/loss": 1.25})
    emit("end", 2, payload={"reason": "loss is nan"})
    assert len(emit.callbacks) == 1  # none of the events made the view fail (it would be detached)
    text = out.getvalue()
    assert "| 2/4 [" in text and "train/loss=1.25" in text and "eval/loss=0.9" in text and "other" not in text
    assert "[dpo x] answers:\n" in text and "  prompt: 'hi' | answer: 'yo'\n" in text
    assert "[dpo x] warning: a warning\n" in text and "[dpo x] stopped: loss is nan\n" in text
    assert text.rstrip().endswith("[dpo x] finished: stopped for divergence (see above)")


def test_a_continued_run_starts_its_bar_at_its_step():
    out = Terminal()
    emit = Emitter("ppo", [BarView("ppo p", [("score", ["ppo/objective/scores"])], out)])
    emit.total = 20
    emit("start", 10)
    emit("step", 11, {"ppo/objective/scores": 0.5})
    emit("end", 11, payload={"reason": "done"})
    assert "| 10/20 [" in out.getvalue() and "| 11/20 [" in out.getvalue() and "| 0/20 [" not in out.getvalue()


def test_summary_line_says_when_a_run_stopped_and_keeps_to_the_main_metrics():
    summary = {
        "stage": "reward",
        "name": "rm",
        "seconds": 4.2,
        "saved": "/x/rm",
        "metrics": {"steps": 7, "train/loss": 0.5, "train/accuracy": 0.75, "mean": 0.1, "stopped": "interrupted"},
    }
    assert summary_line(summary) == (
        "rlhf-magic: reward 'rm' stopped (interrupted): 7 steps in 4.2 s; train/loss 0.5, train/accuracy 0.75; "
        "saved to /x/rm"
    )


def _in_a_terminal(cmd: list[str], env: dict, cwd: Path, timeout: float = 600) -> str:
    """Runs `cmd` with a pseudo-terminal (100 columns) as its stdout and stderr; returns what it printed."""
    leader, follower = os.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env, cwd=cwd)
    os.close(follower)
    chunks = []
    try:
        while select.select([leader], [], [], timeout)[0]:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every process holding the terminal has exited
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(leader)
        rc = proc.wait(timeout=60)
    out = b"".join(chunks).decode("utf-8", "replace")
    assert rc == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_under_accelerate_launch_one_bar_and_one_summary_from_rank_0(tmp_path, pairs):
    """Both processes write to the same terminal; only rank 0 draws the bar and prints the summary."""
    from launches import _free_port

    cfg = _config(tmp_path, pairs, steps=4)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd += ["-m", "rlhf_magic.cli", "sft", str(cfg), "--name", "demo"]
    out = _in_a_terminal(cmd, env, tmp_path)
    assert out.count("sft demo:   0%|") == 1  # each bar is drawn empty once, when it opens
    assert "sft demo: 100%|" in out and "[sft demo] step " not in out
    assert sum(line.startswith("rlhf-magic: sft 'demo' done: ") for line in out.splitlines()) == 1
