"""GRPO and RLOO: the group maths against reference loops, and the stage on the tiny model (learns a rule reward,
starts at KL 0, counts groups with equal rewards, resumes, runs from the magic and the CLI)."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import sys

import pytest
import torch

from rlhf_magic import api, ops_group
from rlhf_magic.errors import ConfigError
from rlhf_magic.ops import kl_per_token

PROMPTS = [f"List letters {i}" for i in range(32)]
FAST = {"steps": 2, "batch_size": 2, "num_generations": 4, "max_new_tokens": 6, "progress": False}


# ------------------------------------------------------------------------------------------------ the maths
def _groups(rewards: list[float], g: int) -> list[list[float]]:
    return [rewards[i : i + g] for i in range(0, len(rewards), g)]


def _reference_advantages(rewards: list[float], g: int, scale: bool, algorithm: str) -> list[float]:
    out = []
    for group in _groups(rewards, g):
        equal = statistics.stdev(group) < 1e-8
        for i, r in enumerate(group):
            if equal:
                out.append(0.0)
            elif algorithm == "rloo":
                out.append(r - sum(x for j, x in enumerate(group) if j != i) / (g - 1))
            else:
                a = r - statistics.fmean(group)
                out.append(a / (statistics.stdev(group) + 1e-4) if scale else a)
    return out


@pytest.mark.parametrize(("scale", "algorithm"), [(True, "grpo"), (False, "grpo"), (True, "rloo")])
def test_group_advantages_match_a_reference_loop(scale, algorithm):
    rng = random.Random(1)
    rewards = [rng.uniform(-2, 3) for _ in range(6 * 4)] + [0.5] * 4  # the last group: every reward equal
    out = ops_group.group_advantages(torch.tensor(rewards), 4, scale_rewards=scale, algorithm=algorithm)
    expected = _reference_advantages(rewards, 4, scale, algorithm)
    torch.testing.assert_close(out.advantages, torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.zero_std.tolist() == [False] * 6 + [True]
    torch.testing.assert_close(out.std, torch.tensor([statistics.stdev(x) for x in _groups(rewards, 4)]))


def test_rloo_baseline_exactly():
    """Each answer against the mean of the other G - 1 of its group, never scaled (1 - 11/3, 2 - 10/3, 3 - 3, 6 - 2)."""
    out = ops_group.group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0]), 2, algorithm="rloo")
    torch.testing.assert_close(out.advantages[:2], torch.tensor([-1.0, 1.0]))  # G = 2: r_i - r_j
    out = ops_group.group_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0]), 4, algorithm="rloo", scale_rewards=True)
    torch.testing.assert_close(out.advantages, torch.tensor([1 - 11 / 3, 2 - 10 / 3, 0.0, 4.0]))
    assert float(out.advantages.sum()) == pytest.approx(0.0, abs=1e-6)  # RLOO's advantages of a group sum to 0


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
@pytest.mark.parametrize("value", [0.0, 1.0, -3.5, 1e6])
def test_a_group_with_equal_rewards_gets_zero_advantages_is_counted_and_never_nan(algorithm, value):
    rewards = torch.tensor([value] * 4 + [0.0, 1.0, 0.0, 1.0])
    for scale in (True, False):
        out = ops_group.group_advantages(rewards, 4, scale_rewards=scale, algorithm=algorithm)
        assert torch.isfinite(out.advantages).all()
        assert out.advantages[:4].tolist() == [0.0] * 4 and out.advantages[4:].abs().min() > 0
        assert out.zero_std.tolist() == [True, False]


def test_num_generations_below_two_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^num_generations = 1: use an integer >= 2") as e:
        ops_group.group_advantages(torch.ones(4), 1)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^num_generations = 1: use an integer >= 2 \(a group\)$"):
        api.grpo("x", policy="tiny", reward=len, prompts=["p"], num_generations=1, progress=False)


def test_k3_kl_is_trls_estimator_and_its_gradient_pulls_back_to_the_reference():
    torch.manual_seed(0)
    lp = (torch.randn(3, 5) - 1).requires_grad_()
    ref = torch.randn(3, 5) - 1
    kl = kl_per_token(lp, ref, "k3")
    torch.testing.assert_close(kl, torch.exp(ref - lp) - (ref - lp) - 1)  # TRL's per_token_kl
    kl.sum().backward()
    torch.testing.assert_close(lp.grad, 1 - torch.exp(ref - lp.detach()))  # d/dlp: 0 where lp = ref
    assert float(kl_per_token(ref, ref, "k3").abs().max()) == 0.0


def _reference_loss(lp, old, adv, mask, ref, *, cliprange, beta, loss_type):
    """The GRPO loss, one token at a time."""
    rows, total, count = [], 0.0, 0
    for b in range(len(lp)):
        terms = []
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - cliprange), 1 + cliprange)
            term = -min(ratio * adv[b], clipped * adv[b])
            d = ref[b][t] - lp[b][t]
            terms.append(term + beta * (math.exp(d) - d - 1))
        rows.append(sum(terms) / len(terms))
        total, count = total + sum(terms), count + len(terms)
    return total / count if loss_type == "token" else sum(rows) / len(rows)


def _loss_inputs():
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(6, 7, generator=g, dtype=torch.float64) - 2
    old = lp + 0.3 * torch.randn(6, 7, generator=g, dtype=torch.float64)  # some ratios beyond the clip
    ref = lp + 0.2 * torch.randn(6, 7, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = torch.ones(6, 7, dtype=torch.long)
    for b, length in enumerate([7, 1, 4, 7, 2, 5]):  # answers of different lengths
        mask[b, length:] = 0
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["token", "sequence"])
def test_loss_types_match_a_reference_loop_and_chunks_add_up_to_the_batch(loss_type):
    lp, old, ref, adv, mask = _loss_inputs()
    kw = {"cliprange": 0.2, "beta": 0.04, "loss_type": loss_type}
    out = ops_group.grpo_loss(lp, old, adv, mask, ref_logprobs=ref, **kw)
    expected = _reference_loss(lp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), **kw)
    assert float(out.loss) == pytest.approx(expected, rel=1e-10)
    assert 0 < float(out.clip_ratio) < 1 and float(out.kl) > 0
    whole = {"total_tokens": mask.sum(), "total_rows": 6}
    rows = (slice(0, 2), slice(2, 3), slice(3, 6))
    parts = [ops_group.grpo_loss(lp[i], old[i], adv[i], mask[i], ref_logprobs=ref[i], **whole, **kw) for i in rows]
    assert float(sum(p.loss for p in parts)) == pytest.approx(expected, rel=1e-10)
    assert float(sum(p.clip_ratio for p in parts)) == pytest.approx(float(out.clip_ratio))
    assert float(sum(p.kl for p in parts)) == pytest.approx(float(out.kl))


def test_token_and_sequence_losses_weigh_long_answers_differently():
    """One long answer with advantage +1, one short with -1: "token" counts tokens, "sequence" counts answers."""
    lp, mask = torch.zeros(2, 4), torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    token = ops_group.grpo_loss(lp, lp, adv, mask, cliprange=0.2, loss_type="token").loss
    sequence = ops_group.grpo_loss(lp, lp, adv, mask, cliprange=0.2, loss_type="sequence").loss
    assert float(token) == pytest.approx(-(4 - 1) / 5) and float(sequence) == pytest.approx(0.0)


def test_one_update_per_rollout_is_the_policy_gradient():
    """num_iterations = 1: old logprobs are the current ones, the ratio is 1 and the gradient is -A grad logprobs."""
    lp, _, _, adv, mask = _loss_inputs()
    lp = lp.clone().requires_grad_()
    out = ops_group.grpo_loss(lp, lp.detach(), adv, mask, cliprange=0.2, loss_type="token")
    out.loss.backward()
    expected = -adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(lp.grad, expected.to(lp.dtype))
    assert float(out.clip_ratio) == 0.0


# ------------------------------------------------------------------------------------------------ the stage
@pytest.fixture(scope="module")
def sft():
    """A tiny policy that answers with four letters from a-d (as tests/test_ppo.py's)."""
    rng = random.Random(0)
    data = [{"prompt": p, "response": " ".join(rng.choice("abcd") for _ in range(4))} for p in PROMPTS]
    return api.sft("sft", model="tiny", data=data, max_steps=60, lr=1e-2, lora=False, progress=False)


def share_of_a(prompts, responses):
    """Rule reward: the share of letters that are 'a'."""
    return [r.count("a") / max(len(r.split()), 1) for r in responses]


@pytest.mark.parametrize("settings", [{}, {"algorithm": "rloo", "loss_type": "sequence"}])
def test_a_rule_reward_is_learned(sft, settings):
    h = api.grpo(
        "g", policy=sft, reward=share_of_a, prompts=PROMPTS, steps=30, batch_size=8, num_generations=4,
        max_new_tokens=8, lr=2e-3, progress=False, **settings,
    )  # fmt: skip
    rewards = h.metrics["grpo/reward"]
    first, last = statistics.fmean(rewards[:5]), statistics.fmean(rewards[-5:])
    assert last > first + 0.15, (first, last)
    assert h.stage == "grpo" and h.parents == ("sft", "share_of_a") and h.metrics.summary["steps"] == 30


def test_kl_starts_at_zero_roles_share_one_base_and_every_trainable_weight_changes(sft):
    snap = {}

    def grab(ev):
        if ev.kind == "start":
            snap["w"] = [p.detach().clone() for p in ev.payload["handle"].trainable_parameters()]

    before = sft.generate(PROMPTS[:4], max_new_tokens=8)
    h = api.grpo("g2", policy=sft, reward=share_of_a, prompts=PROMPTS, **{**FAST, "steps": 3}, lr=3e-3,
                 callbacks=[grab])  # fmt: skip
    assert abs(h.metrics["grpo/kl"][0]) < 1e-5  # the policy starts as the SFT policy, which is the reference
    assert h.metrics["grpo/kl"][-1] > 0
    assert h.lm is sft.lm and not hasattr(h, "ppo")  # one base model, no value head
    assert all(not torch.equal(a, b.detach()) for a, b in zip(snap["w"], h.trainable_parameters()))
    assert sft.generate(PROMPTS[:4], max_new_tokens=8) == before  # the reference (SFT) policy is untouched
    keys = {"grpo/reward", "grpo/reward_std", "grpo/frac_reward_zero_std", "grpo/entropy", "grpo/loss"}
    logged = list(h.metrics.keys())
    assert keys <= set(logged) and "grpo/clip_ratio/region_mean" in logged


def test_beta_zero_skips_the_reference_forward(sft, monkeypatch):
    from rlhf_magic.engine import rollout

    def never(*a, **k):
        raise AssertionError("the reference ran with beta = 0")

    monkeypatch.setattr(rollout, "reference_logprobs", never)
    h = api.grpo("g0", policy=sft, reward=share_of_a, prompts=PROMPTS, beta=0.0, **FAST)
    logged = list(h.metrics.keys())
    assert h.metrics.summary["steps"] == 2 and "grpo/kl" not in logged and "grpo/reward" in logged


def test_groups_with_equal_rewards_are_counted_shown_and_never_nan(sft):
    events = []
    h = api.grpo("same", policy=sft, reward=lambda p, r: [1.0] * len(r), prompts=PROMPTS, **FAST,
                 callbacks=[events.append])  # fmt: skip
    assert h.metrics["grpo/frac_reward_zero_std"] == [1.0, 1.0]
    assert h.metrics.summary["groups_zero_std"] == "4 of 4"
    warned = [str(e.payload) for e in events if e.kind == "warning" and "rewards were equal" in str(e.payload)]
    assert len(warned) == 1 and "2 of 2 groups" in warned[0] and "\n" not in warned[0]
    samples = [e.payload for e in events if e.kind == "samples"]
    assert samples and all(row["advantage"] == 0.0 for row in samples[-1]["rows"])
    assert all(math.isfinite(v) for row in h.metrics.history for v in row.values())
    assert all(torch.isfinite(p).all() for p in h.trainable_parameters())


def test_micro_batches_give_the_same_update_as_one_pass(sft):
    """Chunks weighted by their share of the batch (tokens, or answers for "sequence"): the same step."""
    for loss_type in ("token", "sequence"):
        trained = []
        for micro in (8, 3):
            kw = {**FAST, "steps": 1, "num_iterations": 2, "micro_batch_size": micro, "lr": 1e-2, "seed": 4}
            h = api.grpo(f"m{micro}", policy=sft, reward=share_of_a, prompts=PROMPTS, loss_type=loss_type, **kw)
            trained.append([p.detach().clone() for p in h.trainable_parameters()])
        for a, b in zip(*trained):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-4)


