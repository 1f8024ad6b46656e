"""A real kernel, driven like a front end: the Stop button and a kernel interrupt end a running %%sft cleanly.

The kernel is a real ipykernel (jupyter_client KernelManager + blocking client, as nbclient uses). The Stop test
sends the comm_msg a browser sends for a click, while the cell is still training (see rlhf_magic/widgets/uipoll.py).
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")
pytest.importorskip("ipywidgets")

MAX_STEPS = 2000
SETUP = """
%load_ext rlhf_magic
pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(40)]
"""
SFT = f"""%%sft s
model = "tiny"
data = pairs
max_steps = {MAX_STEPS}
eval_fraction = 0
"""
REPORT = """
import json
print("REPORT " + json.dumps({"summary": s.metrics.summary, "generated": s.generate(["hi"])}, default=str))
"""


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[tuple[Any, Any]]:
    """A started python3 kernel (this venv's ipykernel) with a private cache/IPython dir, and a ready client."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RLHF_MAGIC_CACHE=str(tmp_path / "cache"),
        RLHF_MAGIC_DEVICE="cpu",
        IPYTHONDIR=str(tmp_path / "ipython"),
        MPLCONFIGDIR=str(tmp_path / "mpl"),
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]),
    )
    km = jupyter_client.KernelManager(kernel_name="python3", connection_file=str(tmp_path / "kernel.json"))
    kc = None
    try:
        km.start_kernel(env=env, cwd=str(tmp_path))
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        if kc is not None:
            kc.stop_channels()
        km.shutdown_kernel(now=True)


def run(kc: Any, code: str, timeout: float = 120) -> tuple[dict, str]:
    """Execute code; return its execute_reply content and all its stream/error text."""
    msg_id = kc.execute(code)
    reply = kc.get_shell_msg(timeout=timeout)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=timeout)
    text, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:  # drain iopub up to this request's idle
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        text.append(_text(msg))
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return reply["content"], "".join(text)


def _text(msg: dict) -> str:
    c = msg["content"]
    if msg["msg_type"] == "stream":
        return c["text"]
    if msg["msg_type"] == "error":
        return f"{c['ename']}: {c['evalue']}\n" + "\n".join(c["traceback"])
    return ""


def start_training(kc: Any, timeout: float = 120) -> tuple[str, str | None, list[str]]:
    """Start the %%sft cell; return (msg_id, Stop button comm id, iopub text) once a few steps are done."""
    reply, text = run(kc, SETUP)
    assert reply["status"] == "ok", text
    msg_id = kc.execute(SFT)
    buttons: dict[str, list[str]] = {}  # ButtonModel comm id -> its _dom_classes
    progress: set[str] = set()
    texts: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        texts.append(_text(msg))
        kind, c = msg["msg_type"], msg["content"]
        state = c.get("data", {}).get("state", {})
        if kind == "status" and c["execution_state"] == "idle":
            pytest.fail("the cell finished before it was stopped:\n" + "".join(texts))
        if kind == "comm_open" and state.get("_model_name") == "ButtonModel":
            buttons[c["comm_id"]] = list(state.get("_dom_classes", []))
        elif kind == "comm_open" and state.get("_model_name") == "FloatProgressModel":
            progress.add(c["comm_id"])
        elif kind == "comm_msg" and "_dom_classes" in state and c["comm_id"] in buttons:
            buttons[c["comm_id"]] = list(state["_dom_classes"])
        elif kind == "comm_msg" and c["comm_id"] in progress and state.get("value", 0) >= 3:
            stop_ids = [cid for cid, classes in buttons.items() if "rlhf-stop" in classes]
            return msg_id, (stop_ids[0] if stop_ids else None), texts
    pytest.fail("training did not reach step 3 in time:\n" + "".join(texts))


