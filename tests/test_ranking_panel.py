"""The ranking panel driven through its widgets (`.value`, `Button.click()`) and its scripted methods.

No browser: ipywidgets objects work without a front end. tests/browser/ does the same with real clicks.
"""

from __future__ import annotations

import dataclasses
import errno
import html
import itertools
import json
import os
import random
import re
import shutil
import threading
import time
import warnings

import pytest

from rlhf_magic import RankingPanel, labelers, load_preferences
from rlhf_magic.config import RankConfig
from rlhf_magic.engine import generation
from rlhf_magic.errors import ConfigError, DataError
from rlhf_magic.widgets import ranking, ranking_sampler, ranking_store

PROMPTS = ["What is RLHF?", "Name a colour.", "Say hi."]


class FakePolicy:
    """Same interface as PolicyHandle.sample; answers are predictable and calls are recorded."""

    name = "fake-sft"

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[list[str], int, int | None, float]] = []
        self.fail_on = fail_on

    def sample(self, prompts, k, max_new_tokens=64, temperature=0.7, top_p=1.0, seed=None):
        self.calls.append((list(prompts), k, seed, temperature))
        if self.fail_on in prompts:
            raise RuntimeError("generation failed")
        return [[f"{p} / answer {j}" + "." * j for j in range(k)] for p in prompts]


@pytest.fixture
def path(tmp_path):
    return tmp_path / "prefs.jsonl"


def panel(path, **kw):
    kw.setdefault("prompts", PROMPTS)
    if "responses" not in kw:
        kw.setdefault("policy", FakePolicy())
    return RankingPanel(file=path, labeler=kw.pop("labeler", "ann"), **kw)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def click_ranks(p, ranks):
    for j, r in ranks.items():
        p.cards.ranks[j].value = str(r)


def test_submit_stays_disabled_until_the_ranking_is_complete(path):
    p = panel(path)
    submit = p.cards.buttons["submit"]
    assert submit.disabled and "0 / 3" in p.cards.progress.value
    click_ranks(p, {0: 2, 1: 1})
    assert submit.disabled and "2 of 4 ranked" in p.cards.summary.value
    submit.click()  # a click that slips through (Button.click ignores `disabled`) must not save
    assert not path.exists() and "incomplete" in p.cards.status.value
    click_ranks(p, {2: 4})  # the last free rank (3) fills itself in
    assert [tb.value for tb in p.cards.ranks] == ["2", "1", "4", "3"] and not submit.disabled
    assert "Your ranking: <b>B > A > D > C</b>" in p.cards.summary.value
    submit.click()
    (record,) = lines(path)
    assert record["ranking"] == [1, 0, 3, 2] and record["prompt"] == PROMPTS[0]
    assert record["responses"] == [f"{PROMPTS[0]} / answer {j}" + "." * j for j in range(4)]
    assert (record["kind"], record["labeler"], record["policy"], record["flags"]) == ("ranking", "ann", "fake-sft", [])
    assert record["id"] and record["time"].endswith("+00:00")
    assert p.current_prompt == PROMPTS[1] and "1 / 3" in p.cards.progress.value and "Saved" in p.cards.status.value


def test_picking_a_taken_rank_swaps(path):
    p = panel(path)
    click_ranks(p, {0: 1, 1: 2})
    p.cards.ranks[2].value = "1"  # card C takes rank 1: card A gets C's old rank (none), nothing else changes
    assert [tb.value for tb in p.cards.ranks] == ["–", "2", "1", "–"]
    p.cards.ranks[0].value = "2"  # A takes 2 from B; B gets A's old rank (none)
    assert [tb.value for tb in p.cards.ranks] == ["2", "–", "1", "–"] and p.cards.groups() is None


