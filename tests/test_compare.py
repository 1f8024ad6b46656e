"""%compare: the pure `compare()`/`Comparison`, the panel driven by `Button.click()`, and the magic.

The policies are real tiny handles: the untrained base model (greedy: empty answers) and a 3-step SFT of it
(greedy: runs of "T"), so the two sides give different answers and a mix-up of A and B shows.
"""

from __future__ import annotations

import dataclasses
import html
import re

import pytest

from rlhf_magic import labelers
from rlhf_magic.comparison import Comparison, compare, wilson_interval
from rlhf_magic.config import CompareConfig
from rlhf_magic.errors import ConfigError, DataError, RLHFError
from rlhf_magic.session import Session
from rlhf_magic.widgets.compare import ComparePanel, balanced_sides

PROMPTS = [
    "What is 1 plus 1?",
    "Say hi.",
    "Name a colour.",
    "Why?",
    "What is 3 plus 3?",
    "Count to three.",
    "Hello?",
    "What is 5 plus 5?",
]
FAST = {"max_new_tokens": 8}


def length(prompts, responses):
    """A rule reward: longer is better."""
    return [float(len(r)) for r in responses]


@pytest.fixture(scope="module")
def policies():
    from rlhf_magic.api import load_policy, sft

    pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(40)]
    base = load_policy("tiny", name="base")
    tuned = sft("tuned", model="tiny", data=pairs, max_steps=3, lr=3e-3, progress=False)
    return base, tuned


def blind_panel(policies, **kw):
    return ComparePanel(*policies, prompts=PROMPTS, blind=True, **FAST, **kw)


def test_wilson_interval_matches_hand_computed_values():
    # 8 of 10: p = 0.8, z = 1.96 -> centre (0.8 + 0.19207) / 1.38415 = 0.71674, half-width 0.22658
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    low, high = wilson_interval(0, 10)  # never 0 wide: the upper end is 2 * 0.19207 / 2 / 1.38415 * 2 = 0.2775
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)


def test_win_rate_counts_a_tie_as_half_a_win():
    cmp = Comparison([f"p{i}" for i in range(10)], ["x"] * 10, ["y"] * 10, names=("sft", "ppo"))
    assert cmp.win_rate().rate is None and cmp.win_rate().interval is None and "no judgements" in str(cmp.win_rate())
    cmp.judge(0, "a")  # replaced below: the newest verdict for a row counts
    for i, w in enumerate(["b"] * 7 + ["tie", "tie", "a"]):
        cmp.judge(i, w, by="sim:rule" if i < 2 else "ann")
    b = cmp.win_rate()
    assert (b.policy, b.opponent, b.wins, b.ties, b.losses, b.n, b.simulated) == ("ppo", "sft", 7, 2, 1, 10, 2)
    assert b.rate == pytest.approx(0.8)  # (7 + 2/2) / 10: the same interval as 8 of 10
    assert b.interval == pytest.approx((0.4902, 0.9433), abs=1e-4)
    a = cmp.win_rate("sft")
    assert a.rate == pytest.approx(0.2) and a.interval == pytest.approx((1 - 0.9433, 1 - 0.4902), abs=1e-4)
    assert cmp.win_rate("A") == a and "half a win" in str(b) and "2 of 10 judgements are SIMULATED" in str(b)
    assert cmp.judgements[0] == "b" and cmp.judges[9] == "ann" and cmp.winner_name(7) == "tie"
    assert cmp.to_pandas()["winner"].tolist() == ["b"] * 7 + ["tie", "tie", "a"]
    with pytest.raises(ConfigError, match="neither side"):
        cmp.judge(0, "left")
    with pytest.raises(DataError, match="row 10 does not exist"):
        cmp.judge(10, "a")


