"""Real browser: JupyterLab runs the tutorial examples/02_label_preferences.ipynb (Run All) in Debian's Chromium.

The tutorial is copied into the server's temporary root (it writes prefs.jsonl next to itself); the server, and so
the kernel, has RLHF_MAGIC_HEADLESS=1, so a simulated labeler ranks the answers. Screenshots (artifacts/screenshots/):

  tutorial02-sft-live-midrun.png   the %%sft cell while it trains: progress bar, ETA, the live loss plot
  tutorial02-sft-live-final.png    the same cell when it finished (the same single image, redrawn)
  tutorial02-ranking-live.png      the %rank panel while the simulated labeler works (if a prompt was caught on screen)
  tutorial02-ranking-panel.png     the panel after the run, Back clicked: four answer cards with the saved ranking
  tutorial02-reward.png            the %%reward cell: live plots and the final histogram of chosen/rejected scores
  tutorial02-end.png               the end of the notebook in the window
Run time: about 6-12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from browser_notebook import SCREENSHOTS
from lab_ui import STDERR, code_cell, dom_errors, run_all, save_notebook, saved_errors, wait_run_all_done

pytestmark = [pytest.mark.browser, pytest.mark.slow]
expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect

TUTORIAL = Path(__file__).resolve().parents[2] / "examples" / "02_label_preferences.ipynb"
SERVER_ENV = {"RLHF_MAGIC_HEADLESS": "1"}  # read by conftest's jupyter_server: the kernel inherits it
if os.environ.get("RLHF_BROWSER_OMP_THREADS"):  # e.g. 1 when the machine is busy with other jobs
    SERVER_ENV["OMP_NUM_THREADS"] = os.environ["RLHF_BROWSER_OMP_THREADS"]
RUN_TIMEOUT = 40 * 60  # the whole notebook: ~6-10 min on 2 idle cores, much more on a busy machine
N_PROMPTS = 8

# the outputs of one cell: which one holds the .rlhf-live box, and every <img> with the output it sits in
OUTPUTS_JS = """cell => {
  const outs = [...cell.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child')];
  return {
    n: outs.length,
    live: outs.findIndex(o => o.querySelector('.rlhf-live')),
    imgs: outs.flatMap((o, i) => [...o.querySelectorAll('img')].map(img => ({
      output: i, src: img.getAttribute('src') || '', width: img.naturalWidth, height: img.naturalHeight}))),
  };
}"""


def fresh_copy(dst: Path) -> Path:
    """The tutorial as a reader gets it: outputs, execution counts and saved widget state removed."""
    nb = nbformat.read(TUTORIAL, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, dst)
    return dst


def outputs(cell) -> dict:
    return cell.element_handle().evaluate(OUTPUTS_JS)


def check_one_plot(cell, what: str) -> dict:
    """Exactly one output image, a decoded PNG, after the .rlhf-live box; no matplotlib repr text."""
    info = outputs(cell)
    assert info["live"] >= 0, f"{what}: no .rlhf-live box in the cell outputs: {info}"
    assert len(info["imgs"]) == 1, f"{what}: expected one plot image updated in place, got {info['imgs']}"
    (img,) = info["imgs"]
    assert img["src"].startswith("data:image/png"), f"{what}: the plot is not a PNG: {img['src'][:60]}"
    assert img["width"] > 100 and img["height"] > 50, f"{what}: the plot image did not decode: {img}"
    assert img["output"] > info["live"], f"{what}: the plot is not after the live box: {info}"
    expect(cell.locator(".jp-Cell-outputArea")).not_to_contain_text("<Figure")
    return img


def shot(target, name: str) -> Path:
    path = SCREENSHOTS / name
    target.screenshot(path=str(path))
    return path


def test_tutorial_02_runs_in_jupyterlab(page, jupyter_server):
    t0, times = time.time(), {}
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1400, "height": 2000})  # the whole %%reward cell fits
    notebook = TUTORIAL.name
    fresh_copy(jupyter_server.root / notebook)
    run_all(page, jupyter_server, "lab", notebook)
    deadline = t0 + RUN_TIMEOUT

    def left_ms() -> float:
        return max(deadline - time.time(), 1) * 1000

    # (1) %%sft: the live box (progress bar + label) and one PNG plot, caught while training, then at the end
    sft = code_cell(page, "%%sft sft")
    live = sft.locator(".rlhf-live")
    live.wait_for(state="visible", timeout=left_ms())
    bar = live.locator(".progress-bar")
    sft.locator(".jp-Cell-outputArea img").wait_for(state="visible", timeout=left_ms())
    times["sft_live_view_s"] = round(time.time() - t0)
    text = ""
    while time.time() < deadline:  # one training step done, so the plot has a point and the label an ETA
        text = live.text_content() or ""
        if "s/step" in text or "finished" in text:
            break
        time.sleep(0.2)
    midrun = None
    if "finished" not in text:
        sft.scroll_into_view_if_needed()
        expect(bar).to_be_visible()
        midrun = check_one_plot(sft, "%%sft while training")
        shot(sft, "tutorial02-sft-live-midrun.png")
    expect(live).to_contain_text("finished after", timeout=left_ms())
    times["sft_done_s"] = round(time.time() - t0)
    sft.scroll_into_view_if_needed()
    final = check_one_plot(sft, "%%sft finished")
    assert midrun is None or final["src"] != midrun["src"], "the plot was not redrawn after the first step"
    expect(bar).to_be_visible()
    assert "width: 100%" in (bar.get_attribute("style") or ""), bar.get_attribute("style")
    expect(live).to_contain_text("6 steps")
    shot(sft, "tutorial02-sft-live-final.png")

    # (2) %rank: the panel renders; catch a prompt's cards while the simulated labeler goes through them
    panel = page.locator(".rlhf-ranking-panel").first
    panel.wait_for(state="visible", timeout=left_ms())
    times["panel_visible_s"] = round(time.time() - t0)
    while time.time() < deadline:
        if panel.locator(".rlhf-card").first.is_visible():
            panel.scroll_into_view_if_needed()
            shot(panel, "tutorial02-ranking-live.png")
            break
        if f"{N_PROMPTS} / {N_PROMPTS}" in (panel.locator(".rlhf-progress").text_content() or ""):
            break  # the labeler was faster than the polling: the panel is checked after the run (Back)
        time.sleep(0.1)

    # (3) the whole notebook ran, with no exception anywhere
    prompts = wait_run_all_done(page, jupyter_server, notebook, timeout=max(deadline - time.time(), 1))
    times["run_all_done_s"] = round(time.time() - t0)
    saved = save_notebook(page, jupyter_server, notebook)
    assert not saved_errors(saved), "\n\n".join(saved_errors(saved))
    assert not dom_errors(page), "\n\n".join(dom_errors(page))
    assert all(p[1:-2].strip().isdigit() for p in prompts), f"not every code cell ran: {prompts}"
    expect(code_cell(page, "SIMULATE = ").locator(".jp-Cell-outputArea")).to_contain_text("SIMULATED LABELS")

    reward = code_cell(page, "%%reward rm")
    reward.scroll_into_view_if_needed()
    info = outputs(reward)
    assert info["live"] >= 0 and len(info["imgs"]) == 2, f"%%reward: expected live plot + histogram: {info}"
    assert all(i["src"].startswith("data:image/png") and i["width"] > 100 for i in info["imgs"]), info
    expect(reward.locator(".rlhf-live")).to_contain_text("finished after")
    expect(reward.locator(".jp-Cell-outputArea")).not_to_contain_text("<Figure")
    shot(reward, "tutorial02-reward.png")
    page.locator(".jp-Notebook .jp-CodeCell").last.scroll_into_view_if_needed()
    shot(page, "tutorial02-end.png")

    records = [json.loads(x) for x in (jupyter_server.root / "prefs.jsonl").read_text().splitlines()]
    ranked = [r for r in records if r["kind"] == "ranking"]
    assert len(ranked) == N_PROMPTS and all(r["labeler"].startswith("sim:") for r in ranked), records

    # the panel after the run: all labelled; Back (a real click, the kernel is idle) shows the last prompt's cards
    panel.scroll_into_view_if_needed()
    expect(panel.locator(".rlhf-progress")).to_contain_text(f"{N_PROMPTS} / {N_PROMPTS}")
    expect(panel.locator(".rlhf-prompt")).to_contain_text("Done")
    panel.locator(".rlhf-back").click()
    expect(panel.locator(".rlhf-status")).to_contain_text("Already labelled", timeout=30_000)
    # the keyboard and drag view (anywidget) shows the four answers; it replaces the click cards where it runs
    view = panel.locator(".rlhf-rv-list")
    for j in range(4):
        expect(panel.locator(f".rlhf-rv-card-{j}")).to_be_visible()
        expect(view.get_by_role("button", name=f"Rank answer {'ABCD'[j]} as 1", exact=True)).to_be_visible()
    for name in ("back", "skip", "undo", "submit"):
        expect(panel.locator(f".rlhf-{name}")).to_be_visible()
    expect(panel.locator(".rlhf-submit")).to_have_text("Replace")
    expect(panel.locator(".rlhf-summary")).to_contain_text("Your ranking")
    panel.scroll_into_view_if_needed()
    shot(panel, "tutorial02-ranking-panel.png")

    times["total_s"] = round(time.time() - t0)
    (SCREENSHOTS / "tutorial02-timings.json").write_text(json.dumps(times, indent=1))
    print("tutorial 02 in JupyterLab:", times)
    print("stderr outputs (warnings):", page.locator(STDERR).all_inner_texts())
    assert not [e for e in page.errors if "widget" in e.lower()], page.errors