def test_nan_rewards_stop_and_keep_the_last_good_policy(sft):
    calls = {"n": 0}

    def flaky(prompts, responses):
        calls["n"] += 1
        return [float("nan")] * len(responses) if calls["n"] == 3 else [float(len(r)) for r in responses]

    h = api.grpo("nan", policy=sft, reward=flaky, prompts=PROMPTS, **{**FAST, "steps": 10})
    assert h.metrics.summary["steps"] == 2 and "the reward was nan" in h.metrics.summary["stopped"]
    assert all(torch.isfinite(p).all() for p in h.trainable_parameters())


def test_a_diverging_run_stops_and_keeps_the_last_good_policy(sft):
    """lr = 1: the entropy alarm stops the run with the weights of two steps before (the alarm's metrics were
    measured on the weights of the step before)."""
    snaps, handle = {}, {}

    def grab(ev):
        if ev.kind == "start":
            handle["h"] = ev.payload["handle"]
        if ev.kind in ("start", "step"):
            snaps[ev.step] = [p.detach().clone() for p in handle["h"].trainable_parameters()]

    h = api.grpo("div", policy=sft, reward=share_of_a, prompts=PROMPTS, **{**FAST, "steps": 10}, lr=1.0,
                 callbacks=[grab])  # fmt: skip
    stopped = h.metrics.summary["stopped"]
    alarm = r"training diverged at step (\d+): the policy's entropy rose to .* keeps the policy of step (\d+) "
    found = re.match(alarm, stopped)
    assert found and int(found[2]) == int(found[1]) - 2 == h.grpo.step, stopped
    assert "(lower lr: it is 1, the default is 0.0001)" in stopped
    assert all(torch.equal(a, b) for a, b in zip(snaps[h.grpo.step], h.trainable_parameters()))


