"""The maths of DPO on K-way rankings: pairwise losses (sigmoid, IPO), the listwise Plackett-Luce loss, and the
implicit-reward metrics. Pure functions of torch tensors, beside ops.py (whose `ranking_pairs` gives the pairs).

Every function takes `logratios` [N]: for each answer of the batch, log pi(answer | prompt) - log pi_ref(answer |
prompt), summed over the answer's tokens. The implicit reward of an answer is beta * logratio (DPO paper, eq. 5).
Ties follow %%reward: tied answers share a rank group and are never compared with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .ops import RankingPairs, _acc, _rank_groups

LOSSES = ("sigmoid", "ipo", "plackett_luce")


class Listwise(NamedTuple):
    """The terms of the Plackett-Luce loss of a batch of rankings: term t says answer `answers[t]` was picked from
    the answers `pool[t]` (itself and every answer ranked below it). `prompts`: the rankings in the batch."""

    answers: torch.Tensor  # long [T]
    pool: torch.Tensor  # bool [T, N]
    prompts: int


def listwise_terms(
    rankings: Sequence[Sequence[int | Sequence[int]]], sizes: Sequence[int], device: torch.device | str | None = None
) -> Listwise:
    """One term per answer above the last rank group of each ranking (the last group's terms are log 1 = 0).

    rankings[p] lists prompt p's rank groups, best first; answer i of prompt p is index offset_p + i, offset_p =
    sizes[0] + ... + sizes[p - 1]. A tied answer's pool holds itself and the worse groups, not its tied peers:
    ties are not compared, as in ops.ranking_pairs. Raises DataError for a ranking that is not a partition."""
    answers: list[int] = []
    pools: list[list[int]] = []
    offset = 0
    for p, ranking in enumerate(rankings):
        groups = _rank_groups(p, ranking, sizes[p])
        for gi, group in enumerate(groups[:-1]):
            below = [offset + j for worse in groups[gi + 1 :] for j in worse]
            for i in group:
                answers.append(offset + i)
                pools.append([offset + i, *below])
        offset += sizes[p]
    pool = torch.zeros((len(answers), offset), dtype=torch.bool, device=device)
    for t, members in enumerate(pools):
        pool[t, members] = True
    return Listwise(torch.tensor(answers, dtype=torch.long, device=device), pool, len(rankings))


def plackett_luce_loss(scores: torch.Tensor, terms: Listwise) -> torch.Tensor:
    """-(1 / prompts) * sum_t [s_{answers_t} - logsumexp(s_j for j in pool_t)]: the negative log-likelihood of each
    ranking under the Plackett-Luce model with scores s (DPO paper, appendix A.3, with s = beta * logratio), averaged
    over rankings. For K = 2 without a tie it is -log sigmoid(s_w - s_l), the sigmoid DPO loss."""
    s = _acc(scores)
    if terms.answers.numel() == 0:
        return s.sum() * 0.0
    pooled = torch.where(terms.pool, s[None, :], -torch.inf)
    nll = torch.logsumexp(pooled, dim=1) - s[terms.answers]
    return nll.sum() / terms.prompts


def dpo_loss(
    logratios: torch.Tensor,
    pairs: RankingPairs,
    *,
    beta: float,
    loss: str = "sigmoid",
    listwise: Listwise | None = None,
) -> torch.Tensor:
    """The DPO loss of a batch of rankings, each prompt weighing the same (ranking_pairs' weights):

    sigmoid: -log sigmoid(beta * (r_w - r_l)) averaged over each prompt's pairs (Rafailov et al., eq. 7);
    ipo: ((r_w - r_l) - 1 / (2 * beta))^2 averaged the same way (Azar et al., eq. 17), r the summed logratios
        (TRL 1.16 divides each answer's by its token count first);
    plackett_luce: plackett_luce_loss(beta * r, listwise) over whole rankings (needs `listwise`)."""
    r = _acc(logratios)
    if loss == "plackett_luce":
        if listwise is None:
            raise ValueError("dpo_loss: loss = 'plackett_luce' needs the rankings' listwise terms")
        return plackett_luce_loss(beta * r, listwise)
    diff = r[pairs.winners] - r[pairs.losers]
    if loss == "sigmoid":
        per_pair = -F.logsigmoid(beta * diff)
    elif loss == "ipo":
        per_pair = (diff - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"loss = {loss!r} is not valid; expected one of {', '.join(map(repr, LOSSES))}")
    w = pairs.weights.to(per_pair.dtype)
    return (w * per_pair).sum() / w.sum()


@torch.no_grad()
def reward_metrics(logratios: torch.Tensor, pairs: RankingPairs, beta: float) -> dict[str, torch.Tensor]:
    """TRL's implicit-reward metrics over every (better, worse) pair, each prompt weighing the same:
    rewards/chosen and rewards/rejected (the mean implicit reward beta * r of the better and of the worse answer),
    rewards/accuracies (the share of pairs whose better answer has the higher reward; a tie counts as wrong) and
    rewards/margins (the mean reward gap)."""
    rewards = beta * _acc(logratios)
    chosen, rejected = rewards[pairs.winners], rewards[pairs.losers]
    w = pairs.weights.to(rewards.dtype)
    w = w / w.sum()
    return {
        "rewards/chosen": (w * chosen).sum(),
        "rewards/rejected": (w * rejected).sum(),
        "rewards/accuracies": (w * (chosen > rejected).to(w.dtype)).sum(),
        "rewards/margins": (w * (chosen - rejected)).sum(),
    }


def sequence_logps(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The summed log-prob of each row's real tokens: sum_t logprobs[b, t] * mask[b, t] ([B, T] -> [B]); padding
    (even NaN there) contributes nothing."""
    return torch.where(mask.bool(), _acc(logprobs), 0.0).sum(-1)
