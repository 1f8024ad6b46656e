"""Preferences: validation, retractions, torn lines, pairs, DataFrame/Dataset, agreement, simulated labelers."""

from __future__ import annotations

import json
import subprocess
import sys

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


def test_ties_give_no_pair_and_flags_can_be_dropped():
    prefs = Preferences.from_records([rec([0, [1, 2], 3]), rec([[0, 1]], responses=["x", "y"], flags=["all_bad"])])
    assert len(prefs.to_pairs()) == 5  # 6 pairs minus the tied one; the all-tie pair gives none
    assert ("bravo", "charlie") not in {(p["chosen"], p["rejected"]) for p in prefs.to_pairs()}
    flagged = Preferences.from_records([rec([0, 1, 2, 3], flags=["all_bad"]), rec([1, 0], responses=["x", "y"])])
    assert len(flagged.to_pairs()) == 7 and flagged.to_pairs(skip_flagged=True) == [
        {"prompt": "p", "chosen": "y", "rejected": "x"}
    ]


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
    prefs = Preferences.from_records([rec([0, [1, 2], 3], labeler="ann"), rec([3, 2, 1, 0], labeler="bob")])
    df = prefs.to_pandas()
    assert list(df["labeler"]) == ["ann", "bob"] and df.loc[0, "ranking"] == [0, [1, 2], 3]
    assert len(prefs.to_pandas(pairs=True)) == 5 + 6
    ds = prefs.to_dataset(pairs=True)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 11
    rows = prefs.to_dataset()
    assert len(rows) == 2 and json.loads(rows[0]["ranking"]) == [0, [1, 2], 3]
    assert "2 ranked prompts" in repr(prefs) and "11 pairs" in repr(prefs)


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


def test_agreement_counts_pairs_both_labelers_ranked():
    # bob saw the same answers in another order: answers are matched by text, not position
    shuffled = ["charlie", "alpha", "delta", "bravo"]
    prefs = Preferences.from_records(
        [
            rec([0, 1, 2, 3], labeler="ann"),  # alpha > bravo > charlie > delta
            rec([1, 3, 0, 2], labeler="bob", responses=shuffled),  # alpha > bravo > charlie > delta
            rec([0, 1, 2, 3], labeler="cat"),
            rec([1, 0, 2, 3], labeler="cat"),  # cat's later ranking wins: bravo > alpha > charlie > delta
            rec([0, 1, 2, 3], labeler="ann", prompt="only ann"),  # ranked once: not compared
        ]
    )
    agr = prefs.agreement()
    # ann~bob agree on all 6 pairs; ann~cat and bob~cat on 5 of 6 (alpha vs bravo flipped)
    assert (agr.compared, agr.agreed, agr.prompts) == (18, 16, 1)
    assert agr.rate == pytest.approx(16 / 18)
    assert agr.by_labelers == {("ann", "bob"): 1.0, ("ann", "cat"): 5 / 6, ("bob", "cat"): 5 / 6}


def test_agreement_ties_and_no_overlap():
    tie = Preferences.from_records([rec([[0, 1], 2, 3], labeler="a"), rec([[0, 1], 3, 2], labeler="b")])
    assert tie.agreement().rate == pytest.approx(5 / 6)  # the tie matches; charlie vs delta does not
    alone = Preferences.from_records([rec([0, 1, 2, 3], labeler="a"), rec([0, 1, 2, 3], labeler="b", prompt="q")])
    assert alone.agreement().rate is None and "no prompt was ranked by two labelers" in repr(alone.agreement())


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
