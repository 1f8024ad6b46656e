"""Preferences: validation, retractions, torn lines, pairs, flags, tables, history, simulated labelers, and the
panel's labeler name and Flag."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from rlhf_magic import labelers
from rlhf_magic.errors import ConfigError, DataError
from rlhf_magic.preferences import Preferences, format_ranking, load_preferences, parse_ranking

ANSWERS = ["alpha", "bravo", "charlie", "delta"]


def rec(ranking, labeler="ann", prompt="p", responses=ANSWERS, **extra):
    return {"kind": "ranking", "prompt": prompt, "responses": list(responses), "ranking": ranking,
            "labeler": labeler, **extra}  # fmt: skip


def write_lines(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.mark.parametrize(
    ("ranking", "groups"),
    [([2, 0, 3, 1], [[2], [0], [3], [1]]), ([0, [1, 2], 3], [[0], [1, 2], [3]]), ([[0, 1, 2, 3]], [[0, 1, 2, 3]])],
)
def test_parse_ranking_accepts_orders_and_tie_groups(ranking, groups):
    assert parse_ranking(ranking, 4, "x") == groups
    assert format_ranking(groups) == ranking


@pytest.mark.parametrize(
    ("ranking", "message"),
    [
        ([0, 1, 2, 4], "index 4 is out of range for 4 answers"),
        ([0, 1, 1, 3], "names answer 1 twice"),
        ([0, 1, 2], r"incomplete: answers \[3\] are not ranked"),
        ([0, [], 1, 2, 3], "empty tie group"),
        ("0123", "must be a list"),
        ([0, 1.0, 2, 3], "1.0 is not an answer index"),
    ],
)
def test_parse_ranking_rejects_non_permutations(ranking, message):
    with pytest.raises(DataError, match=message):
        parse_ranking(ranking, 4, "record 7")
    with pytest.raises(DataError, match=r"^record 7: "):
        parse_ranking(ranking, 4, "record 7")


def test_from_records_names_the_bad_record():
    good = rec([0, 1, 2, 3])
    with pytest.raises(DataError, match=r"^record 1: ranking \[0, 0, 1, 2\] names answer 0 twice"):
        Preferences.from_records([good, rec([0, 0, 1, 2])])
    with pytest.raises(DataError, match="record 0: a ranking needs at least 2 answers"):
        Preferences.from_records([rec([0], responses=["only"])])
    with pytest.raises(DataError, match=r"record 1: not a preference record \(fields: prompt, response\)"):
        Preferences.from_records([good, {"prompt": "p", "response": "sft data"}])
    with pytest.raises(DataError, match="no preferences"):
        Preferences.from_records([])
    assert len(Preferences.from_records([], allow_empty=True)) == 0


def test_pairs_and_rankings_mix_into_one_view():
    prefs = Preferences.from_records([rec([3, 1, 0, 2]), {"prompt": "q", "chosen": "good", "rejected": "bad"}])
    first, second = prefs.ranked()
    assert first.groups == [[3], [1], [0], [2]] and first.labeler == "ann"
    assert (second.prompt, second.responses, second.groups) == ("q", ["good", "bad"], [[0], [1]])
    assert second["responses"] == ["good", "bad"]  # dict-style access too
    assert all(r["kind"] == "ranking" for r in prefs.records)


def test_to_pairs_gives_k_choose_2_pairs_in_order():
    pairs = Preferences.from_records([rec([3, 1, 0, 2])]).to_pairs()
    assert len(pairs) == 6
    assert pairs[0] == {"prompt": "p", "chosen": "delta", "rejected": "bravo"}
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        ("delta", "bravo"), ("delta", "alpha"), ("delta", "charlie"),
        ("bravo", "alpha"), ("bravo", "charlie"), ("alpha", "charlie"),
    }  # fmt: skip


def test_ties_give_no_pair():
    prefs = Preferences.from_records([rec([0, [1, 2], 3]), rec([[0, 1]], responses=["x", "y"])])
    assert len(prefs.to_pairs()) == 5  # 6 pairs minus the tied one; the all-tie pair gives none
    assert ("bravo", "charlie") not in {(p["chosen"], p["rejected"]) for p in prefs.to_pairs()}


def flagged_prefs():
    """A ranked prompt, a flagged one with a ranking (an older panel), and a flagged one with none."""
    return Preferences.from_records(
        [
            rec([1, 0], responses=["x", "y"]),
            rec([0, 1, 2, 3], flags=["all_bad"]),
            rec(None, prompt="q", flags=["all_bad"]),
        ]
    )


def test_flagged_prompts_are_left_out_of_pairs_and_it_says_how_many():
    prefs = flagged_prefs()
    with pytest.warns(UserWarning, match=r"^to_pairs: left out 2 flagged prompt\(s\) .*include_flagged=True"):
        assert prefs.to_pairs() == [{"prompt": "p", "chosen": "y", "rejected": "x"}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keeping them says nothing
        assert len(prefs.to_pairs(include_flagged=True)) == 1 + 6  # the one without a ranking gives no pair
        assert len(prefs.to_pandas(pairs=True, include_flagged=True)) == 7
    for view, name in [(prefs.to_pandas, "to_pandas"), (prefs.to_dataset, "to_dataset")]:
        with pytest.warns(UserWarning, match=f"^{name}: left out 2 flagged"):
            assert len(view(pairs=True)) == 1
    assert "1 pairs (2 flagged, left out)" in repr(prefs) and prefs.flagged == 2
    assert len(prefs.without_flagged()) == 1 and len(prefs) == 3


def test_a_flagged_prompt_needs_no_ranking_and_round_trips():
    prefs = flagged_prefs()
    assert [r.groups for r in prefs.ranked()] == [[[1], [0]], [[0], [1], [2], [3]], []]
    assert prefs.records[2]["ranking"] is None and prefs.records[2]["flags"] == ["all_bad"]
    for view in (prefs.to_pandas(), prefs.to_dataset()):
        back = Preferences.from_records(view)
        assert [(r.groups, r.flags) for r in back.ranked()] == [(r.groups, r.flags) for r in prefs.ranked()]
    with pytest.raises(DataError, match=r"^record 0: the ranking is missing; only a flagged prompt"):
        Preferences.from_records([rec(None)])
    with pytest.raises(DataError, match=r"record 0: ranking \[\] is incomplete"):
        Preferences.from_records([rec([])])  # without a flag an empty ranking is still an incomplete one


def test_retractions_and_replacements_are_applied(tmp_path):
    path = write_lines(
        tmp_path / "prefs.jsonl",
        [
            rec([0, 1, 2, 3], id="a"),
            rec([3, 2, 1, 0], id="b", prompt="q"),
            {"kind": "retraction", "id": "r1", "retracts": "a"},
            rec([1, 0, 2, 3], id="c", prompt="q", replaces="b"),
        ],
    )
    prefs = load_preferences(path)
    assert [r["id"] for r in prefs.records] == ["c"]
    assert prefs.source == str(path)


def test_unknown_retraction_target_warns(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec([0, 1, 2, 3], id="a"), {"kind": "retraction", "retracts": "zz"}])
    with pytest.warns(UserWarning, match="line 2: retracts 'zz'"):
        assert len(load_preferences(path)) == 1


def test_torn_last_line_is_skipped_with_a_warning(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [rec([0, 1, 2, 3]), rec([1, 0, 2, 3])], tail='{"kind": "ranking", "pro')
    with pytest.warns(UserWarning, match="p.jsonl, line 3: skipped a torn record"):
        prefs = load_preferences(path)
    assert [r["ranking"] for r in prefs.records] == [[0, 1, 2, 3], [1, 0, 2, 3]]


def test_foreign_and_broken_lines_name_the_line(tmp_path):
    foreign = write_lines(tmp_path / "sft.jsonl", [rec([0, 1, 2, 3]), {"prompt": "hi", "response": "hello"}])
    with pytest.raises(DataError, match=r"^sft.jsonl, line 2: not a preference record"):
        load_preferences(foreign)
    garbage = tmp_path / "g.jsonl"
    garbage.write_text(json.dumps(rec([0, 1, 2, 3])) + "\nnot json\n")
    with pytest.raises(DataError, match=r"g\.jsonl, line 2: not valid JSON"):
        load_preferences(garbage)
    bad = write_lines(tmp_path / "bad.jsonl", [rec([0, 1, 2, 3]), rec([0, 1, 2, 9])])
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: ranking \[0, 1, 2, 9\]: index 9 is out of range"):
        load_preferences(bad)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_preferences(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no preferences in"):
        load_preferences(tmp_path / "empty.jsonl")
    assert len(load_preferences(tmp_path / "empty.jsonl", allow_empty=True)) == 0


def test_pair_files_import_from_jsonl_and_csv(tmp_path):
    rows = [{"prompt": "p1", "chosen": "yes", "rejected": "no"}, {"prompt": "p2", "chosen": "a", "rejected": "b"}]
    jsonl = write_lines(tmp_path / "pairs.jsonl", rows)
    csv = tmp_path / "pairs.csv"
    csv.write_text("prompt,chosen,rejected\np1,yes,no\np2,a,b\n")
    for path in (jsonl, csv):
        prefs = load_preferences(path)
        assert prefs.to_pairs() == rows
        assert [r.groups for r in prefs.ranked()] == [[[0], [1]], [[0], [1]]]


def test_pandas_and_dataset_views():
    prefs = Preferences.from_records(
        [rec([0, [1, 2], 3], labeler="ann", comment="close call"), rec([3, 2, 1, 0], labeler="bob")]
    )
    df = prefs.to_pandas()
    assert list(df["labeler"]) == ["ann", "bob"] and list(df["comment"]) == ["close call", ""]
    assert list(df["ranking"]) == ["A > B = C > D", "D > C > B > A"]  # the panel's letters, best first
    assert list(df.columns[:4]) == ["prompt", "ranking", "flags", "comment"]
    assert len(prefs.to_pandas(pairs=True)) == 5 + 6
    ds = prefs.to_dataset(pairs=True)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 11
    rows = prefs.to_dataset()
    assert len(rows) == 2 and json.loads(rows[0]["ranking"]) == [0, [1, 2], 3]  # datasets keep indices
    assert "2 ranked prompts" in repr(prefs) and "11 pairs" in repr(prefs)


def test_letter_rankings_read_back():
    got = Preferences.from_records([rec("B > a = D > C"), rec("[3, 2, 1, 0]")]).ranked()
    assert [r.groups for r in got] == [[[1], [0, 3], [2]], [[3], [2], [1], [0]]]
    with pytest.raises(DataError, match=r"^record 0: ranking 'B > AA > C' is not a list of answer indices, nor"):
        Preferences.from_records([rec("B > AA > C")])
    with pytest.raises(DataError, match=r"record 0: ranking \[1, 0\] is incomplete"):
        Preferences.from_records([rec("B > A")])


def test_notebook_tables_show_full_texts_wrapped():
    import pickle

    long = "word " * 80 + "THE END"
    prefs = Preferences.from_records([rec([1, 0], responses=[long, "short"], comment=long)])
    for df in (prefs.to_pandas(pairs=True), prefs.to_pandas(), prefs.to_pandas(pairs=True).head(1)):
        shown = df._repr_html_()
        assert "THE END" in shown and "white-space:pre-wrap" in shown  # pandas alone cuts cells at 50 characters
    assert pickle.loads(pickle.dumps(prefs.to_pandas())).equals(prefs.to_pandas())


def test_history_lists_saved_replaced_and_undone(tmp_path):
    path = write_lines(
        tmp_path / "prefs.jsonl",
        [
            rec([0, 1, 2, 3], id="a", time="t1"),
            rec([3, 2, 1, 0], id="b", prompt="q", time="t2", labeler="bob"),
            {"kind": "retraction", "id": "r1", "retracts": "a", "labeler": "ann", "time": "t3"},
            rec([1, 0, 2, 3], id="c", prompt="q", replaces="b", time="t4", labeler="bob", comment="B is best"),
            rec(None, id="d", prompt="q", flags=["all_bad"], time="t5", labeler="cat"),
        ],
    )
    prefs = load_preferences(path)
    q = prefs.history("q")
    assert list(q["action"]) == ["saved", "replaced", "saved"] and list(q["time"]) == ["t2", "t4", "t5"]
    assert list(q["ranking"]) == ["D > C > B > A", "B > A > C > D", ""] and list(q["labeler"]) == ["bob", "bob", "cat"]
    assert list(q["comment"]) == ["", "B is best", ""] and list(q["flags"])[-1] == ["all_bad"]
    p = prefs.history("p")
    assert list(p["action"]) == ["saved", "undone"] and list(p["ranking"]) == ["A > B > C > D"] * 2
    assert list(p["id"]) == ["a", "r1"] and len(prefs.history()) == 5
    assert len((prefs + Preferences.from_records([rec([0, 1, 2, 3], prompt="z")])).history()) == 6
    with pytest.raises(DataError, match=r"^history: no ranking of prompt 'nope' in these preferences") as err:
        prefs.history("nope")
    assert "\n" not in str(err.value)


def test_no_rankings_give_empty_tables_with_the_same_columns():
    """'Run All' before anyone ranks: the notebook's `prefs.to_pandas()[[...]]` must not raise a KeyError."""
    full = Preferences.from_records([rec([0, 1, 2, 3], labeler="ann")])
    empty = Preferences([])
    for pairs in (False, True):
        df = empty.to_pandas(pairs=pairs)
        assert len(df) == 0 and list(df.columns) == list(full.to_pandas(pairs=pairs).columns)
        assert empty.to_dataset(pairs=pairs).column_names == full.to_dataset(pairs=pairs).column_names
    assert empty.to_pandas()[["prompt", "ranking", "labeler", "flags"]].shape == (0, 4)


