"""The ranking panel's keyboard and drag view (rank_view.py, static/rank_list.js), Python side, without a browser.

The front end's messages are fed to the view as the kernel would hand them over (`_handle_custom_msg` for a key or
click, the `order` trait for a drop); tests/browser/test_ranking_keyboard.py presses the real keys.
"""

from __future__ import annotations

import html
import json
import re
import sys
from pathlib import Path

import pytest

from rlhf_magic import RankingPanel
from rlhf_magic.widgets import rank_view
from rlhf_magic.widgets.ranking_cards import UNSET

PROMPTS = ["What is RLHF?", "Name a colour.", "Say hi."]
ANSWERS = [[f"{p} / answer {j}" for j in range(4)] for p in PROMPTS]


def panel(path, **kw):
    kw.setdefault("responses", ANSWERS)
    return RankingPanel(prompts=kw.pop("prompts", PROMPTS), file=path, labeler="ann", **kw)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def key(p, **msg):
    """A message from the view's front end (a key press or a click in the list)."""
    p.cards.view._handle_custom_msg(msg, [])


def status(p) -> str:
    return html.unescape(re.sub("<[^>]+>", "", p.cards.status.value))


def same(record):
    return {k: v for k, v in record.items() if k not in ("id", "time")}


def test_keys_rank_and_submit_exactly_as_clicks_do(tmp_path):
    clicked, keyed = panel(tmp_path / "a.jsonl"), panel(tmp_path / "b.jsonl")
    clicked.cards.ranks[2].value = "1"
    clicked.cards.ranks[0].value = "2"
    clicked.cards.ranks[1].value = "3"  # D takes the last rank by itself
    clicked.cards.buttons["submit"].click()
    for card, rank in [(2, 1), (0, 2), (1, 3)]:
        key(keyed, action="rank", card=card, rank=rank)
    assert [tb.value for tb in keyed.cards.ranks] == ["2", "3", "1", "4"]  # the same auto-fill as clicks
    assert keyed.cards.view.state["ranks"] == [2, 3, 1, 4] and keyed.cards.view.order == [2, 0, 1, 3]
    key(keyed, action="submit")
    assert [same(r) for r in lines(tmp_path / "b.jsonl")] == [same(r) for r in lines(tmp_path / "a.jsonl")]
    assert lines(tmp_path / "b.jsonl")[0]["ranking"] == [2, 0, 1, 3] and keyed.current_prompt == PROMPTS[1]
    assert keyed.cards.view.state["answers"] == ANSWERS[1] and keyed.cards.view.state["ranks"] == [0] * 4


def test_a_taken_rank_swaps_and_zero_clears(tmp_path):
    p = panel(tmp_path / "p.jsonl")
    key(p, action="rank", card=0, rank=1)
    key(p, action="rank", card=1, rank=1)  # B takes 1 from A; A gets B's old rank (none)
    assert [tb.value for tb in p.cards.ranks] == [UNSET, "1", UNSET, UNSET]
    key(p, action="rank", card=1, rank=0)
    assert [tb.value for tb in p.cards.ranks] == [UNSET] * 4


def test_a_drop_applies_the_dragged_order_as_the_ranking(tmp_path):
    path = tmp_path / "p.jsonl"
    p = panel(path)
    p.cards.view.order = [3, 0, 1, 2]  # D dragged to the top of A, B, C, D
    assert p.cards.groups() == [[3], [0], [1], [2]] and not p.cards.buttons["submit"].disabled
    assert p.cards.view.state["order"] == [3, 0, 1, 2] and p.cards.view.state["ranks"] == [2, 3, 4, 1]
    p.cards.view.order = [0, 3, 1, 2]  # then A above D
    key(p, action="submit")
    assert lines(path)[0]["ranking"] == [0, 3, 1, 2]


