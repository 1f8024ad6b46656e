"""Agreement between labelers: the maths against a hand-computed example, Wilson's interval against published
values, and the view whose Re-label buttons open the prompts labelers disagree on most."""

from __future__ import annotations

import json

import pytest

from rlhf_magic import RankingPanel, load_preferences
from rlhf_magic.agreement import wilson
from rlhf_magic.errors import DataError
from rlhf_magic.preferences import Preferences
from rlhf_magic.widgets.agreement import AgreementView

ANSWERS = ["alpha", "bravo", "charlie", "delta"]
BACKWARDS = ["delta", "charlie", "bravo", "alpha"]


def rec(ranking, labeler, prompt, responses=ANSWERS, **extra):
    return {"kind": "ranking", "prompt": prompt, "responses": list(responses), "ranking": ranking,
            "labeler": labeler, **extra}  # fmt: skip


# Per prompt, the share of the answer pairs two labelers both ranked on which they agree:
#   p1  ann, bob, cat all A > B > C > D                 3 labeler pairs x 6 answer pairs, all agree   18/18 = 1
#   p2  ann A > B > C > D, bob B > A > C > D             alpha vs bravo flipped                         5/6
#   p3  ann A > B > C > D, bob saw the answers backwards and ranked delta first: every pair flipped    0/6 = 0
#   p4  two answers, both prefer x                                                                     1/1 = 1
#   p5  ann ranked it, bob flagged it with no ranking: not compared
# The prompt is the unit: rate = (1 + 5/6 + 0 + 1) / 4 = 17/24 (the pooled 24/31 would weigh p1 18 times).
HAND = [
    rec([0, 1, 2, 3], "ann", "p1"),
    rec([0, 1, 2, 3], "bob", "p1"),
    rec([0, 1, 2, 3], "cat", "p1"),
    rec([0, 1, 2, 3], "ann", "p2"),
    rec([1, 0, 2, 3], "bob", "p2"),
    rec([0, 1, 2, 3], "ann", "p3"),
    rec([0, 1, 2, 3], "bob", "p3", responses=BACKWARDS),
    rec([0, 1], "ann", "p4", responses=["x", "y"]),
    rec([0, 1], "bob", "p4", responses=["x", "y"]),
    rec([0, 1, 2, 3], "ann", "p5"),
    rec(None, "bob", "p5", flags=["all_bad"]),
]


def test_agreement_matches_the_hand_computed_example():
    agr = Preferences.from_records(HAND).agreement()
    assert (agr.prompts, agr.compared, agr.agreed) == (4, 18 + 6 + 6 + 1, 18 + 5 + 0 + 1)
    assert agr.rate == pytest.approx(17 / 24)
    # Wilson, n = 4 prompts, p = 17/24, z = 1.96: center (p + z^2/8) / (1 + z^2/4) = 0.6063,
    # half-width z / (1 + z^2/4) * sqrt(p(1 - p)/4 + z^2/64) = 0.3341
    assert agr.interval == pytest.approx((0.2722, 0.9404), abs=1e-4)
    assert agr.by_labelers == pytest.approx({("ann", "bob"): 17 / 24, ("ann", "cat"): 1.0, ("bob", "cat"): 1.0})
    assert agr.counts == {("ann", "bob"): 4, ("ann", "cat"): 1, ("bob", "cat"): 1}
    assert agr.intervals[("ann", "cat")] == pytest.approx(wilson(1.0, 1))
    worst = agr.disagreements()
    assert [(p.prompt, p.rate) for p in worst] == [("p3", 0.0), ("p2", pytest.approx(5 / 6))]
    # bob's ranking of p3 in the letters of ann's order of the answers: delta first is D
    assert worst[0].rankings == {"ann": "A > B > C > D", "bob": "D > C > B > A"} and worst[0].responses == ANSWERS
    table = agr.to_pandas()
    assert list(table["labelers"]) == ["all", "ann ~ bob", "ann ~ cat", "bob ~ cat"]
    assert list(table["prompts"]) == [4, 4, 1, 1]
    assert "Agreement 71% (95% interval 27% to 94%, Wilson over 4 prompts" in agr.summary()
    assert "p3" in agr._repr_html_() and "D &gt; C &gt; B &gt; A" in agr._repr_html_()


def test_wilson_matches_published_values():
    assert wilson(0.5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)  # 5 of 10
    assert wilson(0.0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)  # 0 of 20
    assert wilson(0.3, 0) == (0.0, 1.0)


