"""%%reward on the tiny model: the K-way loss in the engine, learning a rule, normalisation, save/load, the magic.

The loss formula itself (six pairs of A > C > B > D against a plain loop, ties, K = 2) is tested on tensors in
tests/test_ops.py; here the same check runs through the engine's RankingLoss on real model scores.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from planted import q_rankings

from rlhf_magic import api, labelers
from rlhf_magic.config import RewardConfig
from rlhf_magic.engine import reward as R
from rlhf_magic.engine import reward_model
from rlhf_magic.engine.handles import PolicyHandle
from rlhf_magic.engine.models import LoadedModel
from rlhf_magic.errors import ConfigError, DataError, ModelError
from rlhf_magic.preferences import Preferences


def pair_accuracy(handle, records) -> float:
    right = total = 0
    for r in records:
        s = handle.score([r["prompt"]] * len(r["responses"]), r["responses"])
        for better, worse in itertools.combinations(r["ranking"], 2):
            right, total = right + (s[better] > s[worse]), total + 1
    return right / total


FAST = {"model": "tiny", "progress": False, "lr": 3e-3, "batch_size": 4}


def train(**settings):
    """api.reward on the tiny model with fast settings; `settings` override them."""
    return api.reward("rm", **{**FAST, **settings})


# ------------------------------------------------------------------------------------ the loss in the engine
def test_ranking_loss_on_model_scores_matches_a_loop_over_the_six_pairs(runtime):
    """Issue item 3 through the engine: A > C > B > D, one forward of the 4 answers, -1/6 sum log sigmoid."""
    lm = runtime.load("tiny")
    head = reward_model.make_head(lm.model.config.hidden_size, runtime.device)
    answers = ["answer A", "answer B is longer", "C", "answer D!"]
    rows = [reward_model.answer_ids(lm.tokenizer, "Rank these.", a, 64) for a in answers]
    item = R.Item("Rank these.", answers, rows, [[0], [2], [1], [3]])
    batch = R.collate([item], lm.tokenizer.pad_token_id)
    scores = reward_model.last_token_scores(lm.model, head, batch["input_ids"], batch["attention_mask"]).detach()
    order = [0, 2, 1, 3]  # A > C > B > D
    for margin in (0.0, 0.5):
        want = -sum(F.logsigmoid(scores[w] - scores[lo] - margin) for w, lo in itertools.combinations(order, 2)) / 6
        loss, metrics = reward_model.RankingLoss(lm.model, head, margin)(**batch)
        torch.testing.assert_close(loss.detach(), want)
    right = sum(bool(scores[w] > scores[lo]) for w, lo in itertools.combinations(order, 2)) / 6
    assert float(metrics["train/accuracy"]) == pytest.approx(right)
    assert (head.weight.std().item() - 1 / math.sqrt(lm.model.config.hidden_size + 1)) < 0.05


def test_a_k_way_record_is_one_forward_of_its_k_answers_each_once(monkeypatch):
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = reward_model.last_token_scores

    def spy(model, head, ids, mask, prefix=None):
        if torch.is_grad_enabled():  # training forwards only (eval and scoring run under no_grad)
            assert not any(m.training for m in model.modules()), "dropout must be off while training"
            rows.append((ids.clone(), mask.clone()))
        return real(model, head, ids, mask, prefix)

    monkeypatch.setattr(reward_model, "last_token_scores", spy)
    rec = {"prompt": "Rank these.", "responses": ["alpha", "beta beta", "gamma!", "d"], "ranking": [0, 2, 1, 3]}
    h = train(data=[rec], max_steps=3, batch_size=1, eval_fraction=0, normalize=False,
                   lora={"dropout": 0.5})  # fmt: skip
    assert len(rows) == 3  # one forward per step, not one per pair
    want = [reward_model.answer_ids(h.tokenizer, rec["prompt"], a, h.max_length) for a in rec["responses"]]
    for ids, mask in rows:
        assert ids.shape[0] == 4  # K rows; a pair trainer would run 2 * C(4, 2) = 12
        assert [ids[i][mask[i].bool()].tolist() for i in range(4)] == want
        assert all(r[-1] == h.tokenizer.eos_token_id for r in want)


# ------------------------------------------------------------------------------------ learning and scoring
def test_accuracy_rises_far_above_chance_on_a_rule_the_random_model_does_not_know():
    records = q_rankings(64)
    before = {}

    def at_start(ev):
        if ev.kind == "start":
            before["acc"] = pair_accuracy(ev.payload["handle"], records)

    events = []
    h = train(data=records, max_steps=8, normalize=False, callbacks=[at_start, events.append])
    assert before["acc"] < 0.6  # chance is 0.5: the untrained model does not count q's
    assert h.accuracy is not None and h.accuracy >= 0.85, h.metrics["eval/accuracy"]
    assert h.metrics.summary["eval/accuracy"] == h.accuracy
    steps = [e for e in events if e.kind == "step"]
    assert all({"train/loss", "train/accuracy"} <= e.metrics.keys() for e in steps)
    assert "eval/accuracy" in steps[-1].metrics and h.metrics["train/loss"][-1] < h.metrics["train/loss"][0]
    hist = next(e for e in events if e.kind == "histogram").payload["series"]
    held = round(0.2 * 64)
    assert len(hist["chosen"]) == len(hist["rejected"]) == 6 * held
    assert statistics.fmean(hist["chosen"]) > statistics.fmean(hist["rejected"])
    table = next(e for e in events if e.kind == "samples").payload["rows"]
    assert [r["rank"] for r in table] == ["top 1", "top 2", "top 3", "bottom 1", "bottom 2", "bottom 3"]
    scores = [r["score"] for r in table]
    assert scores[:3] == sorted(scores[:3], reverse=True) and scores[2] > scores[3] and scores[3:] == sorted(scores[3:])


def test_scores_are_deterministic_in_eval_mode_whatever_the_batch():
    records = q_rankings(8)
    h = train(data=records, max_steps=2, normalize=False, lora={"dropout": 0.5})
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    answers = [a for r in records for a in r["responses"]]
    first = h.score(prompts, answers)
    h.lm.model.train()  # someone else left the shared model in train mode: LoRA dropout would be live
    again = h.score(prompts, answers)
    assert h.lm.model.training, "score() must restore the mode it found"
    h.lm.model.eval()
    one_by_one = h.score(prompts, answers, batch_size=1)
    assert first == again
    assert one_by_one == pytest.approx(first, abs=1e-5)
    assert isinstance(first[0], float) and len(first) == len(answers)
    assert h.score(prompts[0], answers[0]) == pytest.approx(first[:1], abs=1e-5)
    with pytest.raises(DataError, match="2 prompts and 1 responses"):
        h.score(prompts[:2], answers[:1])


def test_normalisation_uses_sft_samples_on_training_prompts_and_survives_save_and_load(tmp_path, monkeypatch):
    drawn = {}
    real = R.sample_sft

    def keep(*args):
        drawn["prompts"], drawn["answers"] = out = real(*args)
        return out

    monkeypatch.setattr(R, "sample_sft", keep)
    records = q_rankings(12)
    sft = api.sft("sft", model="tiny", data=[{"prompt": r["prompt"], "response": "qq"} for r in records],
                  max_steps=2, progress=False)  # fmt: skip
    h = train(model=sft, data=records, max_steps=3, normalize="gain", eval_fraction=0.25)
    prompts, answers = drawn["prompts"], drawn["answers"]
    unique = list(dict.fromkeys(prompts))
    assert len(answers) == 2 * len(unique) == 2 * (12 - 3)  # two answers for each training prompt
    assert sft.sample(unique, 2, max_new_tokens=48, temperature=0.7, seed=0) == [
        answers[i : i + 2] for i in range(0, len(answers), 2)
    ]  # drawn from the SFT policy itself
    scores = h.reward(prompts, answers)
    assert abs(statistics.fmean(scores)) < 1e-4 and statistics.stdev(scores) == pytest.approx(1.0, abs=1e-4)
    assert h.score(prompts, answers) == pytest.approx([s / h.gain + h.mean for s in scores], abs=1e-4)
    assert h.gain != 1.0 and h.lm is sft.lm and h.adapter != sft.adapter  # an adapter on the shared base
    assert h.lineage == {"model": "sft", "preferences": "12 rankings"}

    out = h.save(tmp_path / "rm")
    meta = json.loads((out / "rlhf_magic.json").read_text())
    assert (meta["mean"], meta["gain"], meta["kind"]) == (h.mean, h.gain, "reward")
    back = api.load_reward(str(out))
    assert back.reward(prompts, answers) == pytest.approx(scores, abs=1e-4)
    assert (back.mean, back.gain, back.accuracy, back.lineage) == (h.mean, h.gain, h.accuracy, h.lineage)
    assert not list(tmp_path.glob(".rm-*"))
    with pytest.raises(ModelError, match="not a saved reward model"):
        api.load_reward(str(tmp_path))


def test_full_finetuning_normalises_on_the_weights_it_started_from(monkeypatch):
    drawn = {}
    real = R.sample_sft

    def keep(*args):
        drawn["out"] = real(*args)
        return drawn["out"]

    monkeypatch.setattr(R, "sample_sft", keep)
    h = train(data=q_rankings(8), max_steps=2, lora=False, eval_fraction=0)
    prompts, answers = drawn["out"]
    unique = list(dict.fromkeys(prompts))
    base = api.load_policy("tiny")
    assert base.sample(unique, 2, max_new_tokens=48, temperature=0.7, seed=0) == [
        answers[i : i + 2] for i in range(0, len(answers), 2)
    ]
    assert h.adapter is None and h.lm.model is not base.lm.model
    assert statistics.fmean(h.reward(prompts, answers)) == pytest.approx(0.0, abs=1e-4)


def test_every_data_form_gives_the_same_rankings(tmp_path):
    prefs = Preferences.from_records([*q_rankings(5), {"prompt": "p", "chosen": "good", "rejected": "bad"}])
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in prefs.records))
    want = [(r.prompt, r.responses, r.groups) for r in prefs.ranked()]
    forms = [prefs, prefs.records, prefs.to_pandas(), prefs.to_dataset(), str(path), path]
    for data in forms:
        got = R.to_preferences(data)
        assert [(r.prompt, r.responses, r.groups) for r in got.ranked()] == want, type(data)
    pairs = R.to_preferences(prefs.to_dataset(pairs=True)).ranked()
    assert len(pairs) == 5 * 6 + 1 and all(r.groups == [[0], [1]] for r in pairs)


def test_flagged_prompts_are_left_out_of_training_and_the_run_says_how_many(recwarn):
    ranked = q_rankings(3)
    flagged = [{**ranked[2], "flags": ["all_bad"]}, {**ranked[0], "prompt": "unranked", "ranking": None,
                                                     "flags": ["all_bad"]}]  # fmt: skip
    data = [*ranked[:2], *flagged]
    for include, trained, notes in [(False, 2, ["left out 2 flagged prompt(s)"]), (True, 3, [])]:
        events = []
        train(data=data, max_steps=1, eval_fraction=0, normalize=False, include_flagged=include,
              callbacks=[events.append])  # fmt: skip
        start = next(e for e in events if e.kind == "start")
        assert start.payload["train"] == trained  # the flagged prompt without a ranking never trains
        said = [e.payload for e in events if e.kind == "warning"]
        assert [w.split(" (")[0] for w in said] == notes and all("include_flagged = True" in w for w in said)
    assert not [w for w in recwarn if "flagged" in str(w.message)]  # training never goes through to_pairs


def test_the_text_view_prints_the_flag_note_as_one_warning_line():
    from rlhf_magic.events import Emitter
    from rlhf_magic.widgets.live import TextView

    prefs = Preferences.from_records([GOOD, {**GOOD, "prompt": "p1", "flags": ["all_bad"]}])
    view = TextView("%%reward rm", [("loss", ["train/loss"])])
    said = r"^%%reward rm: left out 1 flagged prompt\(s\) \(all answers bad or unsafe\); include_flagged = True"
    with pytest.warns(UserWarning, match=said) as got:
        assert len(R.drop_flagged(prefs, False, Emitter("reward", [view]))) == 1
    assert len(got) == 1 and "\n" not in str(got[0].message)


# ------------------------------------------------------------------------------------ the magic and bad input
def test_reward_magic_trains_on_the_ranking_panels_preferences(ip, tmp_path, pairs):
    ip.user_ns.update(demos=pairs, prompts=[f"What is {i} plus {i}?" for i in range(6)])
    assert ip.run_cell("%%sft sft\nmodel = 'tiny'\ndata = demos\nmax_steps = 2\n").success
    ip.run_line_magic("rank", f'panel policy=sft prompts=prompts k=4 file="{tmp_path / "p.jsonl"}" max_new_tokens=8')
    assert labelers.prefers_longer(seed=0).label(ip.user_ns["panel"]) == 6
    res = ip.run_cell("%%reward rm\ndata = panel.preferences\nmax_steps = 3\nbatch_size = 2\nlr = 3e-3\n")
    assert res.success, res.error_in_exec
    rm, session, sft = ip.user_ns["rm"], ip.user_ns["rlhf"], ip.user_ns["sft"]
    assert session["rm"] is rm and session.latest("reward") is rm
    assert rm.lineage == {"model": "sft", "preferences": str(tmp_path / "p.jsonl")}  # model defaulted to the SFT
    assert rm.lm is sft.lm and rm.metrics.summary["steps"] == 3
    scores = rm.score(["What is 1 plus 1?"] * 2, ["2", "The answer is 2."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores)


def _other_tokenizer_policy(runtime) -> PolicyHandle:
    lm = runtime.load("tiny")
    tok = copy.deepcopy(lm.tokenizer)
    tok.add_tokens(["<|extra|>"])
    return PolicyHandle("other", "sft", LoadedModel("tiny-extra", lm.model, tok, "tiny"), runtime=runtime)


GOOD = {"prompt": "p0", "responses": ["a", "b"], "ranking": [1, 0]}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([GOOD, {"prompt": "p1", "responses": ["a", "b"], "ranking": [0, 2]}],
         "record 1: ranking [0, 2]: index 2 is out of range for 2 answers (0..1)"),
        ([GOOD, {"prompt": "p1", "responses": ["a", "b"], "ranking": [1, 1]}],
         "record 1: ranking [1, 1] names answer 1 twice"),
        ([GOOD, {"prompt": "p1", "responses": ["a"], "ranking": [0]}],
         "record 1: a ranking needs at least 2 answers, got 1"),
        ([], "no preferences yet: rank the answers above first"),
        (Preferences([], source="prefs.jsonl"), "no preferences in prefs.jsonl yet: rank the answers above first"),
        ([GOOD, {**GOOD, "prompt": "p1", "policy": "other"}],
         "record 1 (prompt 'p1'): its answers come from policy 'other', whose tokenizer differs from that of "
         "model 'tiny'"),
        ([{**GOOD, "ranking": [[0, 1]]}],
         "the preferences have no comparison to learn from: every ranking ties all its answers"),
        ([{**GOOD, "flags": ["all_bad"]}, {**GOOD, "prompt": "p1", "ranking": None, "flags": ["all_bad"]}],
         "all 2 ranked prompts are flagged (all answers bad or unsafe): nothing to learn; include_flagged = True"),
    ],
)  # fmt: skip
def test_bad_input_is_one_usage_error_line_naming_the_record(ip, capsys, data, message):
    session = ip.user_ns["rlhf"]
    session.add(_other_tokenizer_policy(session.runtime))
    ip.user_ns["bad_data"] = data  # not `prefs`: the shell is shared, and %rank prefs in a later test must not meet it
    capsys.readouterr()
    res = ip.run_cell("%%reward broken\nmodel = 'tiny'\ndata = bad_data\nmax_steps = 1\n")
    err = capsys.readouterr().err
    assert not res.success
    assert f"UsageError: {message}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "broken" not in ip.user_ns and [h.name for h in session] == ["other"]


def test_the_tokenizer_check_passes_when_the_policy_shares_the_tokenizer(runtime):
    lm = runtime.load("tiny")
    same = PolicyHandle("sft", "sft", lm, runtime=runtime)
    prefs = Preferences.from_records([{**GOOD, "policy": "sft"}])
    cfg = RewardConfig(model="tiny", data=prefs)
    R.check_tokenizers(prefs, lm, cfg, {"sft": same})
    with pytest.raises(DataError, match=r"^record 0 \(prompt 'p0'\): .*policy 'sft'"):
        R.check_tokenizers(prefs, lm, cfg, {"sft": _other_tokenizer_policy(runtime)})


@pytest.mark.parametrize(
    ("setting", "message"),
    [({"eval_fraction": 1.0}, "eval_fraction = 1.0: use a number from 0"), ({"batch_size": 0}, "batch_size = 0: use")],
)
def test_bad_settings_are_one_line_errors(setting, message):
    with pytest.raises(ConfigError, match=message):
        train(**setting, data=[GOOD])


def test_a_stacked_adapter_policy_cannot_seed_a_lora_reward_model(runtime):
    ppo = PolicyHandle("ppo", "ppo", runtime.load("tiny"), runtime=runtime, adapter=["sft-1", "ppo-2"])
    with pytest.raises(ConfigError, match="model = ppo: a policy of stacked adapters"):
        train(model=ppo, data=[GOOD])


# ------------------------------------------------------------------------------------ the live view
def test_text_view_prints_the_histogram_summary():
    import io

    from rlhf_magic.events import Event
    from rlhf_magic.widgets.live import TextView

    out = io.StringIO()
    view = TextView("%%reward rm", [("loss", ["train/loss"])], stream=out)
    view(Event("histogram", "reward", payload={"title": "scores", "series": {"chosen": [1.0, 3.0], "rejected": []}}))
    assert "chosen: n=2 mean=2.000 min=1.000 max=3.000" in out.getvalue() and "rejected: n=0" in out.getvalue()


# ------------------------------------------------------------------------------------ the embedded model
@pytest.mark.slow
def test_reward_model_on_the_embedded_model_trains_and_scores():
    records = [
        {
            "prompt": p,
            "responses": [f"{p} Yes, gladly.", "No.", f"Here is a careful answer to: {p}"],
            "ranking": [2, 0, 1],
        }
        for p in ["How do I boil an egg?", "Why is the sky blue?", "Name a colour.", "What is 2 + 2?"]
    ]
    h = api.reward("rm", model="smollm2-135m", data=records, max_steps=2, batch_size=2, max_length=96,
                   eval_fraction=0, progress=False)  # fmt: skip
    assert h.metrics.summary["steps"] == 2 and math.isfinite(h.metrics.summary["train/loss"])
    scores = h.score([r["prompt"] for r in records], [r["responses"][0] for r in records])
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores)
    assert h.adapter and h.lm.spec == "smollm2-135m" and h.metrics.summary["norm/samples"] == 8