def test_compare_generates_and_scores_in_one_batch_per_policy(policies, monkeypatch):
    base, tuned = policies
    gen_calls, score_calls = [], []
    for handle in policies:
        real = handle.generate
        monkeypatch.setattr(handle, "generate", lambda p, _r=real, **kw: gen_calls.append(list(p)) or _r(p, **kw))

    def rule(prompts, responses):
        score_calls.append(list(prompts))
        return length(prompts, responses)

    cmp = compare(base, tuned, PROMPTS, rule, **FAST)
    assert gen_calls == [PROMPTS, PROMPTS] and score_calls == [PROMPTS, PROMPTS]
    monkeypatch.undo()
    assert [r.answer_a for r in cmp.rows] == base.generate(PROMPTS, **FAST)  # A is the first policy, greedy
    assert [r.answer_b for r in cmp.rows] == tuned.generate(PROMPTS, **FAST)
    assert any(r.answer_a != r.answer_b for r in cmp.rows)  # the sides differ, so a swap would show
    for r in cmp.rows:
        assert (r.score_a, r.score_b) == (len(r.answer_a), len(r.answer_b))
    means = cmp.mean_scores
    assert means == pytest.approx(
        {"base": sum(len(r.answer_a) for r in cmp.rows) / 8, "tuned": sum(len(r.answer_b) for r in cmp.rows) / 8}
    )
    df = cmp.to_pandas()
    assert list(df.columns) == ["prompt", "answer_a", "answer_b", "score_a", "score_b"]
    assert df.attrs["policies"] == {"a": "base", "b": "tuned"} and df["score_b"].tolist() == [
        r.score_b for r in cmp.rows
    ]
    page = cmp._repr_html_()
    assert "A = base" in page and "B = tuned" in page and "mean reward" in page and html.escape(PROMPTS[0]) in page
    assert compare(base, tuned, PROMPTS, **FAST).mean_scores is None  # no reward, no scores


def test_same_policy_twice_gets_distinct_names(policies):
    cmp = compare(policies[0], policies[0], PROMPTS[:2], length, **FAST)
    assert cmp.names == ("base (A)", "base (B)") and set(cmp.mean_scores) == {"base (A)", "base (B)"}


def test_table_panel_shows_answers_scores_and_means(policies):
    p = ComparePanel(*policies, prompts=PROMPTS, reward=length, **FAST)
    assert not p.blind and p.buttons == {} and p.current_answers is None
    assert "mean reward: base" in html.unescape(p.table.value) and "score A" in p.table.value
    assert p.comparison.mean_scores["tuned"] == pytest.approx(sum(r.score_b for r in p.comparison.rows) / 8)
    with pytest.raises(ConfigError, match="blind mode"):
        p.pick("left")


def test_sides_are_balanced_vary_across_prompts_and_are_fixed_by_seed():
    sides = balanced_sides(8, seed=0)
    assert sides.count("a") == sides.count("b") == 4 and sides == balanced_sides(8, seed=0)
    assert len({tuple(balanced_sides(8, seed=s)) for s in range(5)}) > 1  # the seed changes the order
    assert sorted(balanced_sides(7, seed=3).count(x) for x in "ab") == [3, 4]


def test_a_click_on_left_credits_the_policy_shown_on_the_left(policies):
    p = blind_panel(policies, seed=5)
    assert p.on_left == blind_panel(policies, seed=5).on_left and set(p.on_left) == {"a", "b"}
    for i in range(len(PROMPTS)):
        row, left = p.comparison.rows[i], p.on_left[i]
        shown = (row.answer_a, row.answer_b) if left == "a" else (row.answer_b, row.answer_a)
        assert p.index == i and p.current_answers == shown and f"Pair {i + 1} of 8" in p.prompt.value
        assert (html.escape(shown[0]) or "(empty answer)") in p.answers["left"].value
        on_screen = [p.prompt, p.progress, p.status, p.result, p.table, *p.answers.values()]
        assert not any(name in w.value for w in on_screen for name in ("base", "tuned"))  # blind: no names
        p.buttons["left"].click()
        assert p.comparison.judgements[i] == left
    wr = p.comparison.win_rate()
    assert (wr.wins, wr.losses, wr.ties, wr.simulated) == (p.on_left.count("b"), p.on_left.count("a"), 0, 0)
    assert p.done and p.index is None and all(b.disabled for b in p.buttons.values())
    assert "95% CI" in p.result.value and "A: base" in p.table.value  # revealed at the end
    assert "8 / 8" in p.progress.value and p.bar.value == 8