def test_a_labelers_latest_ranking_counts_and_answers_match_by_text():
    shuffled = ["charlie", "alpha", "delta", "bravo"]
    prefs = Preferences.from_records(
        [
            rec([0, 1, 2, 3], "ann", "p"),  # alpha > bravo > charlie > delta
            rec([1, 3, 0, 2], "bob", "p", responses=shuffled),  # the same order, shown shuffled
            rec([0, 1, 2, 3], "cat", "p"),
            rec([1, 0, 2, 3], "cat", "p"),  # cat's later ranking wins: bravo > alpha > charlie > delta
            rec([0, 1, 2, 3], "ann", "only ann"),  # ranked once: not compared
        ]
    )
    agr = prefs.agreement()
    assert (agr.compared, agr.agreed, agr.prompts) == (18, 16, 1) and agr.rate == pytest.approx(16 / 18)
    assert agr.by_labelers == {("ann", "bob"): 1.0, ("ann", "cat"): 5 / 6, ("bob", "cat"): 5 / 6}


def test_ties_agree_with_ties_and_no_overlap_has_no_rate():
    tie = Preferences.from_records([rec([[0, 1], 2, 3], "a", "p"), rec([[0, 1], 3, 2], "b", "p")])
    assert tie.agreement().rate == pytest.approx(5 / 6)  # the tie matches; charlie vs delta does not
    alone = Preferences.from_records([rec([0, 1, 2, 3], "a", "p"), rec([0, 1, 2, 3], "b", "q")]).agreement()
    assert alone.rate is None and alone.interval is None and alone.disagreements() == []
    assert "no prompt was ranked by two labelers" in repr(alone) and len(alone.to_pandas()) == 0


# ------------------------------------------------------------------------------------ the view
def write(path, records):
    path.write_text("".join(json.dumps({**r, "id": f"id{i}"}) + "\n" for i, r in enumerate(records)))
    return path


def test_relabel_shows_the_prompt_in_the_bound_panel(tmp_path):
    path = write(tmp_path / "prefs.jsonl", HAND)
    prompts = ["p1", "p2", "p3"]
    panel = RankingPanel(prompts=prompts, responses=[ANSWERS] * 3, file=path, labeler="ann")
    assert panel.done
    view = panel.agreement()
    assert "Agreement 71%" in view.summary.value and "ann ~ bob" in view.table.value
    assert len(view.rows) == 2 and "p3" in view.rows[0].children[0].value  # lowest agreement first
    view.rows[0].children[1].click()  # Re-label p3
    assert panel.current_prompt == "p3" and panel.cards.buttons["submit"].description == "Replace"
    panel.submit([3, 2, 1, 0])  # ann now agrees with bob on p3
    assert panel.preferences.agreement().rate == pytest.approx((1 + 5 / 6 + 1 + 1) / 4)
    assert list(panel.preferences.history("p3")["action"]) == ["saved", "saved", "replaced"]
    view.rows[1].children[1].click()
    assert panel.current_prompt == "p2" and "rank it again" in view.status.value


def test_relabel_refuses_prompts_it_cannot_show(tmp_path):
    path = write(tmp_path / "prefs.jsonl", HAND)
    panel = RankingPanel(prompts=["p2", "p3"], responses=[ANSWERS] * 2, file=path, labeler="ann")
    view = AgreementView(panel.preferences, panel=panel)
    with pytest.raises(DataError, match=r"^prompt 'p4' is not among the bound panel's prompts"):
        view.relabel("p4")
    with pytest.raises(DataError, match=r"^prompt 'p5' is not one that several labelers ranked"):
        view.relabel("p5")
    in_memory = AgreementView(Preferences.from_records(HAND))
    with pytest.raises(DataError, match=r"no \.jsonl file to add a ranking to"):
        in_memory.relabel("p3")
    assert "Agreement: no prompt was ranked" in AgreementView(Preferences.from_records(HAND[:1])).summary.value


def test_relabel_without_a_panel_opens_one_on_the_same_answers_and_file(tmp_path):
    path = write(tmp_path / "prefs.jsonl", HAND)
    view = AgreementView(load_preferences(path))
    opened = view.relabel("p3")
    assert opened.prompts == ["p3"] and opened.store.path == path
    assert opened.labeler == "bob"  # remembered: the last person who labelled in this file
    assert opened.current_responses == BACKWARDS and opened.cards.buttons["submit"].description == "Replace"
    opened.submit([3, 2, 1, 0])  # bob now ranks alpha first, as ann did
    assert load_preferences(path).agreement().disagreements()[0].prompt == "p2"
    assert "p3" in view.status.value and "below; Submit replaces" in view.status.value
