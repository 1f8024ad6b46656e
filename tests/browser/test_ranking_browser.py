"""Real browser: JupyterLab (and Notebook 7) in Debian's Chromium; rank by clicks, submit, check the JSONL on disk."""

from __future__ import annotations

import json

import pytest
from browser_notebook import ANSWERS, PROMPTS, SCREENSHOTS, write_notebook
from lab_ui import run_all

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect


def rank_button(panel, card: int, rank: str):
    """A rank button of the keyboard and drag view, which replaces the click cards where anywidget runs."""
    name = f"Rank answer {'ABCD'[card]} as {rank}"
    return panel.locator(".rlhf-rv-list").get_by_role("button", name=name, exact=True)


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("ui", ["lab", "notebook"])
def test_rank_by_clicks_and_submit(page, jupyter_server, ui):
    out, pair_out = jupyter_server.root / f"{ui}-prefs.jsonl", jupyter_server.root / f"{ui}-pairs.jsonl"
    notebook = f"rank-{ui}.ipynb"
    write_notebook(jupyter_server.root / notebook, out.name, pair_out.name)
    run_all(page, jupyter_server, ui, notebook)

    panel = page.locator(".rlhf-ranking-panel").first
    submit = panel.locator(".rlhf-submit")
    submit.wait_for(state="visible", timeout=90_000)
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[0])
    expect(panel.locator(".rlhf-answer-2")).to_contain_text(ANSWERS[0][2])
    expect(panel.locator(".rlhf-progress")).to_contain_text("0 / 3")
    expect(submit).to_be_disabled()

    # C best, then A: still incomplete, so Submit stays disabled and nothing is written
    rank_button(panel, 2, "1").click()
    rank_button(panel, 0, "2").click()
    expect(panel.locator(".rlhf-summary")).to_contain_text("2 of 4 ranked")
    expect(submit).to_be_disabled()
    assert not out.exists()
    # B third: D gets the last rank by itself and Submit turns on
    rank_button(panel, 1, "3").click()
    expect(panel.locator(".rlhf-summary")).to_contain_text("C > A > B > D")
    expect(submit).to_be_enabled()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    panel.screenshot(path=str(SCREENSHOTS / f"ranking-panel-{ui}.png"))
    submit.click()
    expect(panel.locator(".rlhf-status")).to_contain_text("Saved C > A > B > D", timeout=30_000)
    expect(panel.locator(".rlhf-progress")).to_contain_text("1 / 3")
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[1])
    expect(submit).to_be_disabled()

    (rec,) = records(out)
    assert rec["ranking"] == [2, 0, 1, 3] and rec["prompt"] == PROMPTS[0] and rec["responses"] == ANSWERS[0]
    assert (rec["kind"], rec["labeler"], rec["flags"]) == ("ranking", "browser", [])

    # Undo by click: a retraction is appended and prompt 1 comes back with its ranking filled in
    panel.locator(".rlhf-undo").click()
    expect(panel.locator(".rlhf-status")).to_contain_text("Undone", timeout=30_000)
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[0])
    assert [r["kind"] for r in records(out)] == ["ranking", "retraction"]

    # the pairwise panel (K = 2): "B is better"
    pair = page.locator(".rlhf-ranking-panel").nth(1)
    pair.scroll_into_view_if_needed()
    expect(pair.locator(".rlhf-submit")).to_be_disabled()
    pair.locator(".rlhf-rv-choice").get_by_role("button", name="B is better", exact=True).click()
    pair.screenshot(path=str(SCREENSHOTS / f"ranking-pairwise-{ui}.png"))
    pair.locator(".rlhf-submit").click()
    expect(pair.locator(".rlhf-status")).to_contain_text("Saved B > A", timeout=30_000)
    (pair_rec,) = records(pair_out)
    assert pair_rec["ranking"] == [1, 0] and pair_rec["responses"] == ["Paris.", "Lyon."]
    page.screenshot(path=str(SCREENSHOTS / f"ranking-page-{ui}.png"), full_page=True)
    # Notebook 7 logs errors of its own (e.g. "Command 'filebrowser:open-path' not registered"); ours would name widgets
    assert not [e for e in page.errors if "widget" in e.lower()], page.errors
