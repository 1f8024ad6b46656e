"""PPO step metrics (TRL-style keys under `ppo/`) and the warnings a careful user would want to see."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from .. import ops
from .rollout import Rollout


def step_metrics(
    ro: Rollout, stats: dict[str, list[float]], kl_coef: float, cfg: Any, seconds: float, gen_seconds: float
) -> dict[str, float]:
    """One row of the dashboard for this step."""
    mask = ro.mask
    kl_k1 = (
        ro.kl.sum(1)
        if cfg.kl_estimator == "k1"
        else ops.kl_per_token(ro.logprobs, ro.ref_logprobs, "k1").mul(mask).sum(1)
    )
    kl_k3 = ops.kl_per_token(ro.logprobs, ro.ref_logprobs, "k3").mul(mask).sum(1)
    lengths = mask.sum(1)
    scores = ro.scores.float()
    row = {
        "ppo/objective/scores": float(scores.mean()),
        "ppo/objective/kl": float(kl_k1.mean()),
        "ppo/objective/kl_k3": float(kl_k3.mean()),
        "ppo/objective/rlhf_reward": float((scores - kl_coef * ro.kl.sum(1)).mean()),
        "ppo/objective/kl_coef": kl_coef,
        "ppo/val/explained_var": float(ops.explained_variance(ro.values, ro.returns, mask)),
        "ppo/response/length": float(lengths.mean()),
        "ppo/response/eos_rate": float(ro.has_eos.float().mean()),
        "ppo/time/step_s": seconds,
        "ppo/time/generated_tok_s": float(lengths.sum()) / max(gen_seconds, 1e-9),
    }
    for key, vals in stats.items():
        agg = max if key.endswith("ratio_max") else sum if key == "skipped_steps" else statistics.fmean
        row[f"ppo/{key}"] = float(agg(vals))
    return row


def add_chunk_stats(rows: dict[str, float], share: float, pg: Any, vf_loss: Any, vf_clip: Any) -> None:
    """Add one micro-batch's losses, weighted by its `share` of the minibatch's tokens, to the minibatch's `rows`."""
    for key, val in {
        "policy/loss": pg.loss,
        "policy/clipfrac": pg.clipfrac,
        "policy/approxkl": pg.approx_kl,
        "val/loss": vf_loss,
        "val/clipfrac": vf_clip,
    }.items():
        rows[key] = rows.get(key, 0.0) + float(val.detach()) * share
    rows["policy/ratio_max"] = max(rows.get("policy/ratio_max", 0.0), float(pg.ratio_max))


def sample_rows(ro: Rollout, n: int = 4) -> dict[str, Any]:
    """The 'samples' event's payload: the first `n` answers with their scores and KL."""
    kl = ro.kl.sum(1)
    return {
        "title": "latest samples",
        "rows": [
            {"prompt": p, "answer": t, "score": float(s), "KL": float(k)}
            for p, t, s, k in list(zip(ro.prompts, ro.texts, ro.scores, kl))[:n]
        ],
    }


def skipped_steps_warning(stats: dict[str, list[float]], *, scaled: bool) -> list[str]:
    """A warning when optimizer steps were skipped for gradients that were not finite, without a loss scaler (under
    fp16 an overflow now and then is how the scaler finds its scale)."""
    flags = stats.get("skipped_steps", [])
    if scaled or not any(flags):
        return []
    return [f"{int(sum(flags))} of {len(flags)} optimizer steps were skipped: the gradients were not finite"]


@dataclass
class Monitor:
    """Warns once per kind: negative KL, exploding ratios, collapsing or ballooning answers, vanishing EOS."""

    first: dict[str, float] = field(default_factory=dict)
    said: set[str] = field(default_factory=set)

    def check(self, row: dict[str, float], cfg: Any) -> list[str]:
        if not self.first:
            self.first = dict(row)
        out = []
        length, first_len = row["ppo/response/length"], self.first["ppo/response/length"]
        eos, first_eos = row["ppo/response/eos_rate"], self.first["ppo/response/eos_rate"]
        rules = {
            "negative_kl": (
                row["ppo/objective/kl"] < -0.1,
                f"KL to the SFT policy is negative ({row['ppo/objective/kl']:.3f}): the sampler and the "
                f"logprob computation disagree (check temperature and special tokens)",
            ),
            "ratio": (
                row.get("ppo/policy/ratio_max", 1.0) > 10.0,
                f"the policy ratio reached {row.get('ppo/policy/ratio_max', 0):.1f}: updates are too large "
                f"(lower lr or cliprange)",
            ),
            "collapse": (
                length < max(1.5, 0.25 * first_len),
                f"answers collapsed to {length:.1f} tokens on average (from {first_len:.1f})",
            ),
            "balloon": (
                length > max(2 * first_len, 0.9 * cfg.max_new_tokens) and first_len < 0.9 * cfg.max_new_tokens,
                f"answers grew to {length:.1f} tokens (from {first_len:.1f}), near max_new_tokens",
            ),
            "eos": (
                first_eos >= 0.5 and eos < 0.25,
                f"only {eos:.0%} of answers end with EOS now (from {first_eos:.0%}): the policy stopped "
                f"finishing its answers (consider missing_eos_penalty)",
            ),
        }
        for kind, (hit, message) in rules.items():
            if hit and kind not in self.said and math.isfinite(length):
                self.said.add(kind)
                out.append(message)
        return out
