"""Data parallelism: each stage under `accelerate launch` with two CPU processes, and the rank logic in one process.

The slow tests check the runs of `tests/launches.py` (session fixtures in conftest.py): each process runs
`rlhf_magic.cli.main` with spies that log the training rows it saw, the rollouts it sampled (prompts, seed,
answers), its raw PPO rows, its metric history and every folder it saved.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from launches import check_common


# ------------------------------------------------------------------------------------------------ one process
class FakeRank:
    """One of two processes, simulated: `reduce` adds the partner's tensor (the partner runs first, unreduced)."""

    def __init__(self, rank: int, partner: FakeRank | None = None, processes: int = 2):
        self.process_index, self.num_processes, self.device = rank, processes, torch.device("cpu")
        self.partner, self.sent = partner, None

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        self.sent = tensor.clone()
        if self.partner is None:
            return tensor
        other = self.partner.sent
        return {"sum": tensor + other, "mean": (tensor + other) / 2, "max": torch.maximum(tensor, other)}[reduction]

    def unwrap_model(self, module: Any) -> Any:
        return module


def _two_ranks(run: Any) -> tuple[Any, FakeRank, FakeRank]:
    """run(acc) on rank 1, then on rank 0 with rank 1's sums: rank 0's result is what an all-reduce gives."""
    r1 = FakeRank(1)
    run(r1)
    r0 = FakeRank(0, partner=r1)
    return run(r0), r0, r1


def _tiny_lm() -> Any:
    from rlhf_magic.engine.models import LoadedModel
    from rlhf_magic.engine.tiny import tiny_model

    model, tok = tiny_model()
    return LoadedModel("tiny", model, tok, "tiny")


