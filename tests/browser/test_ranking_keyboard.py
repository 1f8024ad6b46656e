"""Real browser: the ranking panel's keyboard and drag view (anywidget) in JupyterLab, in Debian's Chromium.

From the first prompt to a record on disk by key presses only; a drag of one answer to the top; a drop outside the
list; JupyterLab's shortcuts do not fire while the panel has focus, and the panel's keys do nothing outside it; the
accessibility tree names every rank control ("Rank answer A as 1", pressed state) and the comment box. Prints what it
measured; screenshots in artifacts/screenshots/ranking-keyboard-*.png.
"""

from __future__ import annotations

import json
import re

import nbformat
import pytest
from browser_notebook import ANSWERS, PROMPTS, SCREENSHOTS, write_notebook
from lab_ui import run_all

pytestmark = pytest.mark.browser
expect = pytest.importorskip("playwright.sync_api", reason="playwright is not installed").expect
pytest.importorskip("anywidget", reason="the keyboard view needs anywidget")

# the notebook as JupyterLab holds it: cell types and sources (a shortcut that fired would change them)
CELLS_JS = "() => [...document.querySelectorAll('.jp-Notebook .jp-Cell')].map(c => [c.className.match(/jp-(Code|Markdown|Raw)Cell/)[1], c.querySelector('.jp-InputArea-editor')?.textContent ?? ''])"  # noqa: E501
TAB_STOPS_JS = """panel => [...panel.querySelectorAll('button, input, textarea, select, [tabindex]')]
  .filter(e => e.tabIndex >= 0 && !e.disabled && e.offsetParent !== null).length"""


def records(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def shot(target, name: str) -> str:
    path = SCREENSHOTS / f"ranking-keyboard-{name}.png"
    target.screenshot(path=str(path))
    return str(path)


def press(page, *keys: str) -> None:
    for k in keys:
        page.keyboard.press(k)


def test_keyboard_drag_and_accessibility(page, jupyter_server):
    out = jupyter_server.root / "kb-prefs.jsonl"
    write_notebook(jupyter_server.root / "kb.ipynb", out.name, "kb-pairs.jsonl")
    run_all(page, jupyter_server, "lab", "kb.ipynb")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    panel = page.locator(".rlhf-ranking-panel").first
    view = panel.locator(".rlhf-rv-list")
    view.wait_for(state="visible", timeout=90_000)
    cards, status = view.locator(".rlhf-rv-card"), panel.locator(".rlhf-status")
    expect(cards).to_have_count(4)
    expect(panel.locator(".rlhf-cards")).to_be_hidden()  # the view replaced the click cards ...
    expect(panel.locator(".rlhf-view-note")).to_be_hidden()  # ... and the "did not load" note
    expect(cards.first).to_contain_text(ANSWERS[0][0])
    cells = page.evaluate(CELLS_JS)

    # ---- accessibility: names, pressed state, the comment's label, one tab stop for the list, a visible ring ---
    a1 = view.get_by_role("button", name="Rank answer A as 1", exact=True)
    expect(a1).to_have_attribute("aria-pressed", "false")
    expect(panel.get_by_role("textbox", name="Comment")).to_be_visible()
    list_stops = view.evaluate(TAB_STOPS_JS)
    panel_stops = panel.evaluate(TAB_STOPS_JS)
    assert list_stops == 1, f"the answer list has {list_stops} tab stops; one (roving) expected"
    shot(panel, "1-neutral")

    # ---- a key with no answer focused: the ranking stays and the panel says why --------------------------------
    panel.locator(".rlhf-undo").focus()
    press(page, "2")
    expect(status).to_contain_text("No answer has focus")
    expect(view.locator("[aria-pressed=true]")).to_have_count(0)

    # ---- keys only: arrow into the list, rank C > A > B (D takes 4 by itself), Enter ---------------------------
    press(page, "ArrowDown")  # from the Undo button into the list: answer A, the list's tab stop
    focused = page.evaluate("() => document.activeElement.getAttribute('aria-label')")
    assert focused == "Answer A, not ranked yet", focused
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineWidth")
    press(page, "2", "ArrowDown", "3", "ArrowDown", "1")
    expect(panel.locator(".rlhf-summary")).to_contain_text("C > A > B > D")
    expect(view.get_by_role("button", name="Rank answer C as 1", exact=True)).to_have_attribute("aria-pressed", "true")
    expect(view.locator(".rlhf-rv-card.is-best")).to_contain_text(ANSWERS[0][2])
    tree = view.aria_snapshot()
    shot(panel, "2-ranked-by-keys")
    assert not out.exists()
    press(page, "Enter", "Enter")  # the second Enter must not save a second record
    expect(status).to_contain_text("Saved C > A > B > D", timeout=30_000)
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[1])
    (first,) = records(out)
    assert first["ranking"] == [2, 0, 1, 3] and first["prompt"] == PROMPTS[0] and first["labeler"] == "browser"

    # ---- JupyterLab's command-mode shortcuts do not fire while the panel has focus ----------------------------
    for keys in [("a",), ("b",), ("m",), ("y",), ("d", "d"), ("x",), ("Shift+Enter",), ("Escape",), ("ArrowUp",)]:
        press(page, *keys)  # insert above/below, to markdown/code, delete, cut, run, command mode, select above
        assert page.evaluate(CELLS_JS) == cells, f"{keys}: a JupyterLab shortcut changed the notebook"
        assert page.locator(".jp-Notebook.jp-mod-editMode").count() == 0, f"{keys}: JupyterLab went to edit mode"
        assert view.evaluate("l => l.contains(document.activeElement)"), f"{keys}: the panel lost focus"
    assert len(records(out)) == 1 and panel.locator(".rlhf-prompt").inner_text().count(PROMPTS[1]) == 1

    # ---- the panel's keys do nothing outside it: S, U, F in the notebook's first cell ------------------------
    page.locator(".jp-Notebook .jp-MarkdownCell").first.click()
    press(page, "Escape", "s", "u", "f")
    cards.first.focus()
    press(page, "4")  # a round trip through the kernel: a skip, undo or flag sent before it would show by now
    expect(view.get_by_role("button", name="Rank answer A as 4", exact=True)).to_have_attribute("aria-pressed", "true")
    expect(panel.locator(".rlhf-prompt")).to_contain_text(PROMPTS[1])
    assert len(records(out)) == 1 and "Saved C > A > B > D" in status.inner_text()

    # ---- a drag: D to the top of the list (D > A > B > C); a drop outside the list changes nothing ------------
    cards.nth(3).drag_to(cards.first, target_position={"x": 40, "y": 3})
    expect(panel.locator(".rlhf-summary")).to_contain_text("D > A > B > C", timeout=30_000)
    expect(cards.first).to_contain_text(ANSWERS[1][3])
    shot(panel, "3-dragged-d-to-top")
    cards.nth(1).drag_to(page.locator(".jp-Notebook .jp-MarkdownCell").first)
    expect(status).to_contain_text("Dropped outside the list", timeout=30_000)
    expect(panel.locator(".rlhf-summary")).to_contain_text("D > A > B > C")
    cards.first.focus()
    press(page, "Enter")
    expect(status).to_contain_text("Saved D > A > B > C", timeout=30_000)
    assert [r["ranking"] for r in records(out)] == [[2, 0, 1, 3], [3, 0, 1, 2]]
    page.screenshot(path=str(SCREENSHOTS / "ranking-keyboard-4-page.png"), full_page=True)

    names = re.findall(r'button "([^"]*)"', panel.aria_snapshot())
    bare = [n for n in names if re.fullmatch(r"[–\d]?", n)]
    assert not bare, f"buttons without a readable name: {bare}"
    assert 'button "Rank answer A as 1"' in tree and "[pressed]" in tree, tree
    assert outline in ("2px", "3px"), outline
    print(
        f"\nkeyboard view: list tab stops {list_stops}, panel tab stops {panel_stops}, focus ring {outline}, "
        f"records {[r['ranking'] for r in records(out)]}\naccessibility tree of the ranked list:\n{tree}"
    )
    assert not [e for e in page.errors if "widget" in e.lower() or "rlhf" in e.lower()], page.errors

    # ---- two answers: the view's choice row (A is better / Tie / B is better) ---------------------------------
    pair = page.locator(".rlhf-ranking-panel").nth(1)
    pair.scroll_into_view_if_needed()
    choice = pair.locator(".rlhf-rv-choice").get_by_role("button", name="B is better", exact=True)
    choice.click()
    expect(choice).to_have_attribute("aria-pressed", "true")
    expect(pair.locator(".rlhf-rv-card.is-best")).to_contain_text("Lyon.")
    shot(pair, "5-pairwise")
    pair.locator(".rlhf-rv-card").first.focus()
    press(page, "Enter")
    expect(pair.locator(".rlhf-status")).to_contain_text("Saved B > A", timeout=30_000)
    assert [r["ranking"] for r in records(jupyter_server.root / "kb-pairs.jsonl")] == [[1, 0]]