def test_right_and_tie_buttons_progress_and_errors(policies):
    p = blind_panel(policies)
    assert p.result.value == "" and p.table.value == ""  # nothing revealed while judging
    first, second = p.on_left[0], p.on_left[1]
    p.buttons["right"].click()
    p.buttons["tie"].click()
    assert p.comparison.judgements == {0: "ab"[first == "a"], 1: "tie"}
    assert "2 / 8" in p.progress.value and p.bar.value == 2 and "Saved: Tie for pair 2" in p.status.value
    assert p.pick("LEFT") == p.on_left[2] and second in "ab"
    with pytest.raises(ConfigError, match="use 'left', 'right' or 'tie'"):
        p.pick("up")
    for _ in range(5):
        p.pick("tie")
    with pytest.raises(DataError, match="every pair is judged"):
        p.pick("left")
    p.buttons["left"].click()  # Button.click ignores `disabled`: the panel says why nothing happened
    assert "every pair is judged" in p.status.value and len(p.comparison.judgements) == 8


def test_simulated_labeler_judges_the_rest_and_says_so(policies):
    p = blind_panel(policies, labeler="kim")
    p.pick("left")
    assert p.judge_with(labelers.prefers_shorter()) == 7 and p.done
    assert p.comparison.judges[0] == "kim" and set(list(p.comparison.judges.values())[1:]) == {"sim:shorter"}
    for i, r in list(enumerate(p.comparison.rows))[1:]:
        if len(r.answer_a) != len(r.answer_b):  # equal lengths fall in random order
            assert p.comparison.judgements[i] == ("a" if len(r.answer_a) < len(r.answer_b) else "b")
    assert "SIMULATED" in p.status.value and "7 of 8 judgements are SIMULATED" in p.result.value
    auto = blind_panel(policies, labeler=labelers.prefers_longer())  # judged at once: headless tutorials
    assert auto.done and auto.comparison.win_rate().simulated == 8 and "SIMULATED" in auto.status.value
    with pytest.raises(ConfigError, match="give a simulated labeler"):
        blind_panel(policies).judge_with()


def test_n_takes_a_seeded_sample_of_the_prompts(policies):
    p = ComparePanel(*policies, prompts=PROMPTS, n=3, seed=1, **FAST)
    chosen = [r.prompt for r in p.comparison.rows]
    assert len(chosen) == 3 and chosen == [x for x in PROMPTS if x in chosen]  # original order kept
    assert chosen == [r.prompt for r in ComparePanel(*policies, prompts=PROMPTS, n=3, seed=1, **FAST).comparison.rows]
    every = ComparePanel(*policies, prompts=PROMPTS, n=20, **FAST)
    assert len(every.comparison) == 8 and "n = 20 but there are 8" in every.status.value


def test_names_are_looked_up_in_the_session(policies):
    session = Session()
    for h in policies:
        session.add(h)
    p = ComparePanel("base", "tuned", prompts=PROMPTS[:2], reward=length, session=session, **FAST)
    assert p.comparison.names == ("base", "tuned")
    with pytest.raises(RLHFError, match="no result named 'tunde'"):
        ComparePanel("base", "tunde", prompts=PROMPTS[:2], session=session)


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"prompts": []}, DataError, "prompts is empty"),
        ({"prompts": None}, ConfigError, "needs prompts="),
        ({"a": length}, ConfigError, "policy A = .* is not a policy"),
        ({"b": "tuned"}, ConfigError, "policy B = 'tuned' is not a policy"),
        ({"reward": lambda p, r: [1.0]}, DataError, "reward returned 1 scores for 8 answers of base"),
        ({"reward": lambda p, r: None}, DataError, "expected a list of numbers"),
        ({"reward": lambda p, r: [float("nan")] * len(r)}, DataError, "scores must be finite"),
        ({"reward": 3}, ConfigError, "reward = 3 is not a reward"),
        ({"n": 0}, ConfigError, "n = 0"),
        ({"n": True}, ConfigError, "n = True"),
        ({"blind": "yes"}, ConfigError, "blind = 'yes'"),
        ({"temperature": -1}, ConfigError, "temperature = -1"),
        ({"max_new_tokens": 0}, ConfigError, "max_new_tokens = 0"),
        ({"labeler": labelers.prefers_shorter()}, ConfigError, "add blind=True"),
        ({"rewrad": length}, ConfigError, "^%compare: unknown setting 'rewrad' \\(did you mean 'reward'\\?\\)"),
    ],
)
def test_bad_input_is_one_line(policies, kw, error, message):
    args = {"a": policies[0], "b": policies[1], "prompts": PROMPTS, **FAST, **kw}
    with pytest.raises(error, match=message) as info:
        ComparePanel(args.pop("a"), args.pop("b"), **args)
    assert "\n" not in str(info.value)


