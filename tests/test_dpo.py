"""%%dpo: the losses against plain loops, one forward per answer, a reference computed once and never changed,
learning a planted rule, bad input, the magic, the CLI and (slow) two processes."""

from __future__ import annotations

import json
import math

import pytest
import torch
from planted import q_rankings

from rlhf_magic import api, ops, ops_pref
from rlhf_magic.engine import dpo as D
from rlhf_magic.engine.handles import PolicyHandle
from rlhf_magic.engine.models import LoadedModel
from rlhf_magic.errors import ConfigError

# A > C > B > D; A > B = C > D (a tie); a plain pair; B = C > A (a tie on top)
RANKINGS = [[[0], [2], [1], [3]], [[0], [2, 1], [3]], [[1], [0]], [[1, 2], [0]]]
SIZES = [4, 4, 2, 3]


def _better_worse(groups):
    """Every (better, worse) pair of one ranking: tied answers share a group and are never compared."""
    return [(w, lo) for i, g in enumerate(groups) for worse in groups[i + 1 :] for w in g for lo in worse]


def _split(values, sizes):
    out, at = [], 0
    for k in sizes:
        out.append(values[at : at + k])
        at += k
    return out


# ------------------------------------------------------------------------------------ the maths
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_pair_losses_match_a_loop_over_every_pair_of_every_ranking_with_ties(loss, beta):
    r = torch.randn(sum(SIZES), dtype=torch.float64)
    want = 0.0
    for groups, rs in zip(RANKINGS, _split(r.tolist(), SIZES)):
        per_pair = []
        for w, lo in _better_worse(groups):
            d = rs[w] - rs[lo]
            per_pair.append(
                -math.log(1 / (1 + math.exp(-beta * d))) if loss == "sigmoid" else (d - 1 / (2 * beta)) ** 2
            )
        want += sum(per_pair) / len(per_pair)  # each prompt weighs the same
    pairs = ops.ranking_pairs(RANKINGS, SIZES)
    got = ops_pref.dpo_loss(r, pairs, beta=beta, loss=loss)
    assert float(got) == pytest.approx(want / len(RANKINGS), rel=1e-7)  # the weights are float32


def test_plackett_luce_matches_a_loop_over_each_ranking_with_ties():
    r, beta = torch.randn(sum(SIZES), dtype=torch.float64), 0.3
    want = 0.0
    for groups, rs in zip(RANKINGS, _split(r.tolist(), SIZES)):
        s = [beta * x for x in rs]
        nll = 0.0
        for gi, group in enumerate(groups):
            below = [j for worse in groups[gi + 1 :] for j in worse]
            for i in group:  # picked from itself and everything ranked below it; tied peers are not in its pool
                nll -= s[i] - math.log(sum(math.exp(s[j]) for j in [i, *below]))
        want += nll
    terms = ops_pref.listwise_terms(RANKINGS, SIZES)
    got = ops_pref.dpo_loss(r, ops.ranking_pairs(RANKINGS, SIZES), beta=beta, loss="plackett_luce", listwise=terms)
    assert float(got) == pytest.approx(want / len(RANKINGS), rel=1e-7)  # the weights are float32
    # a strict ranking: -log prod_k exp(s_k) / sum_{j >= k} exp(s_j), the DPO paper's appendix A.3
    s = [beta * x for x in r[:4].tolist()]
    order = [0, 2, 1, 3]
    prob = math.prod(math.exp(s[k]) / sum(math.exp(s[j]) for j in order[n:]) for n, k in enumerate(order))
    one = ops_pref.listwise_terms([RANKINGS[0]], [4])
    assert float(ops_pref.plackett_luce_loss(beta * r[:4], one)) == pytest.approx(-math.log(prob), rel=1e-12)