def test_every_submit_appends_and_fsyncs(path, monkeypatch):
    synced = []
    real = ranking_store.os.fsync
    monkeypatch.setattr(ranking_store.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    p = panel(path)
    p.submit([0, 1, 2, 3])
    first = path.read_bytes()
    p.submit([3, 2, 1, 0])
    assert path.read_bytes().startswith(first) and len(lines(path)) == 2
    assert len(synced) >= 2  # one fsync per record (plus the folder's on creation)


def test_flag_comment_and_ties(path):
    p = panel(path, ties=True)
    click_ranks(p, {0: 1, 1: 1, 2: 2})
    assert p.cards.groups() is None  # ties on: no auto-fill, D is still unranked
    click_ranks(p, {3: 2})
    p.cards.flag.value, p.cards.comment.value = True, "  all wrong  "
    p.cards.buttons["submit"].click()
    (record,) = lines(path)
    assert record["ranking"] == [[0, 1], [2, 3]]
    assert record["flags"] == ["all_bad"] and record["comment"] == "all wrong"
    assert p.cards.flag.value is False  # reset for the next prompt
    assert load_preferences(path).ranked()[0].groups == [[0, 1], [2, 3]]


def test_ties_are_refused_without_ties_true(path):
    p = panel(path)
    with pytest.raises(DataError, match="has a tie, but this panel has ties=False"):
        p.submit([0, [1, 2], 3])
    assert not path.exists()


def test_pairwise_choice_with_tie(path):
    p = panel(path, responses=[["yes", "no"], ["up", "down"], ["x", "y"]])
    assert p.cards.ranks == [] and list(p.cards.choice.options) == ["A is better", "Tie", "B is better"]
    assert p.cards.buttons["submit"].disabled
    p.cards.choice.value = "B is better"
    p.cards.buttons["submit"].click()
    p.cards.choice.value = "Tie"
    p.cards.buttons["submit"].click()
    p.submit([0, 1])
    assert [r["ranking"] for r in lines(path)] == [[1, 0], [[0, 1]], [0, 1]]
    assert [r["policy"] for r in lines(path)] == [None, None, None]
    assert load_preferences(path).to_pairs() == [
        {"prompt": PROMPTS[0], "chosen": "no", "rejected": "yes"},
        {"prompt": PROMPTS[2], "chosen": "x", "rejected": "y"},
    ]


def test_the_first_prompt_is_sampled_alone_then_the_next_open_ones_in_one_batched_call(path):
    policy = FakePolicy()
    p = panel(path, policy=policy, k=3, seed=10, temperature=0.9, prefetch=2)
    assert policy.calls == [([PROMPTS[0]], 3, 10, 0.9)]  # the first prompt alone: its answers come soonest
    p.submit([0, 1, 2])
    assert policy.calls[-1] == (PROMPTS[1:], 3, 11, 0.9)  # the next `prefetch`, seeded by the first of them
    assert p.current_responses == [f"{PROMPTS[1]} / answer {j}" + "." * j for j in range(3)]
    p.submit([0, 1, 2])
    assert len(policy.calls) == 2
    p.back()  # a labelled prompt shows its saved answers: no new sampling
    assert len(policy.calls) == 2 and p.current_responses == lines(path)[1]["responses"]


def test_prefetch_one_samples_one_prompt_per_call(path):
    policy = FakePolicy()
    p = panel(path, policy=policy, k=3, seed=10, prefetch=1)
    p.submit([0, 1, 2])
    assert [c[:3] for c in policy.calls] == [([PROMPTS[0]], 3, 10), ([PROMPTS[1]], 3, 11)]
    with pytest.raises(ConfigError, match="prefetch = 0: use a positive integer"):
        panel(path, policy=policy, prefetch=0)


def test_while_answers_are_sampled_the_next_prompt_shows_without_the_old_cards(path):
    seen = []

    class Watching(FakePolicy):
        def sample(self, prompts, k, **kw):
            if hasattr(self, "panel"):
                cards = self.panel.cards
                seen.append((cards.prompt.value, len(cards.cards.children), cards.buttons["submit"].disabled))
            return super().sample(prompts, k, **kw)

    policy = Watching()
    p = panel(path, policy=policy, k=3, prefetch=1)
    policy.panel = p
    p.submit([0, 1, 2])
    shown, n_cards, submit_disabled = seen[-1]
    assert PROMPTS[1] in shown and PROMPTS[0] not in shown and "Sampling answers for prompt 2 of 3" in shown
    assert n_cards == 0 and submit_disabled


def test_skip_leaves_the_prompt_for_later(path):
    p = panel(path)
    p.cards.buttons["skip"].click()
    assert p.current_prompt == PROMPTS[1] and not path.exists()
    p.submit([0, 1, 2, 3])
    p.submit([0, 1, 2, 3])  # prompt 3
    assert p.current_prompt == PROMPTS[0]  # the skipped one comes back
    p.submit([1, 0, 2, 3])
    assert p.done and p.current_prompt is None and p.cards.buttons["submit"].disabled
    assert "Done: all 3 prompts labelled" in p.cards.prompt.value and "3 / 3" in p.cards.progress.value


def test_undo_appends_a_retraction_and_reopens_the_prompt(path):
    p = panel(path)
    p.submit([2, 0, 1, 3])
    p.submit([0, 1, 2, 3])
    before = path.read_bytes()
    p.cards.buttons["undo"].click()
    assert path.read_bytes().startswith(before)  # never rewritten
    last = lines(path)[-1]
    assert last["kind"] == "retraction" and last["retracts"] == lines(path)[1]["id"]
    assert [r["prompt"] for r in load_preferences(path).records] == [PROMPTS[0]]
    assert p.current_prompt == PROMPTS[1] and [tb.value for tb in p.cards.ranks] == ["1", "2", "3", "4"]
    assert "Undone" in p.cards.status.value and "1 / 3" in p.cards.progress.value
    p.undo()
    p.undo()
    assert "Nothing to undo" in p.cards.status.value and len(load_preferences(path, allow_empty=True)) == 0


def test_back_shows_the_saved_ranking_and_submit_replaces_it(path):
    p = panel(path)
    p.submit([2, 0, 1, 3], flag=True, comment="meh")
    p.cards.buttons["back"].click()
    assert p.current_prompt == PROMPTS[0] and p.cards.buttons["submit"].description == "Replace"
    assert [tb.value for tb in p.cards.ranks] == ["2", "3", "1", "4"] and p.cards.flag.value
    p.cards.ranks[3].value = "1"  # D first now; C takes D's old rank 4
    p.cards.buttons["submit"].click()
    first, second = lines(path)
    assert second["replaces"] == first["id"] and second["ranking"] == [3, 0, 1, 2] and second["comment"] == "meh"
    assert [r["id"] for r in load_preferences(path).records] == [second["id"]]
    assert p.cards.buttons["back"].disabled is False
    p.back()
    p.back()
    assert p.current_prompt == PROMPTS[0] and "first prompt" in p.cards.status.value


def test_resume_skips_prompts_this_labeler_already_ranked(path):
    p = panel(path)
    p.submit([0, 1, 2, 3])
    again = panel(path)
    assert again.current_prompt == PROMPTS[1] and again.pending == [1, 2] and "1 / 3" in again.cards.progress.value
    other = panel(path, labeler="bob")
    assert other.current_prompt == PROMPTS[0] and other.pending == [0, 1, 2]
    other.labeler = "ann"  # typing another name re-reads what that labeler has left
    assert other.current_prompt == PROMPTS[1] and "Labelling as ann" in other.cards.status.value


def test_torn_last_line_is_kept_and_the_next_record_starts_a_new_line(path):
    p = panel(path)
    p.submit([0, 1, 2, 3])
    with open(path, "a") as f:
        f.write('{"kind": "ranking", "prompt": "Name a col')  # a crash in the middle of a write
    before = path.read_bytes()
    with pytest.warns(UserWarning, match="line 2: skipped a torn record"):
        resumed = panel(path)
    assert resumed.current_prompt == PROMPTS[1]
    resumed.submit([3, 2, 1, 0])
    assert path.read_bytes().startswith(before + b"\n")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        prefs = load_preferences(path)
    assert [r["ranking"] for r in prefs.records] == [[0, 1, 2, 3], [3, 2, 1, 0]]


def test_two_panels_on_one_file(path):
    ann, bob = panel(path), panel(path, labeler="bob")
    ann.submit([0, 1, 2, 3])
    bob.submit([3, 2, 1, 0])
    ann.submit([1, 0, 2, 3])
    bob.undo()  # bob's own newest record, not ann's newer one
    recs = lines(path)
    assert [r["labeler"] for r in recs] == ["ann", "bob", "ann", "bob"]
    assert recs[-1]["kind"] == "retraction" and recs[-1]["retracts"] == recs[1]["id"]
    assert [(r["labeler"], r["prompt"]) for r in load_preferences(path).records] == [
        ("ann", PROMPTS[0]),
        ("ann", PROMPTS[1]),
    ]
    ann2 = panel(path)  # a second panel of the same labeler: it sees what the first one saved
    ann.submit([0, 1, 2, 3])  # prompt 3, saved by the first panel after the second opened
    ann2.skip()
    assert ann2.done and ann2.current_prompt is None


def test_same_prompt_ranked_in_two_panels_is_replaced_not_duplicated(path):
    a, b = panel(path), panel(path)
    a.submit([0, 1, 2, 3])
    b.submit([3, 2, 1, 0])  # b still showed prompt 1: its ranking replaces a's
    assert lines(path)[1]["replaces"] == lines(path)[0]["id"]
    assert [r["ranking"] for r in load_preferences(path).records] == [[3, 2, 1, 0]]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"prompts": []}, DataError, "prompts is empty"),
        ({"prompts": ["ok", "  "]}, DataError, "prompt 1 is empty"),
        ({"k": 1}, ConfigError, "k = 1: the number of answers per prompt must be an integer from 2 to 9"),
        ({"k": 10}, ConfigError, "k = 10"),
        ({"k": "4"}, ConfigError, "k = '4'"),
        ({"temperature": -1}, ConfigError, "temperature = -1"),
        ({"ties": "yes"}, ConfigError, "ties = 'yes'"),
        ({"policy": None}, ConfigError, "needs policy="),
        ({"policy": 42}, ConfigError, "not a policy"),
        ({"policy": "sft"}, ConfigError, "pass the %%sft result itself"),
        ({"responses": [["a", "b"]]}, ConfigError, "one list of answers per prompt"),
        ({"responses": [["a"], ["b", "c"], ["d", "e"]]}, ConfigError, r"responses\[0\] has 1 answers"),
        ({"responses": [["a", "b"]] * 3, "k": 3}, ConfigError, "expected k = 3"),
        ({"lables": "x"}, ConfigError, "^%rank: unknown setting 'lables' \\(did you mean 'labeler'\\?\\)"),
        ({"prompts": None}, ConfigError, "needs prompts="),
        ({"top_p": 0}, ConfigError, r"top_p = 0: use a number in \(0, 1\]"),
        ({"top_p": 1.5}, ConfigError, "top_p = 1.5"),
        ({"seed": "x"}, ConfigError, "seed = 'x' is not valid; expected int or None"),
        ({"max_new_tokens": 0}, ConfigError, "max_new_tokens = 0: use a positive integer"),
        ({"prefetch": 0}, ConfigError, "prefetch = 0: use a positive integer"),
        ({"labeler": 3}, ConfigError, "labeler = 3 is not valid; expected str"),
        ({"title": 3}, ConfigError, "title = 3 is not valid"),
    ],
)
def test_bad_options_give_one_line_errors(path, kwargs, error, message):
    with pytest.raises(error, match=message) as info:
        panel(path, **kwargs)
    assert "\n" not in str(info.value) and not path.exists()


