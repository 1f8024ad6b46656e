"""Reliability, table-driven: each row is a bad input or a fault typed into a real IPython shell on the tiny model.

A row passes when the cell fails with exactly one line of error text (a UsageError, no traceback) that contains the
row's expected text, and the user namespace (names and object ids), the `rlhf` registry (names and handle ids) and
the files under the test's folder (names and bytes) are what they were before the cell. Divergence runs publish a
handle instead (their own test); labels survive a failed write, kill -9 and two writers (the last three tests).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

GUARD_S = 120  # a row that hangs (e.g. an unbounded generation) fails after this instead of stalling CI

# Defined by running a cell, so `brevity` raises ZeroDivisionError at line 3 of its cell (as in the issue).
FUNCTIONS = """\
def brevity(prompts, responses):
    n = 0
    return [len(r) / n for r in responses]
def lengthy(prompts, responses):
    return [float(len(r)) for r in responses]
"""
SFT = {"model": "'tiny'", "data": "pairs", "max_steps": "2"}
PPO = {
    "policy": "base",
    "reward": "lengthy",
    "prompts": "prompts",
    "steps": "1",
    "batch_size": "4",
    "mini_batch_size": "4",
    "max_new_tokens": "8",
}
REWARD = {"model": "base", "data": "prefs", "max_steps": "2", "batch_size": "2"}
HUGE = "1000000000"


def cell(magic: str, base: dict[str, str], name: str = "bad", **over: str | None) -> str:
    """`%%magic name` with `base` settings, `over` on top (None removes a setting); `lora_r` is written `lora.r`."""
    body = {**base, **{"lora.r" if k == "lora_r" else k: v for k, v in over.items()}}
    return f"%%{magic} {name}\n" + "".join(f"{k} = {v}\n" for k, v in body.items() if v is not None)


def sft(name: str = "bad", **over: str | None) -> str:
    return cell("sft", SFT, name, **over)


def ppo(name: str = "bad", **over: str | None) -> str:
    return cell("ppo", PPO, name, **over)


def reward(name: str = "bad", **over: str | None) -> str:
    return cell("reward", REWARD, name, **over)


def rank(name: str = "r", folder: str = ".", more: str = "") -> str:
    return f'%rank {name} prompts=prompts responses=answers file="{folder}/prefs.jsonl" {more}'.strip()


def readonly_folder(ip, tmp: Path) -> str:
    """A folder nobody may write to; root writes anywhere, so as root: /sys, where even root cannot create files."""
    if os.geteuid() == 0:
        if not Path("/sys").is_dir():
            pytest.skip("as root, permissions do not bite, and there is no /sys to stand in")
        return "/sys"
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return "ro"


def parent_is_a_file(ip, tmp: Path) -> str:
    (tmp / "notes").write_text("a file, not a folder\n")
    return "notes"


def no_setup(ip, tmp: Path) -> str:
    return "."


def reward_handle(ip, tmp: Path) -> str:
    assert ip.run_cell(reward("rm0", max_steps="1")).success
    return "."


# (id, setup, cell, expected text in the one error line). `setup(shell, tmp_path)` returns the cell's {folder}.
ROWS = [
    # ---- issue 19, item 1: range checks in one place
    ("sft-lr-negative", no_setup, sft(lr="-1"), "lr = -1"),
    ("sft-batch-size-0", no_setup, sft(batch_size="0"), "batch_size = 0"),
    ("sft-eval-fraction-1.5", no_setup, sft(eval_fraction="1.5"), "eval_fraction = 1.5"),
    ("sft-lora-r-0", no_setup, sft(lora_r="0"), "lora.r = 0"),
    ("sft-max-steps-0", no_setup, sft(max_steps="0"), "max_steps = 0"),
    ("sft-max-steps-negative", no_setup, sft(max_steps="-1"), "max_steps = -1"),
    ("sft-epochs-0", no_setup, sft(epochs="0", max_steps=None), "epochs = 0"),
    ("sft-epochs-negative", no_setup, sft(epochs="-1", max_steps=None), "epochs = -1"),
    ("ppo-lr-negative", no_setup, ppo(lr="-1"), "lr = -1"),
    ("reward-lr-negative", no_setup, reward(lr="-1"), "lr = -1"),
    ("ppo-mini-batch-over-batch", no_setup, ppo(mini_batch_size="16", batch_size="4"), "mini_batch_size = 16"),
    # ---- items 1 and 2: no unbounded generation, no work beyond the machine's memory
    ("ppo-max-new-tokens-huge", no_setup, ppo(max_new_tokens=HUGE), f"max_new_tokens = {HUGE}"),
    ("rank-max-new-tokens-huge", no_setup, f"%rank r prompts=prompts policy=base max_new_tokens={HUGE}", HUGE),
    ("compare-max-new-tokens-huge", no_setup, f"%compare base base prompts=prompts max_new_tokens={HUGE}", HUGE),
    ("sft-batch-beyond-memory", no_setup, sft(batch_size="10000000", max_length="2048"), "needs about"),
    ("reward-batch-beyond-memory", no_setup, reward(batch_size="10000000"), "needs about"),
    # ---- item 3: a reward callable that raises
    ("ppo-reward-raises", no_setup, ppo(reward="brevity"), "brevity() raised ZeroDivisionError at line 3"),
    (
        "compare-reward-raises",
        no_setup,
        "%compare base base prompts=prompts reward=brevity max_new_tokens=4",
        "brevity() raised ZeroDivisionError at line 3",
    ),
    # ---- item 5: names
    ("sft-name-over-user-list", no_setup, sft("prompts"), "prompts is already a notebook variable"),
    ("sft-name-over-reward-handle", reward_handle, sft("rm0"), "rm0 is already a reward model"),
    ("rank-name-over-policy-handle", no_setup, rank("base"), "base is a policy of this session"),
    ("rank-name-rlhf-says-%rank", no_setup, rank("rlhf"), "UsageError: %rank 'rlhf'"),
    # ---- item 6: a ranking file that cannot be written is refused when the panel opens
    ("rank-readonly-folder", readonly_folder, rank(folder="{folder}"), "the panel cannot write there"),
    ("rank-folder-is-a-file", parent_is_a_file, rank(folder="{folder}"), "file = 'notes/prefs.jsonl'"),
    # ---- behaviour that already worked before issue 19
    ("sft-unknown-key", no_setup, sft(epoch="1"), "unknown setting 'epoch' (did you mean 'epochs'?)"),
    ("sft-bad-type", no_setup, sft(lr="'fast'"), "lr = 'fast' is not valid"),
    ("sft-missing-data-file", no_setup, sft(data="'nope.jsonl'"), "data = 'nope.jsonl': no such file"),
    ("sft-undefined-variable", no_setup, sft(data="undefined_var"), "no notebook variable named 'undefined_var'"),
    ("ppo-temperature-0", no_setup, ppo(temperature="0"), "temperature = 0"),
    ("reward-without-data", no_setup, reward(data=None), "data is required"),
    ("rank-unknown-option", no_setup, rank(more='lables="kim"'), "unknown setting 'lables' (did you mean 'labeler'?)"),
    ("compare-one-policy", no_setup, "%compare base prompts=prompts", "%compare needs two policies"),
]


class Hang(BaseException):
    """Raised by the guard's alarm; IPython shows it as a traceback, so the row fails with a reason."""