def test_without_anywidget_the_click_cards_rank_and_look_like_ranking(page, jupyter_server):
    """The fallback: no view, the click cards say so; an unset rank is outlined, a chosen one filled, best marked."""
    out = jupyter_server.root / "fallback.jsonl"
    cells = [
        "import sys\nsys.modules['anywidget'] = None  # as if anywidget were not installed",
        "%load_ext rlhf_magic",
        f"prompts = {PROMPTS!r}\nanswers = {ANSWERS!r}",
        f"%rank panel prompts=prompts responses=answers k=4 file={out.name!r} labeler='browser'",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, jupyter_server.root / "fallback.ipynb")
    run_all(page, jupyter_server, "lab", "fallback.ipynb")
    panel = page.locator(".rlhf-ranking-panel").first
    panel.locator(".rlhf-submit").wait_for(state="visible", timeout=90_000)
    expect(panel.locator(".rlhf-view-note")).to_contain_text("need the anywidget package")
    expect(panel.locator(".rlhf-view-note")).to_be_visible()
    assert panel.locator(".rlhf-rv-list").count() == 0
    unset = panel.locator(".rlhf-rank-0 button.mod-active")
    background = "e => getComputedStyle(e).backgroundColor"
    expect(unset).to_have_text("–")
    assert unset.evaluate(background) == "rgb(255, 255, 255)"  # outlined, not the filled blue of a chosen rank
    assert unset.evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"
    panel.locator(".rlhf-rank-0").get_by_role("button", name="1", exact=True).click()
    chosen = panel.locator(".rlhf-rank-0 button.mod-active")
    expect(chosen).to_have_text("1")
    assert chosen.evaluate(background) == "rgb(21, 101, 192)"
    expect(panel.locator(".rlhf-best-0")).to_contain_text("Best")
    expect(panel.get_by_role("textbox", name="Comment")).to_be_visible()
    for card, rank in [(1, "2"), (2, "3")]:
        panel.locator(f".rlhf-rank-{card}").get_by_role("button", name=rank, exact=True).click()
    expect(panel.locator(".rlhf-summary")).to_contain_text("A > B > C > D")
    shot(panel, "6-fallback-click-cards")
    panel.locator(".rlhf-submit").click()
    expect(panel.locator(".rlhf-status")).to_contain_text("Saved A > B > C > D", timeout=30_000)
    assert [r["ranking"] for r in records(out)] == [[0, 1, 2, 3]]