# The panel's options before RankConfig existed, with their defaults: none may disappear or change.
OPTIONS = {
    "prompts": None,
    "policy": None,
    "responses": None,
    "k": None,
    "file": "preferences.jsonl",
    "ties": False,
    "labeler": "",
    "temperature": 0.7,
    "top_p": 1.0,
    "seed": None,
    "max_new_tokens": 64,
    "prefetch": 8,
    "title": None,
}


def test_rank_config_fields_are_the_panels_options(path):
    assert {f.name: getattr(RankConfig(), f.name) for f in dataclasses.fields(RankConfig)} == OPTIONS
    given = {"k": 3, "ties": True, "temperature": 0.9, "top_p": 0.5, "seed": 1, "max_new_tokens": 5, "prefetch": 2}
    p = panel(path, title="Which is kinder?", **given)  # every field is a keyword of the panel
    rest = {"prompts": PROMPTS, "policy": p.policy, "file": path, "labeler": "ann", "title": "Which is kinder?"}
    assert p.config == RankConfig(**given, **rest)
    assert (p.k, p.ties, p.seed, p.prefetch) == (3, True, 1, 2)
    assert p.sampling == {"max_new_tokens": 5, "temperature": 0.9, "top_p": 0.5}
    again = RankingPanel(config=p.config, k=4)  # a config object, with options on top
    assert again.k == 4 and again.config.title == "Which is kinder?" and again.store.path == p.store.path
    with pytest.raises(ConfigError, match=r"^k = 1: the number of answers"):  # a config made by hand is checked too
        RankingPanel(config=RankConfig(prompts=PROMPTS, policy=FakePolicy(), file=path, k=1))