def test_sft_eval_split_over_two_ranks_equals_one_process(pairs):
    from rlhf_magic.config import SFTConfig
    from rlhf_magic.engine.modules import TokenLoss
    from rlhf_magic.engine.sft import _evaluator, prepare_data
    from rlhf_magic.engine.text import IGNORE

    lm = _tiny_lm()
    _, evals, _ = prepare_data(SFTConfig(model="tiny", data=pairs[:14], eval_fraction=0.5), lm)
    assert len(evals) == 7  # shares of 4 and 3 examples, in batches of 2: different batches than one process

    def run(acc: Any) -> dict[str, float]:
        state = SimpleNamespace(accelerator=acc, module=TokenLoss(lm.model), device=torch.device("cpu"))
        return _evaluator(state, evals, 2, lm.tokenizer.pad_token_id)()

    single = run(FakeRank(0, processes=1))
    split, r0, r1 = _two_ranks(run)
    assert split["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-6)
    tokens = [int(r.sent[1]) for r in (r0, r1)]  # each rank scored its own share of the answer tokens
    assert min(tokens) > 0 and sum(tokens) == sum(sum(t != IGNORE for t in e.labels[1:]) for e in evals)


def test_reward_eval_split_over_two_ranks_equals_one_process():
    from rlhf_magic.engine import reward as R
    from rlhf_magic.engine.reward_model import RewardHandle, make_head
    from rlhf_magic.engine.runtime import Runtime
    from rlhf_magic.preferences import Preferences

    lm = _tiny_lm()
    head = make_head(lm.model.config.hidden_size, torch.device("cpu"))
    handle = RewardHandle("rm", lm, head, runtime=Runtime("cpu"))
    answers = [["a" * (i + 1), "bb" * (i % 3 + 1), "c"] for i in range(7)]
    records = [
        {"prompt": f"Say {i}.", "responses": a, "ranking": [(i + j) % 3 for j in range(3)]}
        for i, a in enumerate(answers)
    ]
    items = R.load_items(Preferences.from_records(records), lm.tokenizer, 64)

    single = R.evaluate_items(handle, items, 2, 0.0)
    split, _, r1 = _two_ranks(lambda acc: R.evaluate_items(handle, items, 2, 0.0, acc))
    assert split == pytest.approx(single, rel=1e-6)
    assert 0 < float(r1.sent[2]) < len(items)  # rank 1 scored a share of the prompts, not all of them


def test_reward_report_scores_are_split_over_two_ranks_and_equal_one_process():
    """The end-of-run report (histogram, accuracy in the summary): each rank scores a share, every rank gets all."""
    from rlhf_magic.engine import reward as R
    from rlhf_magic.engine.reward_model import RewardHandle, make_head
    from rlhf_magic.engine.runtime import Runtime
    from rlhf_magic.preferences import Preferences

    lm = _tiny_lm()
    handle = RewardHandle("rm", lm, make_head(lm.model.config.hidden_size, torch.device("cpu")), runtime=Runtime("cpu"))
    records = [{"prompt": f"Say {i}.", "responses": ["a" * (i + 1), "bb", "c"], "ranking": [(i + j) % 3 for j in
               range(3)]} for i in range(5)]  # fmt: skip
    items = R.load_items(Preferences.from_records(records), lm.tokenizer, 64)
    single = R.item_scores(handle, items, 2)
    split, _, r1 = _two_ranks(lambda acc: R.item_scores(handle, items, 2, acc))
    torch.testing.assert_close(torch.cat(split), torch.cat(single), rtol=1e-6, atol=1e-6)
    assert [len(s) for s in split] == [len(s) for s in single]
    assert 0 < int((r1.sent != 0).sum()) < sum(len(it.rows) for it in items)  # rank 1 scored only its share


def test_each_rank_draws_its_own_prompts_and_seed_and_one_process_is_unchanged():
    from rlhf_magic.engine import ranks
    from rlhf_magic.engine.online import prompt_order

    prompts = [f"p{i}" for i in range(10)]
    order = prompt_order(len(prompts), 3)
    one = FakeRank(0, processes=1)
    for step in range(4):  # one process: the slice it always took, and the seed it always used
        assert ranks.prompt_batch(prompts, order, step, 4, one) == [
            prompts[order[(step * 4 + i) % 10]] for i in range(4)
        ]
        assert ranks.sampling_seed(7, step, one) == 7 * 100_003 + step
    a, b = (ranks.prompt_batch(prompts, order, 1, 2, FakeRank(r)) for r in (0, 1))
    assert not set(a) & set(b) and a + b == [prompts[i] for i in order[4:8]]  # step 1's two slices, one per rank
    seeds = {ranks.sampling_seed(7, step, FakeRank(r)) for r in (0, 1) for step in range(100)}
    assert len(seeds) == 200


def test_ppo_metrics_are_averaged_and_the_kl_controller_steps_on_the_mean_kl():
    from rlhf_magic.engine import ranks
    from rlhf_magic.engine.kl_control import AdaptiveKLController

    cfg = SimpleNamespace(kl_estimator="k1", batch_size=4)
    rows = {
        0: {
            "ppo/objective/scores": 1.0,
            "ppo/objective/kl": 0.5,
            "ppo/objective/kl_coef": 0.1,
            "ppo/policy/ratio_max": 1.5,
        },
        1: {
            "ppo/objective/scores": 3.0,
            "ppo/objective/kl": 2.5,
            "ppo/objective/kl_coef": 0.1,
            "ppo/policy/ratio_max": 1.2,
        },
    }

    def run(acc: Any) -> dict[str, float] | None:
        ctl = AdaptiveKLController(0.1, 1.0, 100)
        ctl.update(rows[acc.process_index]["ppo/objective/kl"], 4)  # what ppo_step did with this rank's KL
        out = ranks.reduce_row(
            SimpleNamespace(acc=acc, cfg=cfg, state=SimpleNamespace(kl_ctl=ctl)), rows[acc.process_index]
        )
        return {**out, "kl_ctl": ctl.value}

    out, _, _ = _two_ranks(run)
    assert out["ppo/objective/scores"] == pytest.approx(2.0) and out["ppo/objective/kl"] == pytest.approx(1.5)
    assert out["ppo/policy/ratio_max"] == pytest.approx(1.5)  # a maximum stays a maximum
    assert out["kl_ctl"] == pytest.approx(AdaptiveKLController(0.1, 1.0, 100).update(1.5, 8))
    assert ranks.reduce_row(SimpleNamespace(acc=FakeRank(0, processes=1)), rows[0]) is rows[0]


def test_a_bad_reward_in_one_process_stops_every_process():
    """Non-finite rewards in one rank only: every rank must stop before its update, or DDP would wait forever."""
    from rlhf_magic.engine import ranks

    other_bad = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=lambda t, op: t + 1.0)
    other_fine = SimpleNamespace(num_processes=2, device=torch.device("cpu"), reduce=lambda t, op: t)
    assert ranks.any_rank(other_bad, False) and ranks.any_rank(other_fine, True)
    assert not ranks.any_rank(other_fine, False)
    assert ranks.any_rank(SimpleNamespace(num_processes=1), True) and not ranks.any_rank(SimpleNamespace(), False)


