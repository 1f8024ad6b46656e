"""Driving JupyterLab / Notebook 7 from Playwright: Run All, find a cell, wait for the run to end, save, read errors.

Waits go through the REST API (kernel state, saved contents) and the DOM (input prompts), never fixed sleeps.
"""

from __future__ import annotations

import contextlib
import re
import time
import urllib.error

# "[*]:" while a cell runs or waits in the queue, "[12]:" once it ran, "[ ]:" if it never ran
PROMPTS_JS = (
    "() => [...document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')].map(e => e.textContent.trim())"
)
# an exception's traceback, or a line such as "ValueError: ..." / "UsageError: ..." (warnings do not match)
ERROR_TEXT = re.compile(r"Traceback \(most recent call last\)|^\s*[A-Za-z_.]*(Error|Exception)\b:", re.MULTILINE)
STDERR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'


def run_all(page, server, ui: str, notebook: str) -> None:
    """Open the notebook, wait for its kernel (REST, then the toolbar indicator), then Run > Run All Cells."""
    page.goto(server.url(ui, notebook))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    server.wait_kernel_idle(notebook)
    indicator = page.locator(".jp-Notebook-ExecutionIndicator").first
    deadline = time.time() + 60
    while time.time() < deadline and indicator.get_attribute("data-status") != "idle":
        time.sleep(0.2)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator("li.lm-Menu-item[data-command='runmenu:run-all']").click()
    with contextlib.suppress(Exception):  # the kernel picker can pop up on a slow start: accept the default
        page.locator(".jp-Dialog .jp-mod-accept").click(timeout=2_000)


def code_cell(page, source: str):
    """The code cell whose editor contains `source` (e.g. "%%sft sft")."""
    return page.locator(".jp-Notebook .jp-CodeCell").filter(has=page.locator(".jp-InputArea-editor", has_text=source))


def wait_run_all_done(page, server, notebook: str, timeout: float, poll: float = 1.0) -> list[str]:
    """Wait until no cell is running or queued ("[*]") and the kernel is idle, three polls in a row.

    The kernel goes idle for a moment between two queued cells, so the REST state alone is not enough; after an
    error JupyterLab drops the rest of the queue, so this also returns then. Returns the input prompts."""
    deadline, calm = time.time() + timeout, 0
    prompts: list[str] = []
    while time.time() < deadline:
        prompts = page.evaluate(PROMPTS_JS)
        state = server.kernel_state(notebook)
        if state == "dead":
            raise RuntimeError(f"the kernel of {notebook} died; see {server.log}")
        calm = calm + 1 if state == "idle" and prompts and not any("*" in p for p in prompts) else 0
        if calm >= 3:
            return prompts
        time.sleep(poll)
    raise TimeoutError(f"{notebook} still running after {timeout:.0f}s; prompts {prompts}")


def save_notebook(page, server, notebook: str, timeout: float = 60) -> dict:
    """File > Save Notebook in the page, then wait for the contents API to show the new file; returns the model."""
    before = server.api(f"/api/contents/{notebook}?content=0")["last_modified"]
    page.locator(".lm-MenuBar-itemLabel", has_text="File").first.click()
    page.locator("li.lm-Menu-item[data-command='docmanager:save']").click()
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            model = server.api(f"/api/contents/{notebook}?content=1")
        except urllib.error.HTTPError as e:  # read while the server rewrote the file: 400 "Unreadable Notebook",
            if e.code not in (400, 500):  # or 500 "No such file" between its atomic write's remove and rename
                raise
            last = e
        else:
            if model["last_modified"] != before:
                return model["content"]
        time.sleep(0.3)
    raise TimeoutError(f"{notebook} was not saved within {timeout:.0f}s (last error: {last})")


def saved_errors(nb: dict) -> list[str]:
    """Error outputs of a saved notebook (contents API JSON): exceptions, tracebacks on stderr, cells never run."""
    problems = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        head = "".join(cell["source"]).splitlines()[:1]
        if cell.get("execution_count") is None:
            problems.append(f"cell {i} {head} did not run")
        for out in cell.get("outputs", []):
            if out["output_type"] == "error":
                problems.append(f"cell {i} {head}: {out['ename']}: {out['evalue']}")
            elif out["output_type"] == "stream" and out["name"] == "stderr":
                text = "".join(out["text"])
                if ERROR_TEXT.search(text):
                    problems.append(f"cell {i} {head} stderr: {text[-1500:]}")
    return problems


def dom_errors(page) -> list[str]:
    """Texts of stderr/error outputs on the page that hold a traceback or an exception line."""
    texts = page.locator(STDERR).all_inner_texts()
    return [t[-1500:] for t in texts if ERROR_TEXT.search(t)]