@contextlib.contextmanager
def guard(seconds: int):
    def ring(*_):
        raise Hang(f"the cell still ran after {seconds} s (a run that should have been refused?)")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture
def shell(ip, tmp_path, monkeypatch):
    """The shell in the test's folder, with data, prompts, a registered base policy and two reward functions."""
    from rlhf_magic.api import load_policy

    monkeypatch.chdir(tmp_path)
    for name in ("bad", "r", "rm0", "run", "start"):  # the shell outlives each test: no results of earlier ones
        ip.user_ns.pop(name, None)
    assert ip.run_cell(FUNCTIONS).success
    prompts = ["Say hi.", "Name a colour.", "What is 2 plus 2?", "Why?"]
    ip.user_ns.update(
        pairs=[{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(40)],
        prompts=prompts,
        answers=[[f"{p} / answer {j}" for j in range(3)] for p in prompts],
        prefs=[{"prompt": p, "chosen": "Yes.", "rejected": "No, no, no."} for p in prompts],
        base=load_policy("tiny", name="base", session=ip.user_ns["rlhf"]),
    )
    return ip


def snapshot(ip, folder: Path) -> dict:
    hidden = {"In", "Out", "exit", "quit", "get_ipython"}
    names = {k: id(v) for k, v in ip.user_ns.items() if not k.startswith("_") and k not in hidden}
    handles = [(h.name, id(h)) for h in ip.user_ns["rlhf"]]
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    return {"namespace": names, "registry": handles, "files": files}


def run(ip, capsys, text: str, seconds: int = GUARD_S):
    capsys.readouterr()
    with guard(seconds):
        res = ip.run_cell(text)
    out = capsys.readouterr()
    return res, out.out, out.err


@pytest.mark.parametrize(("setup", "text", "expected"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(shell, tmp_path, capsys, setup, text, expected):
    text = text.format(folder=setup(shell, tmp_path))
    before = snapshot(shell, tmp_path)
    res, out, err = run(shell, capsys, text)
    assert not res.success, f"the cell succeeded; output: {out[-500:]}"
    lines = err.strip().splitlines()
    assert "Traceback" not in err + out and len(lines) == 1, f"not one line: {(out + err)[-1500:]}"
    assert lines[0].startswith("UsageError: ") and expected in lines[0], lines[0]
    after = snapshot(shell, tmp_path)
    for part in ("namespace", "registry", "files"):
        assert after[part] == before[part], f"the failed cell changed the {part}"


def no_space(fd: int, data: bytes) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(("fault", "said"), [("disk-full", "No space left on device"), ("folder-gone", "no longer")])
def test_a_failed_submit_says_one_line_and_keeps_the_ranking_for_a_retry(shell, tmp_path, fault, said):
    from rlhf_magic.widgets import ranking_store

    (tmp_path / "sub").mkdir()
    assert shell.run_cell(rank(folder="sub", more='labeler="kim"')).success
    panel, file = shell.user_ns["r"], tmp_path / "sub" / "prefs.jsonl"
    panel.submit([0, 1, 2])
    before = file.read_bytes()
    for box, value in zip(panel.cards.ranks, "213"):
        box.value = value  # what a person clicks
    prompt, shown = panel.current_prompt, [box.value for box in panel.cards.ranks]
    with pytest.MonkeyPatch.context() as mp:
        if fault == "disk-full":
            mp.setattr(ranking_store.os, "write", no_space)
        else:
            (tmp_path / "sub").rename(tmp_path / "away")
        panel.cards.buttons["submit"].click()
    if fault == "folder-gone":
        (tmp_path / "away").rename(tmp_path / "sub")
    status = panel.cards.status.value
    assert "could not save" in status and said in status and "\n" not in status and "Traceback" not in status
    assert panel.current_prompt == prompt and [box.value for box in panel.cards.ranks] == shown
    assert file.read_bytes() == before
    panel.cards.buttons["submit"].click()  # the retry, once the fault is gone, saves the same ranking
    assert [json.loads(line)["ranking"] for line in file.read_text().splitlines()] == [[0, 1, 2], [1, 0, 2]]


# ---- item 4: a diverging run stops with one line and keeps the last finite weights
START = sft("start", max_steps="40", lr="1e-2", lora="False")  # a policy that has learnt: its loss can climb
DIVERGE = {
    "sft": sft("run", model="start", max_steps="30", lr="{lr}"),
    "reward": reward("run", model="start", max_steps="20", lr="{lr}"),
    "ppo": ppo("run", policy="start", steps="8", lr="{lr}"),
}


@pytest.mark.parametrize("lr", ["1e6", "1e38"])
@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_divergence_stops_with_one_line_and_finite_weights(shell, capsys, stage, lr):
    import torch

    assert shell.run_cell(START).success
    res, out, err = run(shell, capsys, DIVERGE[stage].format(lr=lr), seconds=300)
    assert res.success, f"the diverging run failed instead of keeping its last good weights: {err[-1500:]}"
    assert "Traceback" not in out + err
    said = [line for line in (out + err).splitlines() if "training diverged at step" in line]
    assert len(said) == 1, f"expected one line about the divergence in the output: {(out + err)[-1500:]}"
    assert "the result keeps the" in said[0] and "lower lr" in said[0], said[0]
    handle = shell.user_ns["run"]
    assert shell.user_ns["rlhf"]["run"] is handle
    assert all(torch.isfinite(p).all() for p in handle.trainable_parameters())
    prompts = shell.user_ns["prompts"]
    if stage == "reward":
        assert all(math.isfinite(s) for s in handle.score(prompts, ["Yes."] * len(prompts)))
    else:
        assert all(isinstance(a, str) for a in handle.generate(prompts, max_new_tokens=4))


# ---- item 8: labels survive kill -9 and two writers
SUBMITTER = """\
import sys
from rlhf_magic.widgets.ranking import RankingPanel
same = ["a" * 3000, "b" * 3000, "c" * 3000]  # ~9 KB records: each write spans pages and can be cut by a kill
prompts = [f"prompt {i}" for i in range(4000)]
panel = RankingPanel(prompts=prompts, responses=[same] * len(prompts), file=sys.argv[1], labeler="kim")
print("ready", flush=True)
while not panel.done:
    print(panel.submit([2, 0, 1])["id"], flush=True)  # submit() returns once the record is fsynced
"""


def wait_for(path: Path, text: str, proc: subprocess.Popen, seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, f"the child exited early: {path.read_text()[-2000:]}"
        assert time.monotonic() < end, f"the child did not say {text!r}"
        time.sleep(0.01)


def test_kill_9_while_labelling_loses_no_fsynced_record(tmp_path):
    from rlhf_magic.preferences import read_jsonl

    file, log, rng = tmp_path / "prefs.jsonl", tmp_path / "ids.txt", random.Random(19)
    printed: list[str] = []
    for _ in range(20):
        log.write_text("")
        with open(log, "a") as out, open(tmp_path / "stderr.txt", "a") as err:
            child = subprocess.Popen([sys.executable, "-c", SUBMITTER, str(file)], stdout=out, stderr=err)
        wait_for(log, "ready\n", child)
        time.sleep(rng.uniform(0.0, 0.4))
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, "the child finished before the kill: give it more prompts"
        printed += [x for x in log.read_text().split("\n")[1:-1]]  # a last id without its newline was not done
    assert len(printed) >= 20, "too few records were submitted for the kills to mean anything"
    lines = file.read_text().splitlines()
    parsed, torn = [], []
    for line in lines:
        try:
            parsed.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            torn.append(line)  # a write cut by the kill: the store leaves it and starts the next record on a new line
    assert len(torn) <= 20 and all(t.startswith("{") for t in torn)
    assert sorted(set(parsed)) == sorted(parsed), "a record was written twice"
    assert set(printed) <= set(parsed), f"fsynced records missing: {set(printed) - set(parsed)}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read = [rec["id"] for _, rec in read_jsonl(file)]
    assert read == parsed and len(caught) == len(torn)  # the reader skips exactly the torn lines, with a warning


WRITER = """\
import os, sys, time
from rlhf_magic.widgets.ranking_store import PreferenceStore, now_iso
file, who, go = sys.argv[1:]
store = PreferenceStore(file)
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.001)
for i in range(60):
    answers = [f"{who} {i} first " + "x" * 7500, f"{who} {i} second " + "y" * 7500]  # ~15 KB a record
    rec = {"kind": "ranking", "id": f"{who}-{i}", "prompt": f"{who} prompt {i}", "responses": answers}
    store.append({**rec, "ranking": [1, 0], "labeler": who, "time": now_iso()})
"""


def test_two_writers_append_whole_lines(tmp_path):
    file, go = tmp_path / "prefs.jsonl", tmp_path / "go"
    logs = [tmp_path / f"{who}.log" for who in ("ann", "bob")]
    procs = []
    for who, log in zip(("ann", "bob"), logs):
        with open(log, "w") as out:
            cmd = [sys.executable, "-c", WRITER, str(file), who, str(go)]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
    for proc, log in zip(procs, logs):
        wait_for(log, "ready\n", proc)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0], [log.read_text()[-1000:] for log in logs]
    records = [json.loads(line) for line in file.read_text().splitlines()]  # an interleaved line would not parse
    assert sorted(r["id"] for r in records) == sorted(f"{w}-{i}" for w in ("ann", "bob") for i in range(60))
    for r in records:
        who, i = r["id"].split("-")
        assert r["responses"] == [f"{who} {i} first " + "x" * 7500, f"{who} {i} second " + "y" * 7500]
    order = [r["labeler"] for r in records]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert switches >= 2, "one writer finished before the other started: the test proved nothing"