def test_plackett_luce_at_k_2_is_sigmoid_dpo_with_the_same_gradient():
    rankings, sizes = [[[0], [1]], [[1], [0]], [[0], [1]]], [2, 2, 2]
    pairs, terms = ops.ranking_pairs(rankings, sizes), ops_pref.listwise_terms(rankings, sizes)
    r = torch.randn(6, dtype=torch.float64, requires_grad=True)
    losses = {}
    for loss in ("sigmoid", "plackett_luce"):
        value = ops_pref.dpo_loss(r, pairs, beta=0.2, loss=loss, listwise=terms)
        (grad,) = torch.autograd.grad(value, r)
        losses[loss] = (value.detach(), grad)
    torch.testing.assert_close(losses["sigmoid"][0], losses["plackett_luce"][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(losses["sigmoid"][1], losses["plackett_luce"][1], rtol=1e-12, atol=1e-15)


def test_implicit_reward_metrics_match_a_loop_with_ties():
    r, beta = torch.randn(sum(SIZES), dtype=torch.float64), 0.25
    r[11] = r[12]  # B = C on top of the last ranking: tied, so no pair between them
    sums = {"chosen": 0.0, "rejected": 0.0, "accuracies": 0.0, "margins": 0.0}
    for groups, rs in zip(RANKINGS, _split(r.tolist(), SIZES)):
        pairs = _better_worse(groups)
        for w, lo in pairs:
            cw, cl = beta * rs[w], beta * rs[lo]
            for key, value in (("chosen", cw), ("rejected", cl), ("accuracies", float(cw > cl)), ("margins", cw - cl)):
                sums[key] += value / len(pairs) / len(RANKINGS)
    got = ops_pref.reward_metrics(r, ops.ranking_pairs(RANKINGS, SIZES), beta)
    for key, value in sums.items():
        assert float(got[f"rewards/{key}"]) == pytest.approx(value, rel=1e-7, abs=1e-7), key


def test_sequence_logps_sum_real_tokens_and_ignore_padding():
    lp = torch.tensor([[-1.0, -2.0, float("nan")], [-0.5, float("inf"), float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = ops_pref.sequence_logps(lp, mask)
    assert out.tolist() == [-3.0, -0.5]
    out.sum().backward()
    assert lp.grad.tolist() == [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------ the engine
FAST = {"policy": "tiny", "progress": False, "lr": 3e-3, "batch_size": 4}


def train(**settings):
    """api.dpo on the tiny model with fast settings; `settings` override them."""
    return api.dpo("dpo", **{**FAST, **settings})


def test_a_k_way_ranking_is_one_forward_of_its_k_answers_in_eval_mode(monkeypatch):
    seen: list[tuple[torch.Tensor, torch.Tensor, int]] = []
    real = D.response_logprobs

    def spy(model, ids, mask, start, **kw):
        if torch.is_grad_enabled():  # training forwards (the reference and the report run under no_grad)
            assert not any(m.training for m in model.modules()), "dropout must be off: the reference has none"
            seen.append((ids.clone(), mask.clone(), start))
        return real(model, ids, mask, start, **kw)

    monkeypatch.setattr(D, "response_logprobs", spy)
    rec = {"prompt": "Rank these.", "responses": ["alpha", "beta beta", "gamma!", "d"], "ranking": [0, 2, 1, 3]}
    h = train(data=[rec], max_steps=3, batch_size=1, eval_fraction=0, lora={"dropout": 0.5})
    assert len(seen) == 3  # one forward per step, not one per pair
    tok = h.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)  # fmt: skip
    want = [tok(prompt + a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in rec["responses"]]
    for ids, mask, start in seen:
        assert ids.shape[0] == 4  # K rows; a pair trainer would run 2 * C(4, 2) = 12
        assert [ids[i][mask[i].bool()].tolist() for i in range(4)] == want
        assert ids.shape[1] - start == max(len(a) for a in rec["responses"]) + 1  # the head sees the answers only


@pytest.fixture(scope="module")
def sft_policy():
    demos = [{"prompt": r["prompt"], "response": r["responses"][r["ranking"][0]]} for r in q_rankings(16, seed=1)]
    return api.sft("sft", model="tiny", data=demos, max_steps=2, lr=3e-3, progress=False, lora={"r": 4})


def test_the_reference_is_computed_once_and_never_changes(monkeypatch, sft_policy):
    calls, batches = [], []
    real_logps, real_forward = D.answer_logps, D.PreferenceLoss.forward

    def spy_logps(lm, adapter, items, **kw):
        calls.append((adapter, len(items)))
        return real_logps(lm, adapter, items, **kw)

    def spy_forward(self, *args, **kw):
        batches.append(kw["ref_logps"].clone())
        return real_forward(self, *args, **kw)

    kept = {}
    real_set = D.set_reference

    def spy_set(ref, items, *args):
        real_set(ref, items, *args)
        kept["items"], kept["ref"] = items, [list(it.ref) for it in items]

    real_trainables = D.trainables

    def spy_trainables(*args):
        lm, adapter, params = real_trainables(*args)
        kept["start"] = [p.detach().clone() for p in params]
        return lm, adapter, params

    monkeypatch.setattr(D, "trainables", spy_trainables)
    monkeypatch.setattr(D, "answer_logps", spy_logps)
    monkeypatch.setattr(D.PreferenceLoss, "forward", spy_forward)
    monkeypatch.setattr(D, "set_reference", spy_set)
    sft_before = [p.detach().clone() for p in sft_policy.trainable_parameters()]
    records = q_rankings(12, seed=2)
    h = api.dpo("dpo", policy=sft_policy, data=records, epochs=3, batch_size=4, lr=3e-3, progress=False)
    # one reference pass, on the SFT adapter, over every ranking; training then reuses it in all 3 epochs
    assert [c for c in calls if c[0] == sft_policy.adapter] == [(sft_policy.adapter, 12)]
    assert h.adapter[0] == sft_policy.adapter and len(h.adapter) == 2  # the new adapter is stacked on the SFT one
    assert h.metrics.summary["steps"] == 9 and len(batches) == 9
    stored = {round(x, 6) for ref in kept["ref"] for x in ref}
    assert all({round(x, 6) for x in b.tolist()} <= stored for b in batches)
    assert [list(it.ref) for it in kept["items"]] == kept["ref"]  # never overwritten
    # the reference never changed: its weights, and the log-probs an independent path computes now
    for a, b in zip(sft_before, sft_policy.trainable_parameters()):
        assert torch.equal(a, b)
    items = kept["items"]
    now = sft_policy.logprobs(
        [it.prompt for it in items for _ in it.responses], [a for it in items for a in it.responses]
    )
    assert now == pytest.approx([x for ref in kept["ref"] for x in ref], abs=1e-4)
    # and every weight that trains moved
    assert len(kept["start"]) == len(h.trainable_parameters()) > 0
    for start, p in zip(kept["start"], h.trainable_parameters()):
        assert not torch.equal(start, p.detach())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "plackett_luce"])
def test_training_raises_the_held_out_implicit_reward_accuracy_on_a_planted_rule(loss):
    """The more 'q's an answer has, the better (a rule the random tiny model does not know)."""
    events = []
    h = train(data=q_rankings(64), max_steps=8, loss=loss, callbacks=[events.append])
    m, s = h.metrics, h.metrics.summary
    # step 1 runs on the starting weights: policy = reference, so every implicit reward is 0 (a tie is not right)
    assert m["train/rewards/accuracies"][0] == 0.0 and m["train/rewards/margins"][0] == 0.0
    start = {"sigmoid": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2, "plackett_luce": math.log(24)}[loss]  # K = 4
    assert m["train/loss"][0] == pytest.approx(start, rel=1e-4)
    assert s["eval/rewards/accuracies"] >= 0.75 and s["eval/rewards/margins"] > 0, s
    assert s["eval/rewards/chosen"] > s["eval/rewards/rejected"]
    assert m["train/loss"][-1] < m["train/loss"][0] and s["eval/loss"] < m["train/loss"][0]
    steps = [e for e in events if e.kind == "step"]
    assert all({"train/loss", "train/rewards/accuracies", "train/rewards/margins"} <= e.metrics.keys() for e in steps)
    assert {"eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"} <= steps[-1].metrics.keys()
    hist = next(e for e in events if e.kind == "histogram").payload["series"]
    assert len(hist["chosen"]) == len(hist["rejected"]) == 6 * round(0.2 * 64)
    assert h.stage == "dpo" and h.parents == ("tiny", "64 rankings")


def test_full_finetuning_trains_a_copy_and_leaves_the_reference_weights_alone():
    base = api.load_policy("tiny")
    before = [p.detach().clone() for p in base.lm.model.parameters()]
    h = train(policy=base, data=q_rankings(32), max_steps=4, lora=False, lr=1e-3)
    assert h.lm.model is not base.lm.model and h.adapter is None
    assert all(torch.equal(a, b) for a, b in zip(before, base.lm.model.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(before, h.trainable_parameters()))
    assert h.metrics["train/loss"][-1] < h.metrics["train/loss"][0]


# ------------------------------------------------------------------------------------ bad input
def test_answers_cut_by_max_length_are_counted_in_one_line():
    long = {"prompt": "p", "responses": ["x" * 40, "y" * 4, "z" * 22], "ranking": [0, 1, 2]}  # 41, 5, 23 tokens
    short = {"prompt": "q", "responses": ["a", "b"], "ranking": [1, 0]}
    flagged = {**short, "prompt": "r", "flags": ["all answers are bad or unsafe"]}  # left out, as %%reward does
    events = []
    h = train(data=[long, short, flagged], max_steps=1, max_length=24, eval_fraction=0, callbacks=[events.append])
    warnings = [e.payload for e in events if e.kind == "warning"]
    assert warnings == [
        "left out 1 flagged prompt(s) (all answers bad or unsafe); include_flagged = True keeps those with a ranking",
        "1 of 5 answers do not fit max_length = 24 with their prompt and were cut at the end (EOS too; the longest "
        "has 41 tokens): raise max_length to train on whole answers",
    ]
    assert h.metrics.summary["truncated"] == 1
    items, _ = D.load_rankings(D.to_preferences([long]), h.lm, 24)
    assert [len(items[0].query) + len(a) for a in items[0].answers] == [24, 6, 24]
    eos = h.tokenizer.eos_token_id  # the prompt keeps 1 token: 23 are left, exactly the z answer's
    assert [a[-1] == eos for a in items[0].answers] == [False, True, True]
    assert D.load_rankings(D.to_preferences([long]), h.lm, 64)[1].count == 0


def _other_tokenizer_policy(runtime) -> PolicyHandle:
    import copy

    lm = runtime.load("tiny")
    tok = copy.deepcopy(lm.tokenizer)
    tok.add_tokens(["<|extra|>"])
    return PolicyHandle("other", "sft", LoadedModel("tiny-extra", lm.model, tok, "tiny"), runtime=runtime)


GOOD = {"prompt": "p0", "responses": ["a", "b"], "ranking": [1, 0]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("data = prefs\nreference = other\n",
         "reference = other: its tokenizer differs from that of policy tiny (260 vs 259 tokens); DPO scores the "
         "same tokens under both, so use a reference with the policy's tokenizer, or leave reference unset (the "
         "policy as it starts)"),
        ("data = prefs\nloss = 'dpo'\n",
         "line 3: loss = 'dpo' is not valid; expected 'sigmoid' or 'ipo' or 'plackett_luce'"),
        ("data = prefs\nbeta = 0\n", "line 3: beta = 0: use a number > 0"),
        ("data = prefs\nbeat = 0.2\n", "line 3: unknown setting 'beat' (did you mean 'beta'?)"),
        ("", "data is required: Preferences from the ranking panel, ranking records or pairs, or a path"),
        ("data = prefs\nreference = 3\n", "reference = 3 is not valid; expected a policy handle"),
        ("data = prefs\npolicy = 'runs/none'\n", "policy = 'runs/none': no such folder"),
        ("data = tied\n", "the preferences have no comparison to learn from: every ranking ties all its answers"),
    ],
)  # fmt: skip
def test_bad_input_is_one_usage_error_line(ip, capsys, body, message):
    session = ip.user_ns["rlhf"]
    session.add(_other_tokenizer_policy(session.runtime))
    ip.user_ns.update(other=session["other"], prefs=[GOOD], tied=[{**GOOD, "ranking": [[0, 1]]}])
    capsys.readouterr()
    res = ip.run_cell("%%dpo broken\nmax_steps = 1\n" + body + ("" if "policy" in body else "policy = 'tiny'\n"))
    err = capsys.readouterr().err
    assert not res.success
    assert f"UsageError: {message}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "broken" not in ip.user_ns and [h.name for h in session] == ["other"]


def test_a_revision_names_a_hub_model_not_a_handle(runtime):
    with pytest.raises(ConfigError, match=r"^revision = 'main' applies to a hub model id, not to the policy 'p'$"):
        train(policy=PolicyHandle("p", "sft", runtime.load("tiny"), runtime=runtime), data=[GOOD], revision="main")


# ------------------------------------------------------------------------------------ the magic and the CLI
def test_dpo_magic_trains_from_the_latest_sft_result_and_registers_it(ip, pairs):
    ip.user_ns.update(demos=pairs, prefs=q_rankings(12), prompts=["Say something, 1."])
    assert ip.run_cell("%%sft sft\nmodel = 'tiny'\ndata = demos\nmax_steps = 2\n").success
    res = ip.run_cell("%%dpo dpo\ndata = prefs\nmax_steps = 2\nloss = 'plackett_luce'\nbeta = 0.2\n")
    assert res.success, res.error_in_exec
    dpo, sft, session = ip.user_ns["dpo"], ip.user_ns["sft"], ip.user_ns["rlhf"]
    assert session["dpo"] is dpo and session.latest("policy", "dpo") is dpo
    assert dpo.stage == "dpo" and dpo.parents == ("sft", "12 rankings") and dpo.lm is sft.lm
    assert dpo.adapter[0] == sft.adapter and (dpo.config.loss, dpo.config.beta) == ("plackett_luce", 0.2)
    assert "dpo" in repr(session) and "sft, 12 rankings" in repr(session)
    assert len(dpo.generate(["Say something, 1."], max_new_tokens=4)) == 1
    doc = ip.find_cell_magic("dpo").__doc__
    assert "beta" in doc and "plackett_luce" in doc and "lora.r" in doc
    panel = ip.run_line_magic("compare", "sft dpo prompts=prompts max_new_tokens=4")
    assert panel.comparison.names == ("sft", "dpo")


def test_cli_trains_from_a_saved_policy_folder_and_saves_a_loadable_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from rlhf_magic.cli import build_parser, main

    sft = api.sft("sft", model="tiny", data=[{"prompt": "p", "response": "q"}] * 4, max_steps=1, progress=False)
    sft.save(tmp_path / "sft")
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in q_rankings(10)))
    cfg = tmp_path / "dpo.toml"
    cfg.write_text(f'policy = "{tmp_path / "sft"}"\ndata = "{tmp_path / "prefs.jsonl"}"\nmax_steps = 2\n'
                   f'lr = 0.003\nbeta = 0.2\noutput_dir = "{tmp_path / "out"}"\n[lora]\nr = 4\n')  # fmt: skip
    assert main(["dpo", str(cfg), "--summary", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["num_processes"] == 1 and summary["metrics"]["steps"] == 2 and summary["param_checksums"][0] > 0
    assert "eval/rewards/accuracies" in summary["metrics"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == 2
    assert json.loads((tmp_path / "out" / "rlhf_magic.json").read_text())["stage"] == "dpo"
    text = build_parser()._subparsers._group_actions[0].choices["dpo"].format_help()
    assert "(default 0.1, > 0)" in text and "plackett_luce" in text


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes_train_dpo_data_parallel(runs, sft_run):
    from launches import check_common, launch

    config = ('policy = "sft"\ndata = "prefs.jsonl"\nbatch_size = 4\nlr = 0.003\neval_fraction = 0.2\n'
              'output_dir = "dpo"\n[lora]\nr = 4\n')  # fmt: skip
    run = launch(runs, "dpo", config)
    check_common(run, runs / "dpo")
    metrics = run["summary"]["metrics"]
    assert metrics["steps"] == 2  # 16 training prompts, 4 a batch, split over 2 processes
    assert 0.0 <= metrics["eval/rewards/accuracies"] <= 1.0 and "train/rewards/margins" in run["logs"][0]["history"][0]
    assert run["logs"][0]["saved"] == [str((runs / "dpo").resolve())]


def test_bad_loss_names_reach_ops_as_one_line():
    with pytest.raises(ConfigError, match=r"^loss = 'kto' is not valid; expected one of 'sigmoid', 'ipo'"):
        ops_pref.dpo_loss(torch.zeros(2), ops.ranking_pairs([[[0], [1]]]), beta=0.1, loss="kto")