def test_an_update_that_cannot_fit_is_refused_before_anything_is_set_up(sft, monkeypatch):
    from rlhf_magic.engine import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1 << 20)
    adapters = set(sft.lm.adapters)
    with pytest.raises(ConfigError, match=r"^GRPO on 'sft' needs about .* but only 1\.0 MiB of RAM is free") as e:
        api.grpo("big", policy=sft, reward=share_of_a, prompts=PROMPTS, **FAST)
    assert "lower micro_batch_size, max_new_tokens, batch_size or num_generations" in str(e.value)
    assert "\n" not in str(e.value) and set(sft.lm.adapters) == adapters  # no adapter was added


def test_a_bad_reward_callable_gets_a_one_line_error(sft):
    with pytest.raises(ConfigError, match="returned 1 scores for 8 answers") as e:
        api.grpo("bad", policy=sft, reward=lambda p, r: [1.0], prompts=PROMPTS, **FAST)
    assert "\n" not in str(e.value)


def test_resume_continues_the_same_policy(sft):
    h = api.grpo("g5", policy=sft, reward=share_of_a, prompts=PROMPTS, **FAST)

    class Session(dict):
        def add(self, handle):
            self[handle.name] = handle

        @property
        def runtime(self):
            return h.runtime

    with pytest.raises(ConfigError, match="no GRPO result named 'g6'"):
        api.grpo("g6", policy=sft, reward=share_of_a, prompts=PROMPTS, resume=True, session=Session(), **FAST)
    opt = h.grpo.optimizer_state
    again = api.grpo("g5", policy=sft, reward=share_of_a, prompts=PROMPTS, resume=True, session=Session(g5=h), **FAST)
    assert again is h and h.metrics.summary["steps"] == 4 and [r["step"] for r in h.metrics.history] == [1, 2, 3, 4]
    assert h.grpo.optimizer_state is not opt and h.metrics.summary["groups_zero_std"].endswith("of 8")