def test_no_rankings_yet_says_rank_the_answers_above_first(tmp_path):
    from rlhf_magic.errors import NEED_LABELS

    assert NEED_LABELS == "rank the answers above first"
    for make in (
        lambda: Preferences([], source="prefs.jsonl").require(),
        lambda: Preferences.from_records([]),
        lambda: load_preferences(tmp_path / "never_written.jsonl"),  # a panel creates it on the first Submit
    ):
        with pytest.raises(DataError, match=NEED_LABELS) as err:
            make()
        assert "\n" not in str(err.value)


def test_round_trips_through_dataframe_dataset_and_paths(tmp_path):
    prefs = Preferences.from_records([rec([0, [1, 2], 3], id="a"), rec([1, 0], responses=["x", "y"], id="b")])
    for view in (prefs.to_pandas(), prefs.to_dataset()):
        back = Preferences.from_records(view)
        assert [r.groups for r in back.ranked()] == [[[0], [1, 2], [3]], [[1], [0]]]
    path = write_lines(tmp_path / "p.jsonl", prefs.records)
    assert Preferences.from_records(str(path)).records == prefs.records
    with pytest.raises(DataError, match=r"record 0: ranking 'best' is not a list"):
        Preferences.from_records([rec("best")])


def test_simulated_labelers_follow_their_rule():
    answers = ["a medium answer", "tiny", "the longest answer of them all, about cats", "cats!"]
    assert labelers.prefers_shorter().rank("q", answers) == [1, 3, 0, 2]
    assert labelers.prefers_longer().rank("q", answers) == [2, 0, 3, 1]
    cats = labelers.prefers_containing("CATS", ties=True)
    assert cats.rank("q", answers) == [[2, 3], [0, 1]] and cats.name == "sim:contains('CATS')"
    assert labelers.avoids("cats", ties=True).rank("q", answers) == [[0, 1], [2, 3]]
    first = labelers.prefers_containing("cats").rank("q", answers)
    assert sorted(first[:2]) == [2, 3] and sorted(first[2:]) == [0, 1]  # ties broken at random without ties=True
    custom = labelers.from_function(lambda p, a: a.count("a"), name="many-a")
    assert custom.name == "sim:many-a" and custom("q", ["aaa", "a", "aa"]) == [0, 2, 1]
    assert labelers.prefers_shorter(name="alice").name == "sim:alice"
    assert labelers.avoids("x").name == "sim:avoids('x')" and labelers.random_labeler().name == "sim:random"