def test_the_best_card_is_marked_and_unset_is_neutral(tmp_path):
    p = panel(tmp_path / "p.jsonl")
    cards = p.cards._card_widgets()
    assert {c.layout.border for c in cards} == {"1px dashed #bbb"} and not any(b.value for b in p.cards.badges)
    p.cards.ranks[1].value = "1"
    assert cards[1].layout.border == "2px solid #2e7d32" and "Best" in p.cards.badges[1].value
    assert [c.layout.border for c in cards[::2]] == ["1px dashed #bbb"] * 2 and p.cards.badges[0].value == ""
    p.cards.ranks[0].value = "2"
    assert cards[0].layout.border == "1px solid #888"
    tips = p.cards.ranks[0].tooltips
    assert tips[1] == "Rank answer A as 1" and tips[0] == "Answer A: no rank yet"
    assert p.cards.comment.description == "Comment"  # the comment box has a label


BAD = [
    ({"action": "rank", "card": None, "rank": 2}, "No answer has focus: click an answer or Tab to the answers"),
    ({"action": "rank", "card": 4, "rank": 1}, "Answer 4 is not on screen: the answers here are A to D"),
    ({"action": "rank", "card": 0, "rank": 5}, "Rank 5 is out of range: answer A takes a rank from 1 to 4"),
    ({"action": "rank", "card": 0, "rank": True}, "Rank True is out of range"),
    ({"action": "rank", "card": 0, "rank": "2"}, "Rank '2' is out of range"),
    ({"action": "drop_outside"}, "Dropped outside the list of answers: the ranking is unchanged"),
    ({"action": "tie"}, "Tie is for two answers"),
    ({"action": "jump"}, "the ranking view sent 'jump'; expected one of: rank, submit"),
    ({"order": [0, 0, 1, 2]}, "Order [0, 0, 1, 2] is not an order of the 4 answers"),
    ({"order": [2, 1, 0]}, "Order [2, 1, 0] is not an order of the 4 answers"),
]


@pytest.mark.parametrize(("msg", "message"), BAD, ids=[str(m) for m, _ in BAD])
def test_bad_input_leaves_the_ranking_and_says_why_in_one_line(tmp_path, msg, message):
    path = tmp_path / "p.jsonl"
    p = panel(path)
    key(p, action="rank", card=1, rank=1)
    before, state = [tb.value for tb in p.cards.ranks], dict(p.cards.view.state)
    if "order" in msg:
        p.cards.view.order = msg["order"]
    else:
        key(p, **msg)
    assert [tb.value for tb in p.cards.ranks] == before and p.cards.view.state["ranks"] == state["ranks"]
    assert p.cards.view.order == state["order"]  # a refused drop: the list goes back to the order on screen
    said = status(p)
    assert said.startswith(message) and "\n" not in said and "#c62828" in p.cards.status.value
    assert p.cards.view.state["status"] == said and p.cards.view.state["error"]
    assert not path.exists()
    key(p, action="rank", card=0, rank=2)  # the next good key clears the refusal
    assert status(p) == "" and p.cards.ranks[0].value == "2"


def test_enter_twice_saves_one_record(tmp_path):
    path = tmp_path / "p.jsonl"
    p = panel(path)
    p.cards.view.order = [1, 0, 2, 3]
    key(p, action="submit")
    key(p, action="submit")  # the second Enter lands on the next, unranked prompt: nothing more is written
    assert len(lines(path)) == 1 and p.current_prompt == PROMPTS[1] and p.cards.view.state["ranks"] == [0] * 4


def test_skip_undo_back_keys_click_the_buttons(tmp_path):
    path = tmp_path / "p.jsonl"
    p = panel(path)
    key(p, action="skip")
    assert p.current_prompt == PROMPTS[1] and not path.exists()
    key(p, action="back")
    assert p.current_prompt == PROMPTS[0]
    p.submit([0, 1, 2, 3])
    key(p, action="undo")
    assert [r["kind"] for r in lines(path)] == ["ranking", "retraction"] and p.current_prompt == PROMPTS[0]
    assert "Undone" in status(p) and p.cards.view.state["ranks"] == [1, 2, 3, 4]


def test_f_flags_through_the_panel(tmp_path):
    path = tmp_path / "p.jsonl"
    p = panel(path)
    calls = []
    p.cards.on_action("flag", lambda: calls.append(p.current_prompt))
    key(p, action="flag")
    assert calls == [PROMPTS[0]]
    if callable(getattr(RankingPanel, "flag", None)):  # RankingPanel.flag (item 5): F saves the flagged prompt
        q = panel(tmp_path / "q.jsonl")
        key(q, action="flag")
        assert lines(tmp_path / "q.jsonl")[0]["flags"] == ["all_bad"] and q.current_prompt == PROMPTS[1]


