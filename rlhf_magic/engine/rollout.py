"""One PPO rollout, as the numbered response-processing steps of lm-human-preference-details.

1. sample answers (batched, KV cache, left padding, stop at EOS)  2. truncate after the first EOS
3. policy logprobs and values (kept from the decode steps, or from one forward pass)  4. reference logprobs
5. scores (one batched reward call)  6. missing-EOS penalty  7. per-token KL and rewards (score at the last real
token)  8. GAE and whitened advantages
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import ops
from ..errors import ConfigError, RLHFError, calling
from . import fastpath
from .adapters import use_adapter
from .generation import sample
from .models import LoadedModel
from .modules import PolicyValue, response_logprobs
from .reward_model import RewardHandle, make_head

if TYPE_CHECKING:
    from .handles import PolicyHandle
    from .runtime import Runtime


@dataclass
class Roles:
    """Who plays what on the (usually shared) model: adapter names, None meaning 'adapters off'."""

    lm: LoadedModel
    policy: str | None
    reference: str | None
    ref_lm: LoadedModel  # the same object as lm unless the policy is a private full copy
    score: Callable[..., torch.Tensor]  # (prompts, texts, ids, mask, prefix) -> scores
    autocast: Any
    adapters: tuple[str, ...] = ()  # every adapter a role uses on lm (policy, reference, a same-base reward model)
    depth: int = 0  # bottom layers that no role adapts, computed once per rollout on the fast path (0: off)
    bf16_weights: bool = False  # precision 'bf16' on a CPU: sampling reads the frozen weights' bf16 copies


@dataclass
class Rollout:
    prompts: list[str]
    texts: list[str]
    input_ids: torch.Tensor  # [B, Tq + Tr] query (left-padded) + response (PAD after the first EOS)
    attention_mask: torch.Tensor
    start: int  # Tq: where the response begins
    mask: torch.Tensor  # [B, Tr] 1 on response tokens up to and including the first EOS
    has_eos: torch.Tensor
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    prefix: fastpath.Prefix | None = None  # the shared frozen-prefix hidden states of these rows
    hidden: torch.Tensor | None = None  # [B, Tr, H] captured while sampling: the states that predicted each token
    error: RLHFError | None = None  # the reward's own error (its scores are then NaN until every process stops)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.start :]


@torch.no_grad()
def share_prefix(roles: Roles, ro: Rollout) -> None:
    """The bottom `roles.depth` layers' hidden states of the rollout's tokens, once for every role and epoch."""
    if roles.depth > 0:
        with roles.autocast():
            ro.prefix = fastpath.prefix_states(roles.lm.model, ro.input_ids, ro.attention_mask, roles.depth)


def generate(roles: Roles, prompts: list[str], cfg: Any, seed: int, capture: bool = False) -> Rollout:
    """Steps 1-2: sample with the policy adapter, then cut everything after the first EOS.

    capture=True keeps the policy's logprobs and final hidden states from the decode steps themselves (step 3
    without another forward pass; the caller applies the value head)."""
    lm, tok = roles.lm, roles.lm.tokenizer
    with use_adapter(lm, roles.policy):
        out = sample(
            lm,
            prompts,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            seed=seed,
            autocast=roles.autocast,
            capture=capture,
            bf16_weights=roles.bf16_weights,
        )
    responses, mask, has_eos = ops.truncate_after_eos(out.responses, tok.eos_token_id, tok.pad_token_id)
    ids = torch.cat([out.queries, responses], 1)
    attn = torch.cat([out.query_mask, mask], 1)
    texts = [tok.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(responses, mask)]
    ro = Rollout(prompts, texts, ids, attn, out.queries.shape[1], mask.to(torch.float32), has_eos)
    ro.logprobs, ro.hidden = out.logprobs, out.hidden
    return ro


def policy_forward(
    module: PolicyValue, ro: Rollout, temperature: float, entropy: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logprobs, values, entropy or None) of the rollout's tokens under the current policy, from one trunk
    forward."""
    return module(ro.input_ids, ro.attention_mask, ro.start, ro.prefix, temperature, entropy)


@torch.no_grad()
def reference_logprobs(roles: Roles, ro: Rollout, temperature: float) -> torch.Tensor:
    """Step 4: the frozen SFT policy's logprobs of the same tokens, with the same temperature."""
    prefix = ro.prefix if roles.ref_lm is roles.lm else None
    with use_adapter(roles.ref_lm, roles.reference), roles.autocast():
        model = roles.ref_lm.model
        lp = response_logprobs(model, ro.input_ids, ro.attention_mask, ro.start, prefix=prefix, temperature=temperature)
        return lp.logprobs


