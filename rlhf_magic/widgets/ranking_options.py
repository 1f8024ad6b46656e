"""Checks of the ranking panel's options: every mistake is a one-line ConfigError/DataError, raised before
anything is written."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

OPTIONS = ("prompts", "policy", "responses", "k", "file", "ties", "labeler", "temperature", "top_p", "seed",
           "max_new_tokens", "prefetch", "title")  # fmt: skip


def unique(prompts: list[str]) -> list[str]:
    out = list(dict.fromkeys(prompts))
    if len(out) < len(prompts):
        warnings.warn(f"prompts: {len(prompts) - len(out)} duplicate prompt(s) dropped", stacklevel=3)
    return out


def check_options(
    k: Any, ties: Any, labeler: Any, temperature: Any, top_p: Any, seed: Any, max_new: Any, prefetch: Any
) -> int:
    k = 4 if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= 9:
        raise ConfigError(f"k = {k!r}: the number of answers per prompt must be an integer from 2 to 9")
    if not isinstance(ties, bool):
        raise ConfigError(f"ties = {ties!r}: use True or False")
    if not isinstance(labeler, str):
        raise ConfigError(f"labeler = {labeler!r}: give the labeler's name as a string")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ConfigError(f"temperature = {temperature!r}: use a number >= 0 (0 is greedy: K identical answers)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p = {top_p!r}: use a number in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"seed = {seed!r}: use an integer or None")
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise ConfigError(f"max_new_tokens = {max_new!r}: use a positive integer")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 1:
        raise ConfigError(f"prefetch = {prefetch!r}: use a positive integer (prompts sampled per batched call)")
    return k


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