def test_without_a_panel_flag_f_toggles_the_flag_box(tmp_path):
    p = panel(tmp_path / "p.jsonl")
    p.cards.actions.clear()
    key(p, action="flag")
    assert p.cards.flag.value is True and status(p).startswith("Flagged: all answers are bad or unsafe")
    key(p, action="flag")
    assert p.cards.flag.value is False


def test_pairwise_keys_and_tie(tmp_path):
    path = tmp_path / "p.jsonl"
    p = panel(path, prompts=["Capital?"], responses=[["Paris.", "Lyon."]])
    key(p, action="rank", card=1, rank=1)
    assert p.cards.choice.value == "B is better" and p.cards.view.state["ranks"] == [2, 1]
    key(p, action="rank", card=1, rank=2)
    assert p.cards.choice.value == "A is better" and p.cards.view.state["order"] == [0, 1]
    key(p, action="tie")
    assert p.cards.choice.value == "Tie" and p.cards.view.state["ranks"] == [1, 1]
    assert "Tied best" in p.cards.badges[0].value and p.cards.view.state["pair"]
    p.cards.view.order = [1, 0]
    key(p, action="submit")
    assert lines(path)[0]["ranking"] == [1, 0]


def test_the_view_follows_every_change_and_the_note_goes_once_it_runs(tmp_path):
    p = panel(tmp_path / "p.jsonl")
    view, note = p.cards.view, p.cards.view_note
    assert view in p.cards.root.children and rank_view.NOT_LOADED in note.value
    seq = view.state["seq"]
    p.cards.ranks[3].value = "1"  # a click: the view redraws from the same state
    assert view.state["ranks"] == [0, 0, 0, 1] and view.order == [3, 0, 1, 2] and view.state["seq"] > seq
    key(p, action="ready")
    assert note.value == ""
    p.submit([0, 1, 2, 3])
    p.submit([0, 1, 2, 3])
    p.submit([0, 1, 2, 3])
    assert view.state["answers"] == [] and view.order == [] and "Saved" in view.state["status"]


def test_without_anywidget_the_click_cards_work_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "anywidget", None)  # `import anywidget` raises ImportError
    path = tmp_path / "p.jsonl"
    p = panel(path)
    assert p.cards.view is None and rank_view.view_class() is None
    note = re.sub("<[^>]+>", "", p.cards.view_note.value)
    assert note == rank_view.NO_ANYWIDGET and "\n" not in note and 'pip install "rlhf-magic[notebook]"' in note
    assert p.cards.view_note in p.cards.root.children
    p.cards.ranks[0].value = "1"
    p.cards.ranks[1].value = "2"
    p.cards.ranks[2].value = "3"
    p.cards.buttons["submit"].click()
    assert lines(path)[0]["ranking"] == [0, 1, 2, 3] and "Best" not in p.cards.badges[0].value


def test_every_action_the_front_end_sends_is_one_python_handles():
    js = (rank_view.STATIC / "rank_list.js").read_text()
    sent = set(re.findall(r'action: "(\w+)"', js))
    assert {"ready", "rank", "drop_outside", "submit", "skip", "undo", "flag", "tie"} <= sent
    assert sent <= {"ready", "rank", "drop_outside", *rank_view.ACTIONS}
    assert "export default { render }" in js and "stopPropagation" in js
    css = (rank_view.STATIC / "rank_list.css").read_text()
    assert ".rlhf-rv-card:focus { outline: 3px solid" in css
    view = rank_view.view_class()()
    assert "export default" in view._esm and ".rlhf-rv-card" in view._css


def test_the_package_ships_the_view_module():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(d.startswith("anywidget") for d in project["project"]["optional-dependencies"]["notebook"])
    shipped = project["tool"]["setuptools"]["package-data"]["rlhf_magic.widgets"]
    assert {"static/*.js", "static/*.css"} <= set(shipped)