def test_noise_is_the_share_of_random_rankings():
    answers = ["aaaa", "bbb", "cc", "d"]
    exact = labelers.prefers_shorter(noise=0.0, seed=1)
    assert all(exact.rank("q", answers) == [3, 2, 1, 0] for _ in range(50))
    noisy = labelers.prefers_shorter(noise=0.5, seed=1)
    off = sum(noisy.rank("q", answers) != [3, 2, 1, 0] for _ in range(400))
    assert 150 < off < 230  # 0.5 * (23/24 non-rule permutations) * 400 ≈ 192
    again = [labelers.prefers_shorter(noise=0.5, seed=7).rank("q", answers) for _ in range(2)]
    assert again[0] == again[1]  # same seed, same labels
    with pytest.raises(ConfigError, match="noise = 2"):
        labelers.prefers_shorter(noise=2)


def test_import_does_not_pull_torch():
    code = (
        "import sys, rlhf_magic; rlhf_magic.Preferences; rlhf_magic.labelers; rlhf_magic.RankingPanel; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------ the panel: labeler and Flag
QS = ["q1", "q2", "q3"]


def open_panel(path, **kw):
    from rlhf_magic import RankingPanel

    return RankingPanel(prompts=QS, responses=[ANSWERS] * 3, file=path, **kw)


def test_the_panel_asks_for_a_name_once_per_file_and_never_writes_anonymous(tmp_path):
    path = tmp_path / "prefs.jsonl"
    p = open_panel(path)
    assert p.labeler == "" and "Type your name in the Labeler box first" in p.cards.status.value
    p.cards.ranks[0].value, p.cards.ranks[1].value, p.cards.ranks[2].value = "2", "1", "3"
    p.cards.buttons["submit"].click()
    assert not path.exists() and "who is labelling?" in p.cards.status.value  # one line; the ranking stays
    assert [tb.value for tb in p.cards.ranks] == ["2", "1", "3", "4"]
    for blank in ("   ", ""):  # from the box, and from a script
        p.cards.labeler.value = blank
        assert "cannot be empty or only spaces" in p.cards.status.value and p.current_prompt == "q1"
        with pytest.raises(ConfigError, match=r"^labeler = '.*': a labeler name cannot be empty or only spaces"):
            p.labeler = blank
    p.cards.labeler.value = "  ann "  # typed after ranking: the ranking in progress stays
    assert [tb.value for tb in p.cards.ranks] == ["2", "1", "3", "4"]
    p.cards.buttons["submit"].click()
    assert [json.loads(x)["labeler"] for x in path.read_text().splitlines()] == ["ann"]
    again = open_panel(path)  # a new panel (or a kernel restart) on the same file remembers the name
    assert again.labeler == "ann" and again.current_prompt == "q2" and "last labeler" in again.cards.status.value
    labelers.prefers_shorter().label(again)  # a simulated labeler names itself ...
    assert open_panel(path).labeler == "ann"  # ... and is never remembered as the person
    assert open_panel(tmp_path / "other.jsonl").labeler == ""  # per file
    assert "anonymous" not in path.read_text()
    with pytest.raises(ConfigError, match=r"labeler = '  ': a name cannot be only spaces"):
        open_panel(path, labeler="  ")


def test_flag_saves_the_flag_with_no_ranking_and_moves_on(tmp_path):
    path = tmp_path / "prefs.jsonl"
    p = open_panel(path, labeler="ann")
    p.cards.ranks[0].value = "1"  # a half-made ranking does not matter
    record = p.flag(comment="all rude")
    assert record["ranking"] is None and record["flags"] == ["all_bad"] and record["comment"] == "all rude"
    assert p.current_prompt == "q2" and "flagged, no ranking" in p.cards.status.value
    assert p.cards.buttons["submit"].disabled
    p.cards.flag.value = True  # the checkbox alone lets Submit save the prompt unranked
    assert not p.cards.buttons["submit"].disabled and "without a ranking" in p.cards.summary.value
    p.cards.buttons["submit"].click()
    p.submit([0, 1, 2, 3])
    saved = [json.loads(x) for x in path.read_text().splitlines()]
    assert [(r["prompt"], r["ranking"], r["flags"]) for r in saved] == [
        ("q1", None, ["all_bad"]), ("q2", None, ["all_bad"]), ("q3", [0, 1, 2, 3], [])
    ]  # fmt: skip
    prefs = p.preferences
    assert prefs.flagged == 2 and len(prefs.to_pairs(include_flagged=True)) == 6
    p.back()  # the flagged prompt shows as it was saved
    assert p.current_prompt == "q3"
    p.back()
    assert p.current_prompt == "q2" and p.cards.flag.value and "flagged, no ranking" in p.cards.status.value
    assert p.undo()["prompt"] == "q3" and list(p.preferences.history("q3")["action"]) == ["saved", "undone"]
    p.goto(None)
    with pytest.raises(DataError, match="every prompt is labelled"):
        p.flag()