def test_compare_magic(ip, policies, monkeypatch):
    ip.user_ns.update(base=policies[0], tuned=policies[1], ps=PROMPTS, rule=length)
    out = ip.run_line_magic("compare", "base tuned prompts=ps reward=rule max_new_tokens=8")
    assert isinstance(out, ComparePanel) and out.comparison.names == ("base", "tuned") and len(out.comparison) == 8
    assert out.comparison.mean_scores["tuned"] == pytest.approx(sum(r.score_b for r in out.comparison.rows) / 8)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda *objs, **_: shown.extend(objs))
    ip.display_formatter.format(out)  # a cell result shows the panel's widget tree
    assert shown == [out.root]
    blind = ip.run_line_magic("compare", "base tuned prompts=ps blind=True n=4 seed=3 max_new_tokens=8")
    assert blind.blind and len(blind.comparison) == 4 and blind.current_answers is not None
    for line, message in [
        ("base tuned prompts=ps n=0", "n = 0"),
        ("base rule prompts=ps", "policy B = <function length"),
        ("base", "needs two policies"),
        ("base tunde prompts=ps", "no result named 'tunde'"),
        ("base tuned prompts=ps reward=rul", "no notebook variable named 'rul'"),
    ]:
        res = ip.run_cell(f"%compare {line}")
        assert not res.success and message in str(res.error_in_exec), (line, res.error_in_exec)
        assert "\n" not in str(res.error_in_exec)


def test_a_reward_handle_is_scored_through_its_reward_method_and_else_its_score_method(policies):
    class Handle:  # the RewardHandle interface: .name, .score (logits) and .reward (what PPO optimises)
        name = "rm"

        def score(self, prompts, responses):
            raise AssertionError("compare must call .reward when there is one")

        def reward(self, prompts, responses):
            return [-float(len(r)) for r in responses]

        def __call__(self, prompts, responses):
            raise AssertionError("compare must call .reward")

    cmp = compare(*policies, PROMPTS[:3], Handle(), **FAST)
    assert cmp.reward == "rm" and [r.score_b for r in cmp.rows] == [-len(r.answer_b) for r in cmp.rows]

    class Scorer:  # only .score: another library's reward model, say
        name = "other"

        def score(self, prompts, responses):
            return [float(len(r)) for r in responses]

    cmp = compare(*policies, PROMPTS[:3], Scorer(), **FAST)
    assert [r.score_a for r in cmp.rows] == [len(r.answer_a) for r in cmp.rows]


def _helper(n):
    return {}["missing"] if n else 0


def brevity(prompts, responses):
    n = len(responses)
    return [_helper(n) for _ in responses]  # raises in _helper: the line named is this one, in brevity


