"""Checks of the ranking panel's inputs beyond RankConfig's types and ranges (prompts, policy, responses): every
mistake is a one-line ConfigError/DataError, raised before anything is written."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError


def unique(prompts: list[str]) -> list[str]:
    out = list(dict.fromkeys(prompts))
    if len(out) < len(prompts):
        warnings.warn(f"prompts: {len(prompts) - len(out)} duplicate prompt(s) dropped", stacklevel=3)
    return out


def resolve_policy(policy: Any, session: Any, needed: bool) -> Any:
    """The policy handle (a session name is looked up); with responses= it only names the answers' source."""
    if isinstance(policy, str) and needed:
        if session is None:
            raise ConfigError(f"policy = {policy!r}: pass the %%sft result itself (no session to look names up in)")
        policy = session[policy]  # RLHFError with a did-you-mean when the name is unknown
    if policy is None:
        if needed:
            raise ConfigError("%rank needs policy=<an %%sft result> to sample answers, or responses=[[...], ...]")
        return None
    if needed and not callable(getattr(policy, "sample", None)):
        raise ConfigError(f"policy = {policy!r} is not a policy (it has no .sample); pass an %%sft result")
    return policy


def check_responses(responses: Any, prompts: list[str], k: int | None) -> list[list[str]] | None:
    if responses is None:
        return None
    if isinstance(responses, dict):
        missing = [p for p in prompts if p not in responses]
        if missing:
            raise ConfigError(f"responses has no answers for prompt {missing[0]!r}")
        responses = [responses[p] for p in prompts]
    if isinstance(responses, (str, bytes)) or not isinstance(responses, Sequence) or len(responses) != len(prompts):
        raise ConfigError(f"responses must be a list with one list of answers per prompt ({len(prompts)} prompts)")
    out = []
    for i, answers in enumerate(responses):
        if isinstance(answers, (str, bytes)) or not isinstance(answers, Sequence):
            raise ConfigError(f"responses[{i}] must be a list of answer strings")
        if not 2 <= len(answers) <= 9 or (k is not None and len(answers) != k):
            want = f"k = {k}" if k is not None else "2 to 9"
            raise ConfigError(f"responses[{i}] has {len(answers)} answers; expected {want}")
        if not all(isinstance(a, str) for a in answers):
            raise ConfigError(f"responses[{i}]: every answer must be a string")
        out.append(list(answers))
    return out


def policy_name(policy: Any) -> str | None:
    if policy is None or isinstance(policy, str):
        return policy
    return str(getattr(policy, "name", type(policy).__name__))
