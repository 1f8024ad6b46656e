"""Real browser: `%rank` shows its panel at once and samples the answers in the background (issue 20, item 1).

JupyterLab in Debian's Chromium, not headless (no RLHF_MAGIC_HEADLESS), the tiny model, and a sampler slowed inside
the kernel (the first batched call waits DELAY_S, later ones until Stop, which ends them as the engine does between
decode steps), so the state before prompt 1's answers exist can be seen. Printed, not asserted (no timing
assertions): seconds from Shift+Enter on the `%rank` cell to the visible panel, and to prompt 1's answer cards.
Asserted: the panel is visible and says it is sampling prompt 1 before any answer exists; another cell runs while
later answers are sampled; Stop ends the sampling. Screenshots (artifacts/screenshots/): panel-timing-sampling.png,
panel-timing-answers.png, panel-timing-stopped.png.
"""

from __future__ import annotations

import time

import nbformat
import pytest
from browser_notebook import SCREENSHOTS
from lab_ui import PROMPTS_JS, code_cell
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

DELAY_S = 6.0
PROMPTS = ["What does RLHF stand for?", "Name a primary colour.", "How many legs does a spider have?"]
SETUP = f"""%load_ext rlhf_magic
import time
import rlhf_magic
from rlhf_magic.engine import generation
from rlhf_magic.engine.handles import PolicyHandle

policy = rlhf_magic.load_policy("tiny", name="tiny")
_sample = PolicyHandle.sample

calls = []

def slowed(self, *args, **kwargs):  # each batched call waits first (the later ones until Stop), as decoding would
    calls.append(args[0])
    end = time.monotonic() + ({DELAY_S} if len(calls) == 1 else 600)
    while time.monotonic() < end:
        if generation.stop_requested():
            raise generation.SamplingStopped("stopped")
        time.sleep(0.02)
    return _sample(self, *args, **kwargs)

PolicyHandle.sample = slowed
prompts = {PROMPTS!r}
print("setup done")"""
RANK = '%rank panel policy=policy prompts=prompts k=3 file="timing.jsonl" labeler="browser" max_new_tokens=8 seed=0'
PROBE = 'print("kernel free while sampling")'


def write_notebook(path) -> None:
    meta = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in (SETUP, RANK, PROBE)], metadata=meta), path)


def answer(panel, j: int):
    """Answer j's card as shown: the click-to-rank card, or the keyboard and drag view's card where it loaded."""
    return panel.locator(f".rlhf-answer-{j}, .rlhf-rv-card-{j}").locator("visible=true")


def run_cell(page, source: str) -> None:
    """Select the cell (command mode) and run it with Shift+Enter."""
    cell = code_cell(page, source).first
    cell.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def wait_ran(page, index: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        prompt = page.evaluate(PROMPTS_JS)[index]
        if "*" not in prompt and any(ch.isdigit() for ch in prompt):
            return
        time.sleep(0.2)
    raise TimeoutError(f"cell {index} did not finish: {page.evaluate(PROMPTS_JS)}")


def test_rank_shows_the_panel_at_once_and_samples_in_the_background(page, jupyter_server, capsys):
    notebook = "panel-timing.ipynb"
    write_notebook(jupyter_server.root / notebook)
    page.goto(jupyter_server.url("lab", notebook))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    jupyter_server.wait_kernel_idle(notebook)
    run_cell(page, "%load_ext rlhf_magic")
    wait_ran(page, 0)
    expect(code_cell(page, "%load_ext rlhf_magic").first).to_contain_text("setup done")

    rank_cell = code_cell(page, "%rank panel").first
    rank_cell.locator(".jp-InputPrompt").click()
    start = time.monotonic()
    page.keyboard.press("Shift+Enter")
    panel = page.locator(".rlhf-ranking-panel").first
    panel.wait_for(state="visible", timeout=60_000)
    to_panel = time.monotonic() - start
    # before prompt 1's answers exist: the note and the progress bar, no answer cards, Submit off
    assert answer(panel, 0).count() == 0, "the answers were there before the panel: nothing was observed"
    expect(panel.locator(".rlhf-prompt")).to_contain_text("Sampling answers for prompt 1 of 3")
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[0])
    expect(panel.locator(".rlhf-sampling-bar")).to_be_visible()
    expect(panel.locator(".rlhf-sampling-text")).to_contain_text("0 of 3 prompts ready")
    expect(panel.locator(".rlhf-submit")).to_be_disabled()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    panel.screenshot(path=str(SCREENSHOTS / "panel-timing-sampling.png"))

    answer(panel, 0).wait_for(state="visible", timeout=120_000)
    to_answers = time.monotonic() - start
    expect(answer(panel, 2)).to_be_visible()
    panel.screenshot(path=str(SCREENSHOTS / "panel-timing-answers.png"))

    # prompts 2-3 are being sampled now: another cell runs meanwhile, and Stop ends the sampling
    expect(panel.locator(".rlhf-sampling-text")).to_contain_text("1 of 3 prompts ready")
    run_cell(page, PROBE)
    expect(code_cell(page, PROBE).first).to_contain_text("kernel free while sampling", timeout=30_000)
    assert "1 of 3 prompts ready" in panel.locator(".rlhf-sampling-text").inner_text(), "sampling ended first"
    panel.locator(".rlhf-stop").click()
    expect(panel.locator(".rlhf-sampling-text")).to_contain_text("Sampling stopped: 1 of 3", timeout=30_000)
    expect(panel.locator(".rlhf-stop")).to_be_hidden()
    panel.screenshot(path=str(SCREENSHOTS / "panel-timing-stopped.png"))
    assert not [e for e in page.errors if "widget" in e.lower()], page.errors
    with capsys.disabled():
        print(f"\n%rank timing (tiny model, batches slowed by {DELAY_S:.0f} s in the kernel): "
              f"panel visible after {to_panel:.2f} s, prompt 1's answers after {to_answers:.2f} s")  # fmt: skip