def test_a_reward_that_raises_is_one_line_naming_it_and_keeps_the_original(policies):
    from rlhf_magic.errors import UserFunctionError

    line = brevity.__code__.co_firstlineno + 2
    with pytest.raises(UserFunctionError) as info:
        compare(*policies, PROMPTS[:2], brevity, **FAST)
    assert str(info.value) == f"reward brevity() raised KeyError at line {line}: 'missing'"
    cause = info.value.__cause__
    assert isinstance(cause, KeyError) and cause.__traceback__ is not None  # what %tb shows

    class Scorer:
        name = "rm"

        def score(self, prompts, responses):
            return [1 / 0 for _ in responses]

    with pytest.raises(UserFunctionError) as info:
        compare(*policies, PROMPTS[:2], Scorer(), **FAST)
    line = Scorer.score.__code__.co_firstlineno + 1
    assert str(info.value) == f"reward rm.score() raised ZeroDivisionError at line {line}: division by zero"
    with pytest.raises(DataError, match="expected a list of numbers"):  # the package's own errors pass unchanged
        compare(*policies, PROMPTS[:2], lambda p, r: None, **FAST)


def test_the_package_attribute_compare_is_not_shadowed_by_a_submodule():
    # a submodule rlhf_magic/compare.py would replace the lazy `rlhf_magic.compare` function once imported
    import importlib.util

    import rlhf_magic
    from rlhf_magic import api

    assert importlib.util.find_spec("rlhf_magic.compare") is None
    if not hasattr(api, "compare"):
        pytest.skip("rlhf_magic.api does not re-export compare yet")
    assert rlhf_magic.compare is compare and rlhf_magic.Comparison is Comparison


class EchoPolicy:
    """The PolicyHandle.generate interface without a model: answers are predictable, calls are recorded."""

    def __init__(self, name):
        self.name, self.calls = name, []

    def generate(self, prompts, **sampling):
        self.calls.append(sampling)
        return [f"{self.name}: {p}" for p in prompts]


# %compare's options before CompareConfig existed, with their defaults: none may disappear or change.
OPTIONS = {
    "prompts": None,
    "reward": None,
    "blind": False,
    "n": None,
    "max_new_tokens": 64,
    "temperature": 0.0,
    "seed": 0,
    "labeler": None,
}


def test_compare_config_fields_are_the_panels_options():
    assert {f.name: getattr(CompareConfig(), f.name) for f in dataclasses.fields(CompareConfig)} == OPTIONS
    a, b = EchoPolicy("a"), EchoPolicy("b")
    given = {"blind": True, "n": 3, "max_new_tokens": 5, "temperature": 0.5, "seed": 2, "labeler": "kim"}
    p = ComparePanel(a, b, PROMPTS, length, **given)  # prompts and reward stay positional, like compare()'s
    assert p.config == CompareConfig(prompts=PROMPTS, reward=length, **given)
    assert p.blind and len(p.comparison) == 3 and p.person == "kim" and p.comparison.reward == "length"
    assert a.calls == b.calls == [{"max_new_tokens": 5, "temperature": 0.5, "seed": 2}]
    again = ComparePanel(a, b, config=p.config, blind=False)  # a config object, with options on top
    assert not again.blind and [r.prompt for r in again.comparison.rows] == [r.prompt for r in p.comparison.rows]
    with pytest.raises(ConfigError, match=r"^n = 0: the number of prompts"):  # a config made by hand is checked too
        ComparePanel(a, b, config=CompareConfig(prompts=PROMPTS, n=0))


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens = 0: use a positive integer"),
        ({"max_new_tokens": 2.5}, "max_new_tokens = 2.5 is not valid; expected int"),
        ({"temperature": float("nan")}, "temperature = nan: use a number >= 0"),
        ({"temperature": "hot"}, "temperature = 'hot' is not valid; expected float"),
        ({"seed": 1.5}, "seed = 1.5 is not valid; expected int or None"),
        ({"seed": True}, "seed = True is not valid"),
    ],
)
def test_compare_function_checks_sampling_like_the_panel(kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        compare(EchoPolicy("a"), EchoPolicy("b"), PROMPTS, **kw)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=re.escape(message)):
        ComparePanel(EchoPolicy("a"), EchoPolicy("b"), PROMPTS, **kw)


def test_labeler_must_be_a_name_or_a_simulated_labeler():
    with pytest.raises(ConfigError, match="labeler = 3: give your name, or a simulated labeler"):
        ComparePanel(EchoPolicy("a"), EchoPolicy("b"), PROMPTS, labeler=3)