def test_magic_runs_grpo_and_its_help_lists_the_settings(ip, sft):
    ip.user_ns.update(policy=sft, rule=share_of_a, prompts=PROMPTS)
    body = "policy = policy\nreward = rule\nprompts = prompts\nsteps = 2\nbatch_size = 2\nmax_new_tokens = 6\n"
    res = ip.run_cell(f"%%grpo tuned\n{body}num_generations = 2\n")
    assert res.success, res.error_in_exec
    assert ip.user_ns["rlhf"]["tuned"] is ip.user_ns["tuned"] and ip.user_ns["tuned"].stage == "grpo"
    assert "tuned" in repr(ip.user_ns["rlhf"]) and "grpo" in repr(ip.user_ns["rlhf"])
    doc = ip.magics_manager.magics["cell"]["grpo"].__doc__
    assert doc.startswith("%%grpo NAME") and "num_generations" in doc and "scale_rewards" in doc
    res = ip.run_cell(f"%%grpo again\n{body}num_generation = 2\n")
    assert not res.success and "unknown setting 'num_generation' (did you mean 'num_generations'?)" in str(
        res.error_in_exec
    )
    res = ip.run_cell(f"%%grpo again\n{body}num_generations = 1\n")
    assert not res.success and "num_generations = 1: use an integer >= 2" in str(res.error_in_exec)


