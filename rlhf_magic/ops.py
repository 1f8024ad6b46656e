"""The tensor maths of the pipeline: masked statistics, log-probs, KL, per-token rewards, GAE, PPO and ranking losses.

Pure functions of torch tensors; names follow TRL / lm-human-preference-details. `mask` is [B, T] (float, int or
bool), 1 on real response tokens (up to and including the first EOS) and 0 on padding. Padding never reaches a loss
or a metric: it is selected away with `torch.where` before any arithmetic, so even NaN or inf there is harmless and
gets no gradient. Reductions run in float32 (float64 stays float64), so bf16/fp16 inputs give float32 results.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import ConfigError, DataError

KL_ESTIMATORS = ("k1", "k3")
Dim = int | tuple[int, ...] | None


def _acc(x: torch.Tensor) -> torch.Tensor:
    """x in the reduction dtype: float64 stays, everything else becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _real(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (reduction dtype) with padded positions replaced by 0, cutting off their values and their gradient."""
    return torch.where(mask.bool(), _acc(x), 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """sum(x * mask) / sum(mask), over everything or along `dim`. An empty mask (or row) gives 0, not NaN."""
    xs = _real(x, mask)
    m = mask.to(xs.dtype).expand_as(xs)
    num, den = ((xs * m).sum(), m.sum()) if dim is None else ((xs * m).sum(dim), m.sum(dim))
    return num / torch.where(den > 0, den, torch.ones_like(den))


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """masked_mean((x - masked_mean(x))^2) * (n / (n - 1) if unbiased and n > 1), n = sum(mask); raises if n = 0."""
    n = float(mask.sum())
    if n == 0:
        raise ValueError("masked_var: the mask selects no element")
    xs = _real(x, mask)
    var = masked_mean((xs - masked_mean(xs, mask)) ** 2, mask)
    return var * (n / (n - 1)) if unbiased and n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the real elements (unbiased var); shift_mean=False adds the mean back.

    Padded positions come out as 0.
    """
    xs = _real(x, mask)
    mean, var = masked_mean(xs, mask), masked_var(xs, mask)
    out = (xs - mean) * torch.rsqrt(var + 1e-8)
    return _real(out if shift_mean else out + mean, mask)


def _row_logprobs(logits: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    rows = []
    for row, idx in zip(logits, index):  # one row at a time: never a second full-size [.., V] tensor
        lg = _acc(row) if temperature == 1.0 else _acc(row) / temperature
        rows.append(lg.gather(-1, idx.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.stack(rows)


def selective_log_softmax(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log_softmax(logits)[..., index] = logits[index] - logsumexp(logits), computed row by row over dim 0.

    logits [N, ..., V], index [N, ...] (long). Memory stays at one row's [..., V]; bf16/fp16 rows are upcast, so the
    result is float32 (float64 for float64 logits).
    """
    return _row_logprobs(logits, index, 1.0)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[tokens]: the log-prob under the same scaled logits sampling used.

    The caller aligns them: logits[:, t] must be the distribution that produced tokens[:, t].
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return _row_logprobs(logits, tokens, temperature)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    logsumexp: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[tokens], given that row's logsumexp of the scaled logits.

    hidden [..., H], weight [V, H], tokens [...], logsumexp [...]: only the chosen tokens' logits are formed (what
    a decode step can keep without holding a [.., V] tensor)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = (_acc(hidden) * _acc(weight[tokens])).sum(-1)
    if bias is not None:
        logits = logits + _acc(bias[tokens])
    return logits / temperature - _acc(logsumexp)


CATEGORICAL_BLOCK = 256  # vocabulary entries per block in categorical()


def categorical(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of `probs` [B, V] (non-negative, not necessarily normalised), drawn with probability
    probs[b, i] / probs[b].sum(): the distribution of torch.multinomial(probs, 1), from B uniform numbers.

    Inverse CDF in two levels: a block of CATEGORICAL_BLOCK entries by the cumulative sum of block totals, then an
    entry by the cumulative sum inside that block, both in float64, so no entry's share is off by more than float32
    rounding. A zero-probability entry is never drawn."""
    rows, width = probs.shape
    pad = (-width) % CATEGORICAL_BLOCK
    blocks = (F.pad(probs, (0, pad)) if pad else probs).reshape(rows, -1, CATEGORICAL_BLOCK)
    totals = blocks.sum(-1, dtype=torch.float64)  # [B, blocks]
    cum = totals.cumsum(-1)
    if not bool(torch.isfinite(cum[:, -1]).all() & (cum[:, -1] > 0).all()):
        raise ValueError("categorical: each row of probs needs a finite, positive sum")
    u = torch.rand(rows, 1, dtype=torch.float64, device=probs.device) * cum[:, -1:]
    k = torch.minimum(torch.searchsorted(cum, u, right=True), (cum < cum[:, -1:]).sum(-1, keepdim=True))
    u = u - (cum.gather(1, k) - totals.gather(1, k))  # what is left to cover inside block k
    inner = blocks[torch.arange(rows, device=probs.device), k[:, 0]].double().cumsum(-1)  # [B, CATEGORICAL_BLOCK]
    j = torch.minimum(torch.searchsorted(inner, u, right=True), (inner < inner[:, -1:]).sum(-1, keepdim=True))
    return k * CATEGORICAL_BLOCK + j


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = logsumexp(z) - sum(softmax(z) * z) with z = logits / temperature, per position ([N, ..., V] -> [N, ...])."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    out = []
    for row in logits:  # one row at a time, as in _row_logprobs
        z = _acc(row) / temperature
        out.append(torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1))
    return torch.stack(out)


def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) for tokens sampled from the policy (Schulman, "Approximating KL").

    k1 = logprobs - ref_logprobs (unbiased, can be negative);
    k3 = (r - 1) - log r with r = exp(ref_logprobs - logprobs) (unbiased, >= 0 elementwise, lower variance).
    """
    if estimator == "k1":
        return _acc(logprobs) - _acc(ref_logprobs)
    if estimator == "k3":
        d = _acc(ref_logprobs) - _acc(logprobs)
        return (torch.expm1(d) - d).clamp_min(0.0)
    raise ConfigError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def per_token_rewards(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float | torch.Tensor,
    estimator: str = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [B, T], kl [B, T]) with kl = kl_per_token(...) on real tokens and 0 on padding, and

    rewards[b, t] = -kl_coef * kl[b, t] + scores[b] * [t == last_b], last_b = the last real token of row b
    (= mask.sum(1) - 1 for the usual prefix masks). A row with no real token gets all-zero rewards and kl: its score
    is dropped, since no token could carry it.
    """
    m = mask.bool()
    kl = _real(kl_per_token(logprobs, ref_logprobs, estimator), m)
    rewards = -kl_coef * kl
    last = torch.where(m, torch.arange(m.shape[1], device=m.device), -1).amax(1)
    bonus = torch.where(last >= 0, _acc(scores), 0.0).to(rewards.dtype)
    rewards = rewards.scatter_add(1, last.clamp_min(0)[:, None], bonus[:, None])
    return rewards, kl


def truncate_after_eos(
    responses: torch.Tensor, eos_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(responses with every token after the first EOS set to pad_id, mask, has_eos).

    mask [B, T] (long, like attention masks) is 1 up to and including the first EOS, or on the whole row when the
    row has no EOS (a truncated answer); has_eos [B] is bool.
    """
    if eos_id == pad_id:
        raise ValueError("truncate_after_eos needs pad_id != eos_id")
    is_eos = responses == eos_id
    has_eos = is_eos.any(1)
    t = responses.shape[1]
    pos = torch.arange(t, device=responses.device)
    first = torch.where(is_eos, pos, t).amin(1)  # t when absent: keep the whole row
    keep = pos[None] <= first[:, None]
    return torch.where(keep, responses, pad_id), keep.long(), has_eos


def apply_missing_eos_penalty(scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """scores - penalty * [answer has no EOS]; penalty None returns scores unchanged."""
    if penalty is None:
        return scores
    return scores - penalty * (~has_eos.bool()).to(scores.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, (advantages, returns), both [B, T] and 0 on padding:

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns_t = A_t + V_t,
    with V_{t+1} = A_{t+1} = 0 after the last real token (the episode ends there).
    """
    m = mask.bool()
    r, v = _real(rewards, m), _real(values, m)
    n = r.shape[1]
    last = r.new_zeros(r.shape[0])
    adv = []
    for t in reversed(range(n)):
        next_v = v[:, t + 1] if t + 1 < n else torch.zeros_like(last)
        last = torch.where(m[:, t], r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last, 0.0)
        adv.append(last)
    advantages = torch.stack(adv[::-1], 1) if adv else torch.zeros_like(r)
    return advantages, _real(advantages + v, m)


class PolicyLoss(NamedTuple):
    """The PPO policy loss (keeps its graph) and its metrics (detached scalars)."""

    loss: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_max: torch.Tensor


def clipped_surrogate_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> PolicyLoss:
    """PPO-clip: ratio = exp(logprobs - old_logprobs),

    loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))),
    clipfrac = masked_mean([clipped term > unclipped term]), approx_kl = 0.5 * masked_mean((logprobs - old)^2),
    ratio_mean = masked_mean(ratio), ratio_max = max of ratio over real tokens.
    """
    m = mask.bool()
    diff = _real(logprobs, m) - _real(old_logprobs, m)
    ratio = torch.exp(diff)
    adv = _real(advantages, m)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        return PolicyLoss(
            loss,
            masked_mean((clipped > unclipped).to(diff.dtype), m),
            0.5 * masked_mean(diff**2, m),
            masked_mean(ratio, m),
            torch.where(m, ratio, 0.0).amax(),
        )


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, clipfrac) with v_clip = clip(values, old_values - c, old_values + c),

    loss = 0.5 * masked_mean(max((values - R)^2, (v_clip - R)^2)), clipfrac = masked_mean([clipped error larger]).
    """
    m = mask.bool()
    v, old, ret = _real(values, m), _real(old_values, m), _real(returns, m)
    v_clip = old + (v - old).clamp(-cliprange_value, cliprange_value)
    err, err_clip = (v - ret) ** 2, (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), m)
    return loss, masked_mean((err_clip > err).to(err.dtype), m).detach()


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over real tokens; NaN when Var[returns] = 0 (as Stable-Baselines3)."""
    var_y = masked_var(returns, mask)
    ev = 1.0 - masked_var(_real(returns, mask) - _real(values, mask), mask) / var_y
    return torch.where(var_y > 0, ev, torch.nan)


class RankingPairs(NamedTuple):
    """Index tensors into the batch's concatenated scores: pair i says answer winners[i] beat losers[i]."""

    winners: torch.Tensor  # long [P]
    losers: torch.Tensor  # long [P]
    weights: torch.Tensor  # float32 [P]: 1 / (number of pairs of that pair's prompt)


def _rank_groups(p: int, ranking: Sequence, k: int | None) -> list[list[int]]:
    """Validate prompt p's ranking as a partition of range(K) into non-empty groups; return the groups."""
    try:
        groups = [
            [operator.index(g)] if not isinstance(g, Sequence) else [operator.index(i) for i in g] for g in ranking
        ]
    except TypeError:
        raise DataError(f"ranking {p}: {ranking!r} is not a list of rank groups of answer indices") from None
    flat = [i for g in groups for i in g]
    k = len(flat) if k is None else k
    if k < 2:
        raise DataError(f"ranking {p}: a ranking needs at least 2 answers, got {k}")
    problems = []
    if missing := sorted(set(range(k)) - set(flat)):
        problems.append(f"missing {missing}")
    if dup := sorted({i for i in flat if flat.count(i) > 1}):
        problems.append(f"repeated {dup}")
    if bad := sorted({i for i in flat if not 0 <= i < k}):
        problems.append(f"out of range {bad}")
    if any(not g for g in groups):
        problems.append("an empty rank group")
    if problems:
        raise DataError(f"ranking {p}: {ranking!r} is not a ranking of answers 0..{k - 1}: {'; '.join(problems)}")
    if len(groups) < 2:
        raise DataError(f"ranking {p}: all {k} answers are tied, so there is nothing to compare")
    return groups


def ranking_pairs(
    rankings: Sequence[Sequence[int | Sequence[int]]],
    sizes: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> RankingPairs:
    """Every (better, worse) pair of every prompt's ranking, as indices into the concatenated scores.

    rankings[p] lists prompt p's rank groups, best first, each a list of answer indices 0..K_p-1 (a bare int is a
    group of one). Tied answers share a group and are not compared: A > C > B > D is [[0], [2], [1], [3]] (6 pairs),
    A > B = C > D is [[0], [2, 1], [3]] (5 pairs), a plain preference pair is [[0], [1]]. Answer i of prompt p is
    scores[offset_p + i], offset_p = K_0 + ... + K_{p-1}; K_p = sizes[p] when given, else the number of indices in
    the ranking. weight = 1 / (pairs of that prompt), so each prompt's weights sum to 1 and prompts count equally.
    Raises DataError (a ValueError) for a ranking that is not a partition of range(K_p), K_p < 2, or all ties.
    """
    if not rankings:
        raise DataError("no rankings given")
    if sizes is not None and len(sizes) != len(rankings):
        raise DataError(f"{len(rankings)} rankings but {len(sizes)} sizes")
    winners, losers, weights = [], [], []
    offset = 0
    for p, ranking in enumerate(rankings):
        groups = _rank_groups(p, ranking, None if sizes is None else sizes[p])
        pairs = [(w, lo) for i, g in enumerate(groups) for worse in groups[i + 1 :] for w in g for lo in worse]
        winners += [offset + w for w, _ in pairs]
        losers += [offset + lo for _, lo in pairs]
        weights += [1.0 / len(pairs)] * len(pairs)
        offset += sum(len(g) for g in groups)
    as_long = dict(dtype=torch.long, device=device)
    return RankingPairs(
        torch.tensor(winners, **as_long),
        torch.tensor(losers, **as_long),
        torch.tensor(weights, dtype=torch.float32, device=device),
    )


def pairwise_ranking_loss(
    scores: torch.Tensor,
    winners: torch.Tensor,
    losers: torch.Tensor,
    weights: torch.Tensor | None = None,
    margin: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """loss = -sum_pairs w * log sigmoid(s_w - s_l - margin) / sum_pairs w  (scores: 1-D, all answers of the batch).

    With ranking_pairs' weights, sum w = number of prompts, so this is the mean over prompts of each prompt's mean
    over its pairs; for one K-way ranking without ties it is -(1 / C(K, 2)) * sum log sigmoid(r_w - r_l), as
    InstructGPT. weights=None is the plain mean over pairs. `margin` is a float or a per-pair tensor.
    """
    s = _acc(scores)
    nll = -F.logsigmoid(s[winners] - s[losers] - margin)
    if weights is None:
        return nll.mean()
    w = weights.to(nll.dtype)
    return (w * nll).sum() / w.sum()


@torch.no_grad()
def pairwise_accuracy(
    scores: torch.Tensor, winners: torch.Tensor, losers: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_pairs w * [s_w > s_l] / sum_pairs w (a tie counts as wrong).

    With ranking_pairs' weights every prompt counts equally (mean over prompts of each prompt's pair accuracy);
    weights=None gives the plain fraction of pairs ordered correctly.
    """
    s = _acc(scores)
    right = (s[winners] > s[losers]).to(s.dtype)
    if weights is None:
        return right.mean()
    w = weights.to(s.dtype)
    return (w * right).sum() / w.sum()