def test_ppo_without_lora_trains_fp32_master_weights_of_a_16_bit_policy(pairs):
    """On a bf16 GPU the shared policy's weights are bf16; PPO's private full copy must train in fp32."""
    from rlhf_magic import api
    from rlhf_magic.config import PPOConfig
    from rlhf_magic.engine import ppo as P
    from rlhf_magic.validation import build_config

    sft = api.sft("m16", model="tiny", data=pairs, max_steps=1, lora=False, progress=False)
    sft.lm.model.to(torch.bfloat16)  # as a bf16 GPU loads it
    cfg = build_config(PPOConfig, {"policy": sft, "reward": lambda p, r: [0.0] * len(r), "prompts": ["x"]})
    handle = P._new_handle(dataclasses.replace(cfg, lora=None), "m16-ppo", sft.runtime)
    assert {p.dtype for p in handle.ppo.trained} == {torch.float32}
    assert {p.dtype for p in sft.lm.model.parameters()} == {torch.bfloat16}  # the reference stays as it was


def test_several_processes_run_the_same_ppo_chunks(monkeypatch):
    from rlhf_magic.config import PPOConfig
    from rlhf_magic.engine.ranks import same_chunks

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert same_chunks(PPOConfig(mini_batch_size=4)).micro_batch_size is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert same_chunks(PPOConfig(mini_batch_size=4)).micro_batch_size == 4
    assert same_chunks(PPOConfig(mini_batch_size=4, micro_batch_size=2)).micro_batch_size == 2


# ------------------------------------------------------------------------------------------------ two processes
@pytest.mark.slow
def test_sft_two_processes_split_the_data_and_the_eval(runs, sft_run):
    from rlhf_magic.cli import read_config_file
    from rlhf_magic.config import SFTConfig
    from rlhf_magic.engine.modules import TokenLoss
    from rlhf_magic.engine.sft import _evaluator, prepare_data
    from rlhf_magic.validation import build_config

    check_common(sft_run, runs / "sft")
    lm = _loaded(runs / "sft")
    cfg = build_config(SFTConfig, {**read_config_file(runs / "sft.toml"), "data": str(runs / "pairs.jsonl")})
    train, evals, _ = prepare_data(cfg, lm)
    seen = [collections.Counter(map(tuple, log["rows"])) for log in sft_run["logs"]]
    assert sft_run["summary"]["metrics"]["steps"] == 4  # 16 examples, batch 4, 2 epochs, split over 2 processes
    assert seen[0] != seen[1] and seen[0] + seen[1] == collections.Counter(
        {tuple(e.input_ids): 2 for e in train}
    )  # each process its own share: together every example once an epoch
    state = SimpleNamespace(accelerator=FakeRank(0, processes=1), module=TokenLoss(lm.model), device=lm.model.device)
    single = _evaluator(state, evals, cfg.batch_size, lm.tokenizer.pad_token_id)()["eval/loss"]
    assert sft_run["summary"]["metrics"]["eval/loss"] == pytest.approx(single, rel=1e-4)  # split, then added up