RULES = "def score(prompts, responses):\n    return [len(r) / 10 for r in responses]\n"


def test_cli_runs_grpo_from_a_config_file(tmp_path, monkeypatch, capsys):
    from rlhf_magic.cli import main

    api.load_policy("tiny").save(tmp_path / "sft")
    (tmp_path / "prompts.txt").write_text("".join(f"Count to {i}.\n" for i in range(8)))
    (tmp_path / "rules_grpo_cli.py").write_text(RULES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (tmp_path / "grpo.toml").write_text(
        'policy = "sft"\nreward = "rules_grpo_cli:score"\nprompts = "prompts.txt"\nsteps = 2\nbatch_size = 2\n'
        'num_generations = 3\nmax_new_tokens = 6\nalgorithm = "rloo"\noutput_dir = "out"\n[lora]\nr = 4\n'
    )
    try:
        assert main(["grpo", "grpo.toml", "--summary", "s.json"]) == 0
    finally:
        sys.modules.pop("rules_grpo_cli", None)
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["metrics"]["steps"] == 2 and summary["num_processes"] == 1
    assert summary["metrics"]["groups_zero_std"].endswith("of 4")
    assert len(api.load_policy(str(tmp_path / "out")).generate(["Count to 3."], max_new_tokens=4)) == 1
    (tmp_path / "bad.toml").write_text('policy = "sft"\nloss_type = "seq"\n')
    capsys.readouterr()
    assert main(["grpo", "bad.toml"]) == 2
    err = capsys.readouterr().err.strip()
    assert "loss_type = 'seq' is not valid; expected 'token' or 'sequence'" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------------ two processes
LAUNCHED = (
    'policy = "sft"\nreward = "rules_grpo_launch:score"\nprompts = "prompts.txt"\nsteps = 2\nbatch_size = 2\n'
    'num_generations = 3\nmax_new_tokens = 6\nlr = 0.001\noutput_dir = "grpo"\n[lora]\nr = 4\n'
)


@pytest.mark.slow
def test_accelerate_launch_each_process_samples_its_own_groups_and_fsdp2_ends_where_ddp_ends(tmp_path):
    """`rlhf-magic grpo` in two CPU processes (DDP, then FSDP2): each process samples its own prompts with its own
    seed, the metrics are reduced, the weights end equal, and FSDP2 ends with DDP's metrics and weights."""
    from launches import check_common, launch

    runs = {}
    for kind in ("ddp", "fsdp2"):
        root = tmp_path / kind
        root.mkdir()
        api.load_policy("tiny").save(root / "sft")
        (root / "prompts.txt").write_text("".join(f"Tell me about number {i}.\n" for i in range(8)))
        (root / "rules_grpo_launch.py").write_text(RULES)
        runs[kind] = run = launch(root, "grpo", LAUNCHED, fsdp2=kind == "fsdp2")
        check_common(run, root / "grpo")
        assert [log["fsdp2"] for log in run["logs"]] == [kind == "fsdp2"] * 2
    ddp = runs["ddp"]
    first, second = (log["rollouts"] for log in ddp["logs"])
    assert len(first) == len(second) == 2
    for a, b in zip(first, second):  # each step: 2 prompts x 3 answers per process, no prompt shared
        assert len(a["prompts"]) == len(b["prompts"]) == 6 and a["seed"] != b["seed"]
        assert not set(a["prompts"]) & set(b["prompts"])
    metrics = ddp["summary"]["metrics"]
    assert metrics["steps"] == 2 and metrics["groups_zero_std"].endswith("of 8")  # 2 steps x 2 groups x 2 processes
    mine = {k: v for k, v in runs["fsdp2"]["summary"]["metrics"].items() if k not in ("seconds", "groups_zero_std")}
    assert mine == pytest.approx({k: v for k, v in metrics.items() if k in mine}, rel=1e-5, abs=1e-6)
    assert runs["fsdp2"]["summary"]["param_checksums"] == pytest.approx(ddp["summary"]["param_checksums"], rel=1e-6)
