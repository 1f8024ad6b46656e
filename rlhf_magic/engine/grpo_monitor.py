"""GRPO step metrics (TRL's names under `grpo/`), the samples table, the warnings and the summary of a run."""

from __future__ import annotations

import statistics
from typing import Any

import torch

from .. import ops_group
from ..events import StopControl
from . import rollout as R

THROUGHPUT = "grpo/time/generated_tok_s"
# GRPO's metrics under the names of PPO's that the divergence alarms and PPO's warnings read
AS_PPO = {
    "grpo/loss": "ppo/policy/loss",
    "grpo/entropy": "ppo/policy/entropy",
    "grpo/completions/mean_length": "ppo/response/length",
}


def reduce_row(acc: Any, row: dict[str, float] | None) -> dict[str, float] | None:
    """The step's metrics averaged over processes (the sum for the throughput). One process: the row as it is."""
    if row is None or acc.num_processes == 1:
        return row
    keys = sorted(row)
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=acc.device)
    out = dict(zip(keys, acc.reduce(values, "mean").tolist()))
    if THROUGHPUT in out:
        out[THROUGHPUT] *= acc.num_processes  # the job's, not one process's
    return {k: float(out[k]) for k in row}


# ------------------------------------------------------------------------------------------------- metrics
def step_metrics(
    ro: R.Rollout, groups: ops_group.GroupAdvantages, stats: dict[str, list[float]], seconds: float, gen: float
) -> dict[str, float]:
    """One row of the dashboard, under TRL's names (grpo/reward, grpo/kl, grpo/frac_reward_zero_std, ...)."""
    lengths, scores = ro.mask.sum(1), ro.scores.float()
    row = {
        "grpo/reward": float(scores.mean()),
        "grpo/reward_std": float(scores.std()) if scores.numel() > 1 else 0.0,
        "grpo/frac_reward_zero_std": float(groups.zero_std.float().mean()),
        "grpo/completions/mean_length": float(lengths.float().mean()),
        "grpo/completions/clipped_ratio": float((~ro.has_eos.bool()).float().mean()),  # no EOS: cut at the limit
        "grpo/time/step_s": seconds,
        THROUGHPUT: float(lengths.sum()) / max(gen, 1e-9),
    }
    for key, vals in stats.items():
        if key == "kl" and ro.ref_logprobs is None:
            continue  # beta = 0: no reference, no KL (as TRL)
        row[f"grpo/{key}"] = float(sum(vals) if key == "skipped_steps" else statistics.fmean(vals))
    return row


def sample_rows(ro: R.Rollout, num_generations: int, n: int = 8) -> dict[str, Any]:
    """The 'samples' event's payload: the first groups' answers with their scores and advantages."""
    adv = ro.advantages if ro.advantages is not None else torch.zeros_like(ro.scores)
    rows = [
        {"group": i // num_generations, "prompt": p, "answer": t, "score": float(s), "advantage": float(a)}
        for i, (p, t, s, a) in enumerate(zip(ro.prompts, ro.texts, ro.scores, adv))
    ]
    return {"title": "latest samples (advantage: the score against its group's)", "rows": rows[:n]}


def warnings_after(run: Any, row: dict[str, float]) -> list[str]:
    """PPO's answer warnings (collapse, balloon, vanishing EOS), and, once, a step in which every group's rewards
    were equal. Counts the groups whose rewards were equal."""
    state, cfg = run.state, run.cfg
    groups = cfg.batch_size * run.acc.num_processes
    equal = round(row["grpo/frac_reward_zero_std"] * groups)
    state.groups, state.groups_zero_std = state.groups + groups, state.groups_zero_std + equal
    as_ppo = {AS_PPO.get(k, k): v for k, v in row.items()}
    as_ppo.update({"ppo/objective/kl": 0.0, "ppo/response/eos_rate": 1 - row["grpo/completions/clipped_ratio"]})
    out = state.monitor.check(as_ppo, cfg)
    if equal == groups and "equal" not in state.monitor.said:
        state.monitor.said.add("equal")
        out.append(
            f"every group's rewards were equal at step {state.step + 1} ({groups} of {groups} groups): their "
            "advantages are 0, so the step taught nothing; the reward does not tell these answers apart (raise "
            "temperature or num_generations, or check the reward)"
        )
    return out


def summary(handle: Any, stop: StopControl) -> dict[str, Any]:
    m, state = handle.metrics, handle.grpo
    out: dict[str, Any] = {"steps": state.step}
    for key in ("grpo/reward", "grpo/kl", "grpo/frac_reward_zero_std"):
        if m.last(key) is not None:
            out[key] = m.last(key)
    out["groups_zero_std"] = f"{state.groups_zero_std} of {state.groups}"  # groups whose advantages were all 0
    out["seconds"] = round(sum(m["grpo/time/step_s"]), 1) if m.last("grpo/time/step_s") is not None else 0.0
    if stop.requested:
        out["stopped"] = stop.reason
    return out