def test_bad_files_are_refused_and_left_untouched(tmp_path):
    with pytest.raises(DataError, match=r"the folder .* does not exist"):
        panel(tmp_path / "missing" / "prefs.jsonl")
    with pytest.raises(DataError, match=r"use a \.jsonl name"):
        panel(tmp_path / "prefs.csv")
    foreign = tmp_path / "sft.jsonl"
    foreign.write_text('{"prompt": "hi", "response": "hello"}\n')
    with pytest.raises(DataError, match=r"sft.jsonl, line 1: not a preference record"):
        panel(foreign)
    assert foreign.read_text() == '{"prompt": "hi", "response": "hello"}\n'


def test_a_file_that_turns_foreign_is_not_appended_to(path):
    p = panel(path)
    p.submit([0, 1, 2, 3])
    with open(path, "a") as f:
        f.write('{"text": "someone else wrote here"}\n')
    before = path.read_bytes()
    p.cards.ranks[0].value = "1"
    p.cards.ranks[1].value = "2"
    p.cards.ranks[2].value = "3"
    p.cards.buttons["submit"].click()
    assert path.read_bytes() == before and "line 2: not a preference record" in p.cards.status.value


def test_scripted_submit_validates_the_ranking(path):
    p = panel(path)
    for bad, message in [([0, 1, 2], "incomplete"), ([0, 1, 1, 3], "twice"), ([0, 1, 2, 7], "out of range")]:
        with pytest.raises(DataError, match=message):
            p.submit(bad)
    assert not path.exists()


def test_policy_errors_show_in_the_panel_and_block_submit(path):
    p = panel(path, policy=FakePolicy(fail_on=PROMPTS[1]), prefetch=1)
    click_ranks(p, {0: 1, 1: 2, 2: 3})
    p.cards.buttons["submit"].click()
    assert len(lines(path)) == 1  # the ranking was saved before the next prompt failed
    assert "RuntimeError: generation failed" in p.cards.status.value
    assert p.current_responses == [] and p.cards.buttons["submit"].disabled
    p.skip()
    assert p.current_prompt == PROMPTS[2]


def test_simulated_labeler_fills_a_panel_and_two_agree(path):
    first = panel(path, k=4)
    assert labelers.prefers_shorter().label(first) == 3 and first.done
    calls = len(first.policy.calls)
    second = panel(path, responses=first.responses, policy="fake-sft")  # the saved answers: no new sampling
    assert len(first.policy.calls) == calls
    labelers.prefers_longer().label(second)
    prefs = load_preferences(path)
    assert prefs.labelers == ["sim:longer", "sim:shorter"] and len(prefs.to_pairs()) == 2 * 3 * 6
    agr = prefs.agreement()
    assert agr.prompts == 3 and agr.compared == 18 and agr.rate == 0.0  # opposite rules disagree on every pair


def test_rank_magic_opens_and_binds_the_panel(ip, path, monkeypatch):
    ip.user_ns.pop("prefs", None)  # the shell is shared: another test's `prefs` variable would (rightly) refuse NAME
    ip.user_ns["ps"] = PROMPTS
    ip.user_ns["answers"] = [["a", "b", "c"]] * 3
    out = ip.run_line_magic("rank", f'prefs prompts=ps responses=answers file="{path}" labeler="kim"')
    assert isinstance(out, RankingPanel) and ip.user_ns["prefs"] is out and out.labeler == "kim"
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **_: shown.extend(objs))
    ip.display_formatter.format(out)  # what a cell result goes through: the panel shows its widget tree
    assert shown == [out.cards.root]
    res = ip.run_cell(f'%rank bad prompts=ps k=12 file="{path}"')
    assert not res.success and "k = 12" in str(res.error_in_exec) and "\n" not in str(res.error_in_exec)