def wait_replies(kc: Any, msg_ids: list[str], timeout: float, why: str) -> list[tuple[str, dict]]:
    """(msg_id, execute_reply content) for each of msg_ids, in the order the replies arrive."""
    got: list[tuple[str, dict]] = []
    deadline = time.monotonic() + timeout
    while len(got) < len(msg_ids):
        try:
            reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            pytest.fail(f"no reply within {timeout:.0f} s: {why}")
        if reply["parent_header"].get("msg_id") in msg_ids:
            got.append((reply["parent_header"]["msg_id"], reply["content"]))
    return got


def rest_of_output(kc: Any, msg_id: str) -> str:
    text = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id:
            text.append(_text(msg))
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return "".join(text)


def report(kc: Any) -> dict:
    reply, text = run(kc, REPORT)
    assert reply["status"] == "ok", text
    line = next(x for x in text.splitlines() if x.startswith("REPORT "))
    return json.loads(line.removeprefix("REPORT "))


@pytest.mark.slow
def test_stop_button_click_ends_a_running_cell(kernel: tuple[Any, Any]) -> None:
    _, kc = kernel
    msg_id, stop_comm, _ = start_training(kc)
    assert stop_comm is not None, "no ButtonModel with class rlhf-stop was opened"
    # a cell queued behind the training one: it must run after it, not re-entrantly in the middle
    queued = kc.execute("steps_seen_by_next_cell = s.metrics.summary['steps']")
    click = {"comm_id": stop_comm, "data": {"method": "custom", "content": {"event": "click"}}}
    kc.shell_channel.send(kc.session.msg("comm_msg", click))  # what the browser sends for a click
    replies = wait_replies(kc, [msg_id, queued], 60, "the Stop click did not end the training cell")
    assert [m for m, _ in replies] == [msg_id, queued]
    assert all(r["status"] == "ok" for _, r in replies), replies
    out = report(kc)
    summary = out["summary"]
    assert "Stop button" in summary.get("stopped", ""), summary
    assert 3 <= summary["steps"] < MAX_STEPS // 4, summary
    reply, text = run(kc, "print('NEXT', steps_seen_by_next_cell)")
    assert reply["status"] == "ok", text
    assert f"NEXT {summary['steps']}" in text
    assert isinstance(out["generated"], list) and len(out["generated"]) == 1
    assert isinstance(out["generated"][0], str)


@pytest.mark.slow
def test_kernel_interrupt_ends_a_running_cell_cleanly(kernel: tuple[Any, Any]) -> None:
    km, kc = kernel
    msg_id, _, _ = start_training(kc)
    km.interrupt_kernel()
    [(_, reply)] = wait_replies(kc, [msg_id], 60, "the interrupt did not end the training cell")
    text = rest_of_output(kc, msg_id)
    assert reply["status"] == "ok", reply
    assert "KeyboardInterrupt" not in text and "Traceback" not in text, text
    summary = report(kc)["summary"]
    assert "interrupt" in summary.get("stopped", ""), summary
    assert 3 <= summary["steps"] < MAX_STEPS // 4, summary


def test_poll_ui_events_is_a_noop_without_a_kernel(ip: Any) -> None:
    import ipywidgets as W

    from rlhf_magic.widgets import uipoll

    button = W.Button()
    assert uipoll.poll_ui_events(button) is False  # a terminal InteractiveShell: no kernel, nothing to route
    assert uipoll.poll_ui_events() is False
    assert "_reply_subshell_for" not in getattr(button.comm, "__dict__", {})


def test_uipoll_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, rlhf_magic.widgets.uipoll as u; u.poll_ui_events(); assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1]).returncode == 0


def test_router_keeps_the_front_ends_subshell_and_drops_a_deleted_one() -> None:
    from rlhf_magic.widgets.uipoll import _Router

    alive = ["ours"]
    route = _Router("ours", lambda: list(alive))
    assert route({"method": "custom"}, None) == "ours"
    assert route({"method": "custom"}, "lab-comm-subshell") == "lab-comm-subshell"
    alive.clear()
    assert route({"method": "custom"}, None) is None  # back to the main shell, never to a missing subshell
