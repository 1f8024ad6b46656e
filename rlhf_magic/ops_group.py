"""The tensor maths of GRPO and RLOO: advantages from groups of answers to the same prompt, and the clipped loss.

Pure functions of torch tensors, named as in TRL's GRPOTrainer / RLOOTrainer. A batch holds `num_generations` (G)
consecutive answers per prompt: rewards [P * G], answer g of prompt p at p * G + g. `mask` [B, T] is 1 on real
response tokens, as in ops.py. No value function: an answer's advantage is its reward against the others' of
its group, one number for every token of the answer.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .errors import ConfigError
from .ops import _acc, _real, kl_per_token

EPS = 1e-4  # added to the group std before dividing (TRL's value): a group whose rewards are equal divides by it
LOSS_TYPES = ("token", "sequence")
ALGORITHMS = ("grpo", "rloo")


class GroupAdvantages(NamedTuple):
    """Per-answer advantages [P * G] and, per group [P], whether its rewards are all equal and its reward std."""

    advantages: torch.Tensor
    zero_std: torch.Tensor  # bool [P]: every reward of the group is equal, so its advantages are 0
    std: torch.Tensor  # [P] unbiased std of each group's rewards


def grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """rewards [P * G] -> [P, G], with a one-line error when G < 2 or the rewards do not fill whole groups."""
    g = int(num_generations)
    if g < 2:
        raise ConfigError(
            f"num_generations = {num_generations}: use an integer >= 2 (answers to the same prompt are compared "
            "with each other)"
        )
    if rewards.dim() != 1 or rewards.numel() % g:
        raise ValueError(f"{tuple(rewards.shape)} rewards do not split into groups of {g}")
    return _acc(rewards).view(-1, g)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    scale_rewards: bool = True,
    algorithm: Literal["grpo", "rloo"] = "grpo",
) -> GroupAdvantages:
    """GRPO: A_i = r_i - mean(group), divided by (std(group) + EPS) when `scale_rewards` (the std unbiased, as
    TRL); scale_rewards=False is Dr. GRPO's unscaled advantage. RLOO: A_i = r_i - the mean of the other G - 1
    rewards of the group (never scaled). A group whose rewards are all equal (std ~ 0, torch.isclose as TRL) gets
    advantages of exactly 0 and is flagged in `zero_std`; nothing divides by zero."""
    r = grouped(rewards, num_generations)
    g = r.shape[1]
    std = r.std(dim=1) if r.numel() else r.new_zeros(0)
    zero = torch.isclose(std, torch.zeros_like(std))
    if algorithm == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (g - 1)
    elif algorithm == "grpo":
        adv = r - r.mean(1, keepdim=True)
        if scale_rewards:
            adv = adv / (std[:, None] + EPS)
    else:
        raise ConfigError(f"algorithm = {algorithm!r} is not valid; expected one of {', '.join(ALGORITHMS)}")
    adv = torch.where(zero[:, None], 0.0, adv)
    return GroupAdvantages(adv.reshape(-1), zero, std)


class GroupLoss(NamedTuple):
    """The loss of some rows as their part of a batch (keeps its graph) and its metrics (detached, summed in the
    same proportions, so the parts of a batch add up to the batch's own): clip_ratio and kl are token means."""

    loss: torch.Tensor
    clip_ratio: torch.Tensor  # the share of tokens whose ratio was clipped (TRL's clip_ratio/region_mean)
    kl: torch.Tensor  # k3 KL to the reference per token (0 where beta = 0 and no reference is given)


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(-min(ratio * A, clip(ratio, 1 - c, 1 + c) * A) per token [B, T], clipped [B, T] bool) with ratio =
    exp(logprobs - old_logprobs) and A [B] the answer's advantage on each of its tokens. A token is clipped where
    the clip takes effect: ratio < 1 - c with A < 0, or ratio > 1 + c with A > 0 (TRL's region)."""
    ratio = torch.exp(_acc(logprobs) - _acc(old_logprobs))
    adv = _acc(advantages)[:, None]
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    with torch.no_grad():
        region = ((ratio < 1.0 - cliprange) & (adv < 0)) | ((ratio > 1.0 + cliprange) & (adv > 0))
    return torch.maximum(unclipped, clipped), region


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: Literal["token", "sequence"],
    *,
    total_tokens: float | torch.Tensor | None = None,
    total_rows: int | None = None,
) -> torch.Tensor:
    """These rows' part of the batch loss. "token": sum over the real tokens / total_tokens (all the batch's
    tokens; TRL's "dapo", and "bnpo" for one batch); "sequence": the sum over rows of each row's token mean /
    total_rows (the original GRPO, TRL's "grpo"). The totals default to these rows' own (the loss of the rows as
    a batch); given the batch's, the parts of a batch sum to its loss."""
    m = mask.bool()
    x = _real(per_token, m)
    if loss_type == "token":
        total = m.sum() if total_tokens is None else torch.as_tensor(total_tokens, device=x.device)
        return x.sum() / total.to(x.dtype).clamp_min(1.0)
    if loss_type == "sequence":
        rows = x.sum(1) / m.sum(1).to(x.dtype).clamp_min(1.0)
        return rows.sum() / max(m.shape[0] if total_rows is None else total_rows, 1)
    raise ConfigError(f"loss_type = {loss_type!r} is not valid; expected one of {', '.join(LOSS_TYPES)}")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    cliprange: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: Literal["token", "sequence"] = "token",
    total_tokens: float | torch.Tensor | None = None,
    total_rows: int | None = None,
) -> GroupLoss:
    """The GRPO loss: per token the clipped surrogate plus beta times the k3 KL to the reference,
    k3 = exp(ref - logprobs) - (ref - logprobs) - 1 (ops.kl_per_token, >= 0; its gradient pulls the policy back),
    aggregated by `loss_type` (see `aggregate`). With old_logprobs = logprobs.detach() (one update per rollout)
    the ratio is 1 and the surrogate's gradient is the policy gradient -A * grad logprobs."""
    m = mask.bool()
    loss, region = per_token_loss(logprobs, old_logprobs, advantages, cliprange)
    kl = None
    if ref_logprobs is not None:
        kl = kl_per_token(logprobs, ref_logprobs, "k3")
        if beta:
            loss = loss + beta * kl
    elif beta:
        raise ValueError("grpo_loss: beta > 0 needs ref_logprobs")
    total = m.sum() if total_tokens is None else total_tokens
    part = aggregate(loss, m, loss_type, total_tokens=total, total_rows=total_rows)
    with torch.no_grad():
        clip = aggregate(region.float(), m, "token", total_tokens=total)
        kl_mean = aggregate(kl.detach(), m, "token", total_tokens=total) if kl is not None else torch.zeros(())
    return GroupLoss(part, clip, kl_mean)