@pytest.mark.slow
def test_real_tiny_policy_samples_k_answers(path):
    pytest.importorskip("torch")
    from rlhf_magic.api import load_policy

    policy = load_policy("tiny", name="tiny")
    p = panel(path, policy=policy, k=3, max_new_tokens=8, seed=0)
    assert len(p.current_responses) == 3 and all(isinstance(a, str) for a in p.current_responses)
    p.submit([2, 1, 0])
    assert lines(path)[0]["policy"] == "tiny" and lines(path)[0]["responses"] == p.preferences.records[0]["responses"]


# ---- files that cannot be written (issue 19, item 6)
class _Os:
    """`os` with some functions replaced."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


class _NoWrites:
    """`os` as ranking_store sees it, where opening anything under `folder` for writing is refused (EACCES): a
    read-only folder even for root, who may write anywhere otherwise."""

    def __init__(self, folder):
        self.folder = str(folder)

    def __getattr__(self, name):
        return getattr(os, name)

    def open(self, path, flags, *args):
        if str(path).startswith(self.folder) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return os.open(path, flags, *args)


@pytest.mark.parametrize("exists", [False, True])
def test_a_file_that_cannot_be_written_is_refused_when_the_panel_opens(tmp_path, monkeypatch, exists):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "prefs.jsonl"
    if exists:
        path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    before = sorted(folder.iterdir()), path.read_bytes() if exists else None
    if os.geteuid() == 0:
        monkeypatch.setattr(ranking_store, "os", _NoWrites(folder))
    else:
        folder.chmod(0o555)
        if exists:
            path.chmod(0o444)
    with pytest.raises(DataError) as info:
        panel(path)
    message = (
        f"file = '{path}': the panel cannot write there (Permission denied); choose a file in a folder you can write"
    )
    assert str(info.value) == message
    assert (sorted(folder.iterdir()), path.read_bytes() if exists else None) == before  # no probe left behind


def test_a_file_in_a_file_or_a_folder_is_refused(tmp_path):
    (tmp_path / "notes").write_text("a file\n")
    with pytest.raises(DataError, match=r"the folder '.*notes' is a file, not a folder$"):
        panel(tmp_path / "notes" / "prefs.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(DataError, match=r"dir\.jsonl' is a folder"):
        panel(tmp_path / "dir.jsonl")


@pytest.mark.parametrize("fault", ["half a line, then a full disk", "fsync: full disk"])
def test_a_failed_write_keeps_the_ranking_for_a_retry_and_the_file_intact(path, monkeypatch, fault):
    p = panel(path)
    p.submit([0, 1, 2, 3])
    saved = path.read_bytes()

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if fault.startswith("half"):
        faulty = _Os(write=lambda fd, data: os.write(fd, data[: len(data) // 2]) and full())
    else:
        faulty = _Os(fsync=full)
    monkeypatch.setattr(ranking_store, "os", faulty)  # `os` as ranking_store sees it; the real one elsewhere
    click_ranks(p, {0: 2, 1: 1, 2: 3})
    prompt, responses = p.current_prompt, p.current_responses
    p.cards.buttons["submit"].click()
    status = html.unescape(re.sub("<[^>]+>", "", p.cards.status.value))
    assert status == (
        f"could not save to {path}: No space left on device; nothing was written; your ranking is still here: "
        f"Submit again once that is fixed"
    )
    assert path.read_bytes() == saved and len(lines(path)) == 1  # no half-written line, nothing lost
    assert (p.current_prompt, p.current_responses, p.cards.groups()) == (prompt, responses, [[1], [0], [2], [3]])
    monkeypatch.setattr(ranking_store, "os", os)
    p.cards.buttons["submit"].click()  # the same ranking, submitted again
    assert [r["ranking"] for r in lines(path)] == [[0, 1, 2, 3], [1, 0, 2, 3]] and p.current_prompt == PROMPTS[2]


def test_a_folder_removed_after_opening_is_one_line_and_the_ranking_stays(tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    p = panel(folder / "prefs.jsonl")
    shutil.rmtree(folder)
    click_ranks(p, {0: 1, 1: 2, 2: 3})
    p.cards.buttons["submit"].click()
    status = html.unescape(re.sub("<[^>]+>", "", p.cards.status.value))
    assert status.startswith(f"could not save to {folder / 'prefs.jsonl'}: the folder '{folder}' no longer exists;")
    assert "\n" not in status and p.current_prompt == PROMPTS[0] and p.cards.groups() == [[0], [1], [2], [3]]
    with pytest.raises(DataError, match="no longer exists"):  # a script's submit() gets the same one line
        p.submit([0, 1, 2, 3])
    folder.mkdir()
    p.cards.buttons["submit"].click()
    assert len(lines(folder / "prefs.jsonl")) == 1 and p.current_prompt == PROMPTS[1]


# ---- answers sampled in the background while the person labels (issue 20, item 1) ----------------------------------
class GatedPolicy(FakePolicy):
    """Calls after the first `free` ones wait at `gate`; like the engine between two decode steps, they end early
    (SamplingStopped) once the panel's Stop is pressed."""

    def __init__(self, free=0, **kw):
        super().__init__(**kw)
        self.free, self.gate, self.started, self.entered = free, threading.Event(), threading.Event(), []

    def sample(self, prompts, k, **kw):
        self.entered.append(list(prompts))
        self.started.set()
        while len(self.entered) > self.free and not self.gate.wait(0.01):
            if generation.stop_requested():
                raise generation.SamplingStopped("stopped")
        return super().sample(prompts, k, **kw)