def score(roles: Roles, ro: Rollout, penalty: float | None) -> None:
    """Steps 5-6: one batched reward call, then the missing-EOS penalty. A reward that raises gives NaN scores
    and keeps its error in `ro.error`: every process stops together (see `bad_score`), then this one raises it."""
    try:
        scores = roles.score(ro.prompts, ro.texts, ro.input_ids, ro.attention_mask, ro.prefix)
    except RLHFError as e:
        ro.error, scores = e, torch.full((len(ro.texts),), math.nan, device=ro.input_ids.device)
    ro.scores = ops.apply_missing_eos_penalty(scores.float(), ro.has_eos, penalty)


def advantages(ro: Rollout, cfg: Any, kl_coef: float) -> None:
    """Steps 7-8: per-token KL penalty with the score at the last real token, optional reward whitening
    (no mean shift), GAE, and masked advantage whitening."""
    ro.rewards, ro.kl = ops.per_token_rewards(
        ro.scores, ro.logprobs, ro.ref_logprobs, ro.mask, kl_coef, cfg.kl_estimator
    )
    rewards = ops.masked_whiten(ro.rewards, ro.mask, shift_mean=False) if cfg.whiten_rewards else ro.rewards
    adv, ro.returns = ops.gae(rewards, ro.values, ro.mask, cfg.gamma, cfg.lam)
    ro.advantages = ops.masked_whiten(adv, ro.mask) if ro.mask.sum() > 1 else adv


def callable_scorer(fn: Callable[..., Any], device: torch.device) -> Callable[..., torch.Tensor]:
    """Wrap a user's f(prompts, responses) -> list[float]: wrong length or non-numbers raise a one-line error."""
    name = getattr(fn, "__name__", type(fn).__name__)

    def scorer(prompts: list[str], texts: list[str], ids: torch.Tensor, mask: torch.Tensor, _: Any) -> torch.Tensor:
        with calling("reward", fn):  # one line naming fn, the exception and its line; %tb has the traceback
            out = fn(list(prompts), list(texts))
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ConfigError(
                f"reward {name}() must return a list of numbers, one per answer; got {_brief(out)}"
            ) from None
        if len(values) != len(texts):
            raise ConfigError(
                f"reward {name}() returned {len(values)} scores for {len(texts)} answers; "
                f"return exactly one number per answer"
            )
        return torch.tensor(values, dtype=torch.float32, device=device)

    return scorer


def _brief(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) < 80 else text[:77] + "..."


def bad_score(ro: Rollout, bad: int | None) -> str:
    """What was wrong with this process's scores ('' when only another process's were), once every process has
    agreed to stop; where the reward raised, its own one-line error instead."""
    if ro.error is not None:
        raise ro.error
    if bad is None or ro.scores is None:
        return ""
    return f"{float(ro.scores[bad])} for answer {bad} ({ro.texts[bad][:60]!r})"


def first_bad_score(scores: torch.Tensor) -> int | None:
    bad = (~torch.isfinite(scores)).nonzero()
    return int(bad[0]) if len(bad) else None


def mean(x: torch.Tensor) -> float:
    v = float(x.float().mean()) if x.numel() else math.nan
    return v


# ------------------------------------------------------------------------------------------------- roles
def as_list(adapter: Any) -> list[str]:
    if adapter is None:
        return []
    return [adapter] if isinstance(adapter, str) else list(adapter)


def value_head_for(reward: Any, lm: LoadedModel, runtime: Runtime) -> nn.Linear:
    """Where the reward model shares the hidden size: its head, normalised (reward = (score - mean) * gain), so the
    first values are on the scale of the rewards; else initialised like a reward head."""
    head = make_head(lm.model.config.hidden_size, runtime.device)
    if isinstance(reward, RewardHandle) and reward.head.weight.shape == head.weight.shape:
        with torch.no_grad():
            head.weight.copy_(reward.head.weight * reward.gain)
            head.bias.copy_((torch.zeros_like(head.bias) - reward.mean) * reward.gain)
    return head


def scorer_for(reward: Any, pol: PolicyHandle, lm: LoadedModel, runtime: Runtime) -> Any:
    """Score token rows directly when the reward model shares the tokenizer; a callable gets the texts."""
    if isinstance(reward, RewardHandle):
        if reward.tokenizer.get_vocab() != lm.tokenizer.get_vocab():
            raise ConfigError(
                f"reward model {reward.name!r} uses a different tokenizer than policy {pol.name!r}, so "
                f"its scores would need re-tokenised text; train the reward model from this policy, or "
                f"pass reward = lambda p, r: {reward.name}.reward(p, r)"
            )
        same_base = reward.lm is lm  # then the rollout's shared frozen prefix is valid for it too
        return lambda prompts, texts, ids, mask, prefix: reward.reward_tokens(ids, mask, prefix if same_base else None)
    if callable(reward):
        return callable_scorer(reward, runtime.device)
    raise ConfigError(
        f"reward = {reward!r} is not valid; expected a reward handle or a callable f(prompts, responses) -> list[float]"
    )