def _loaded(path: Path) -> Any:
    from rlhf_magic.engine.runtime import Runtime

    return Runtime("cpu").load(str(path))


@pytest.mark.slow
def test_reward_two_processes_split_the_data_and_the_eval(runs, reward_run):
    from rlhf_magic.engine import reward as R
    from rlhf_magic.engine.reward_model import load_reward
    from rlhf_magic.engine.runtime import Runtime
    from rlhf_magic.preferences import Preferences

    check_common(reward_run, runs / "rm")
    rm = load_reward(runs / "rm", Runtime("cpu"))
    items = R.load_items(Preferences.load(runs / "prefs.jsonl"), rm.tokenizer, 512)
    train, evals = R.split(items, 0.2, 0)
    seen = [collections.Counter(map(tuple, log["rows"])) for log in reward_run["logs"]]
    assert reward_run["summary"]["metrics"]["steps"] == 2  # 16 prompts, 4 a batch, split over 2 processes
    assert seen[0] != seen[1] and seen[0] + seen[1] == collections.Counter(
        tuple(row) for it in train for row in it.rows
    )
    last = [row for row in reward_run["logs"][0]["history"] if "eval/accuracy" in row][-1]
    single = R.evaluate_items(rm, evals, 4, 0.0)
    assert last["eval/loss"] == pytest.approx(single["eval/loss"], rel=1e-4)
    assert last["eval/accuracy"] == pytest.approx(single["eval/accuracy"], abs=1e-6)


@pytest.mark.slow
def test_ppo_two_processes_sample_their_own_prompts_with_their_own_seeds(runs, ppo_run):
    check_common(ppo_run, runs / "ppo")
    rollouts = [log["rollouts"] for log in ppo_run["logs"]]
    assert len(rollouts[0]) == len(rollouts[1]) == 2
    for mine, theirs in zip(*rollouts):
        assert mine["seed"] != theirs["seed"] and not set(mine["prompts"]) & set(theirs["prompts"])
        assert mine["texts"] != theirs["texts"]
    drawn = collections.Counter(p for r in rollouts for step in r for p in step["prompts"])
    assert drawn == collections.Counter(f"Tell me about number {i}." for i in range(8))  # each prompt once
    raw = [log["ppo_rows"] for log in ppo_run["logs"]]
    for step, logged in enumerate(ppo_run["logs"][0]["history"]):
        mean = (raw[0][step]["ppo/objective/scores"] + raw[1][step]["ppo/objective/scores"]) / 2
        assert logged["ppo/objective/scores"] == pytest.approx(mean, rel=1e-9)
        assert raw[0][step]["ppo/objective/scores"] != raw[1][step]["ppo/objective/scores"]


def test_ppo_health_warnings_read_the_metrics_of_all_processes(pairs, monkeypatch):
    """The monitor checks the row reduced over processes, not one process's own share of the batch."""
    from rlhf_magic import api
    from rlhf_magic.engine import ranks

    def all_ranks_mean(run, row):  # as if the other process's KL had pulled the mean below zero
        return None if row is None else {**row, "ppo/objective/kl": -1.0}

    monkeypatch.setattr(ranks, "reduce_row", all_ranks_mean)
    warnings: list[str] = []
    sft = api.sft("warn-sft", model="tiny", data=pairs, max_steps=2, progress=False)
    api.ppo("warn-ppo", policy=sft, reward=lambda p, r: [0.0] * len(r), prompts=["x", "y"], steps=1, batch_size=2,
            mini_batch_size=2, max_new_tokens=4, progress=False,
            callbacks=[lambda ev: ev.kind == "warning" and warnings.append(ev.payload)])  # fmt: skip
    assert any("KL to the SFT policy is negative (-1.000)" in w for w in warnings), warnings