class SeededPolicy(FakePolicy):
    """Answers drawn from (seed, the batch's prompts), as a seeded batched call of a real model."""

    def sample(self, prompts, k, seed=None, **kw):
        self.calls.append((list(prompts), k, seed, kw.get("temperature")))
        rng = random.Random(f"{seed}|{'|'.join(prompts)}")
        return [[f"{p} #{rng.randrange(10**9)}" for _ in range(k)] for p in prompts]


class GatedSeeded(GatedPolicy, SeededPolicy):
    pass


class WatchedLock:
    """The panel's lock, noting every thread that comes to take it."""

    def __init__(self, lock):
        self.lock, self.comers = lock, []

    def __enter__(self):
        self.comers.append(threading.current_thread())
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def status(p):
    return html.unescape(re.sub("<[^>]+>", "", p.cards.status.value))


def sampler_threads():
    return [t for t in threading.enumerate() if t.name == ranking_sampler.THREAD_NAME and t.is_alive()]


def until(condition, timeout=10.0):
    """Wait for something another thread does (a timeout is a failure, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def bg_panel():
    """Panels that sample in the background; at the end every one is closed and no sampler thread is left."""
    opened = []

    def make(path, **kw):
        p = panel(path, background=True, **kw)
        opened.append(p)
        return p

    yield make
    for p in opened:
        getattr(p.policy, "gate", threading.Event()).set()
        p.close()
    assert sampler_threads() == []


def test_answers_are_sampled_in_the_background_in_a_kernel_unless_headless(monkeypatch):
    import IPython

    class Shell:
        kernel = None

    monkeypatch.setattr(IPython, "get_ipython", lambda: Shell())
    monkeypatch.delenv("RLHF_MAGIC_HEADLESS", raising=False)
    assert ranking_sampler.background_default() is False  # a shell with no kernel (a script, IPython in a terminal)
    Shell.kernel = object()
    assert ranking_sampler.background_default() is True  # a Jupyter kernel: a front end shows the panel
    monkeypatch.setenv("RLHF_MAGIC_HEADLESS", "1")
    assert ranking_sampler.background_default() is False


def test_the_panel_shows_at_once_and_prompt_1s_cards_come_when_sampled(path, bg_panel):
    policy = GatedPolicy()
    p = bg_panel(path, policy=policy, k=3, prefetch=2)
    assert policy.started.wait(5)  # the panel exists while its first batch is still being sampled
    note, view = p.cards.prompt.value, p._view
    assert "Sampling answers for prompt 1 of 3" in note and PROMPTS[0] in note
    assert p.cards.responses == [] and p.cards.buttons["submit"].disabled and not path.exists()
    assert view.root.layout.display != "none" and (view.bar.value, view.bar.max) == (0, 3)
    assert "0 of 3 prompts ready" in view.text.value and view.stop.layout.display != "none"
    policy.gate.set()
    until(lambda: p.cards.responses)  # shown by the sampler's thread, no call from here
    assert p.current_prompt == PROMPTS[0] and p.cards.responses == [
        f"{PROMPTS[0]} / answer {j}" + "." * j for j in range(3)
    ]
    assert p.wait(timeout=10) and view.root.layout.display == "none"
    assert policy.entered == [[PROMPTS[0]], PROMPTS[1:]]


def test_labelling_goes_on_while_later_batches_are_sampled(path, bg_panel):
    policy = GatedPolicy(free=1)
    p = bg_panel(path, policy=policy, k=3, prefetch=2)
    until(lambda: p.cards.responses and len(policy.entered) == 2)  # prompt 1 shown; prompts 2-3 being sampled
    record = p.submit([2, 0, 1])  # this thread labels meanwhile
    assert lines(path) == [record] and p.sampler.running
    assert p.current_prompt == PROMPTS[1] and p.cards.responses == [] and p.cards.buttons["submit"].disabled
    assert "Sampling answers for prompt 2 of 3 (in one batch with 1 more prompt)" in p.cards.prompt.value
    assert "1 of 3 prompts ready" in p._view.text.value and p._view.bar.value == 1
    p.cards.buttons["submit"].click()  # nothing on screen to rank: nothing written
    assert len(lines(path)) == 1
    policy.gate.set()
    until(lambda: p.cards.responses)
    assert p.current_prompt == PROMPTS[1]
    p.submit([0, 1, 2])
    p.submit([0, 1, 2])
    assert p.done and len(lines(path)) == 3


def test_the_same_seed_gives_the_same_answers_in_the_background_or_not(tmp_path, bg_panel):
    prompts = [f"Prompt {i}?" for i in range(7)]
    kw = {"prompts": prompts, "k": 3, "prefetch": 2, "seed": 5}
    here = panel(tmp_path / "a.jsonl", policy=SeededPolicy(), **kw)
    background = bg_panel(tmp_path / "b.jsonl", policy=GatedSeeded(free=1), **kw)
    until(lambda: background.cards.responses and len(background.policy.entered) == 2)
    for _ in range(5):  # jump to prompt 6 while prompts 2-3 are sampled: its batch (6-7) goes next
        background.skip()
    background.policy.gate.set()
    assert background.wait(timeout=10)
    assert [c[0] for c in background.policy.calls][2] == prompts[5:7]  # sampled out of order...
    assert background.responses == here.responses  # ...with the same answers
    assert [c[2] for c in here.policy.calls] == [5, 6, 8, 10]  # seed + the index of each batch's first prompt


def test_a_real_policy_samples_the_same_answers_in_the_background_or_not(tmp_path, bg_panel):
    from rlhf_magic.api import load_policy

    policy = load_policy("tiny", name="tiny")
    kw = {"policy": policy, "k": 2, "prefetch": 2, "seed": 3, "max_new_tokens": 6}
    here = panel(tmp_path / "a.jsonl", **kw).responses
    background = bg_panel(tmp_path / "b.jsonl", **kw)
    assert background.wait(timeout=60) and background.responses == here


def test_stop_ends_sampling_between_two_decode_steps():
    from rlhf_magic.api import load_policy

    policy = load_policy("tiny", name="tiny")
    checks = itertools.count()
    with generation.stoppable(lambda: next(checks) >= 3), pytest.raises(generation.SamplingStopped):
        policy.sample(["Say hi."], 2, max_new_tokens=40, seed=0)
    assert next(checks) == 4  # three decode steps ran, the fourth check stopped it
    assert generation.MODEL_LOCK.acquire(blocking=False)  # and the models are free again
    generation.MODEL_LOCK.release()
    assert len(policy.sample(["Say hi."], 2, max_new_tokens=4, seed=0)[0]) == 2  # outside `stoppable`: no check


def test_stop_and_close_end_the_sampler_thread(path, bg_panel):
    policy = GatedPolicy()
    p = bg_panel(path, policy=policy, prefetch=2)
    assert policy.started.wait(5) and len(sampler_threads()) == 1
    p._view.stop.click()  # the policy sees Stop at its next step
    assert p.sampler.join(5) and sampler_threads() == [] and policy.calls == []
    assert "Sampling stopped: 0 of 3 prompts have answers" in p._view.text.value
    assert p._view.stop.layout.display == "none" and p._view.bar.layout.display == "none"
    assert "sampling was stopped" in p.cards.prompt.value and p.cards.buttons["submit"].disabled
    assert p.wait(timeout=1) is False
    other = bg_panel(path, policy=GatedPolicy(), prefetch=2)
    assert other.policy.started.wait(5) and len(sampler_threads()) == 1
    other.close()
    assert sampler_threads() == [] and other.cards.root.comm is None and other._view.stop.comm is None


def test_re_running_the_rank_cell_stops_the_earlier_panels_sampler(ip, path, monkeypatch):
    monkeypatch.setattr(ranking, "background_default", lambda: True)  # as in a Jupyter kernel
    policy = GatedPolicy()
    ip.user_ns.pop("prefs", None)  # the shell is shared: another test's `prefs` variable would (rightly) refuse NAME
    ip.user_ns.update(ps=PROMPTS, pol=policy)
    line = f'prefs prompts=ps policy=pol file="{path}" labeler="kim"'
    first = ip.run_line_magic("rank", line)
    assert policy.started.wait(5)
    second = ip.run_line_magic("rank", line)
    assert ip.user_ns["prefs"] is second and first.sampler.stopped and not first.sampler.running
    assert sampler_threads() == [second.sampler.thread]
    second.close()
    assert sampler_threads() == []


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (RuntimeError("generation failed\n  (more detail)"), "RuntimeError: generation failed"),
        (ConfigError("max_new_tokens = 900: the model's context is 512 tokens"), "max_new_tokens = 900: the model's"),
    ],
)
def test_a_sampling_error_in_the_background_is_one_line_in_the_panel(path, bg_panel, error, line):
    class Failing(FakePolicy):
        def sample(self, prompts, k, **kw):
            if PROMPTS[1] in prompts:
                raise error
            return super().sample(prompts, k, **kw)

    p = bg_panel(path, policy=Failing(), prefetch=2)
    with pytest.raises(type(error)):
        p.wait(timeout=10)
    until(lambda: "Sampling failed" in p.cards.status.value)
    assert status(p).startswith(f"Sampling failed: {line}") and "\n" not in status(p)
    assert p.cards.log.outputs == () and line in html.unescape(p._view.text.value)  # no traceback anywhere
    p.submit([0, 1, 2, 3])  # prompt 1 has its answers: it can still be ranked
    assert len(lines(path)) == 1 and p.current_prompt == PROMPTS[1]
    assert f"No answers: sampling failed ({line}" in html.unescape(p.cards.prompt.value)


def test_a_cell_that_needs_the_models_waits_for_the_batch_in_progress(ip, path, bg_panel, monkeypatch):
    policy = GatedPolicy()
    p = bg_panel(path, policy=policy, prefetch=2)
    assert policy.started.wait(5)  # the sampler holds the models for its batch
    said = []
    monkeypatch.setattr(ranking_sampler, "_say", lambda m: (said.append((m, len(policy.calls))), policy.gate.set()))
    res = ip.run_cell("%%sft s\nnot_a_setting = 1")
    assert said == [(said[0][0], 0)] and said[0][0].startswith("Waiting: a ranking panel is sampling answers;")
    assert len(policy.calls) >= 1  # the cell ran once the batch had ended
    assert not res.success and "not_a_setting" in str(res.error_in_exec)
    assert p.wait(timeout=10)  # and sampling went on after it


# ---- no record written twice for one Submit (issue 20, "Bad input") -----------------------------------------------
def test_a_double_click_on_submit_writes_one_record(path):
    p = panel(path)
    click_ranks(p, {0: 2, 1: 1, 2: 3})
    p.cards.buttons["submit"].click()
    p.cards.buttons["submit"].click()  # the second click of a double click reaches the kernel after the first
    assert len(lines(path)) == 1 and "Saved B > A > C > D" in status(p)
    p.cards.ranks[0].value = "1"
    p.cards.buttons["submit"].click()  # once the person works on the next prompt, an early Submit says why
    assert "incomplete" in status(p) and len(lines(path)) == 1


@pytest.mark.parametrize("how", ["click", "submit"])
def test_a_submit_while_the_same_prompt_is_being_written_writes_nothing(path, monkeypatch, how):
    p = panel(path)
    click_ranks(p, {0: 2, 1: 1, 2: 3})
    writing, release, real = threading.Event(), threading.Event(), p.store.append

    def slow_append(record):
        writing.set()
        release.wait(5)
        return real(record)

    monkeypatch.setattr(p.store, "append", slow_append)
    p._lock = watched = WatchedLock(p._lock)
    act = p.cards.buttons["submit"].click if how == "click" else lambda: p.submit([1, 0, 2, 3])
    results = []
    first = threading.Thread(target=lambda: results.append(act()))
    first.start()
    assert writing.wait(5)
    second = threading.Thread(target=lambda: results.append(act()))  # Enter pressed again, or a second call
    second.start()
    until(lambda: second in watched.comers)  # it waits for the panel while the first writes
    release.set()
    first.join(5)
    second.join(5)
    (record,) = lines(path)
    assert record["ranking"] == [1, 0, 2, 3] and p.current_prompt == PROMPTS[1] and p.cards.groups() is None
    if how == "submit":
        assert results == [record, record]  # the second returns the saved record
    assert "Saved B > A > C > D" in status(p)


def test_replace_with_nothing_changed_writes_nothing(path):
    p = panel(path)
    p.submit([2, 0, 1, 3], comment="ok")
    p.back()
    assert p.cards.buttons["submit"].description == "Replace"
    p.cards.buttons["submit"].click()
    assert len(lines(path)) == 1 and p.current_prompt == PROMPTS[1]
    assert "Prompt 1 is already saved as C > A > B > D; nothing changed, so nothing was written" in status(p)
    p.back()
    assert p.submit([2, 0, 1, 3]) == lines(path)[0] and len(lines(path)) == 1  # a script's second submit too
    p.back()
    p.submit([2, 0, 1, 3], comment="changed")  # a change is saved, replacing the first
    assert len(lines(path)) == 2 and lines(path)[1]["replaces"] == lines(path)[0]["id"]


@pytest.mark.parametrize("call", ["sample", "logprobs", "score"])
def test_a_direct_call_waits_for_the_model_lock_before_switching_adapters(pairs, call):
    """A policy or reward model used from the notebook while a panel samples in the background waits for the
    models: it must not switch the shared base model's adapters under the batch in progress."""
    from rlhf_magic import api
    from rlhf_magic.engine.adapters import use_adapter

    a = api.sft("lock_a", model="tiny", data=pairs, max_steps=1, progress=False)
    if call == "score":
        b = api.reward("lock_rm", model=a, data=[{"prompt": "p", "chosen": "x", "rejected": "y"}] * 4, progress=False)
    else:
        b = api.sft("lock_b", model=a, data=pairs, max_steps=1, progress=False)  # its adapter on a's model
    assert a.lm is b.lm and a.adapter != b.adapter
    run = {
        "sample": lambda: b.sample(["Say hi."], 1, max_new_tokens=2, seed=0),
        "logprobs": lambda: b.logprobs(["Say hi."], ["hi"]),
        "score": lambda: b.score(["Say hi."], ["hi"]),
    }[call]
    done: list = []
    tuner = a.lm.peft.base_model
    with generation.MODEL_LOCK, use_adapter(a.lm, a.adapter):  # what the background sampler holds for a batch
        waiting = threading.Thread(target=lambda: done.append(run()))
        waiting.start()
        waiting.join(1.0)
        assert waiting.is_alive() and not done  # it waits for the lock...
        assert list(tuner.active_adapters) == [a.adapter]  # ...without touching the adapters in use
    waiting.join(60)
    assert done and list(tuner.active_adapters) != [b.adapter]
