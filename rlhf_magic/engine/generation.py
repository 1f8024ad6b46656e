"""Batched sampling with a KV cache and left padding, stopping at EOS."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from .. import ops
from ..errors import ConfigError
from . import fastpath, memory
from .divergence import finite_logits
from .models import LoadedModel
from .modules import trunk_and_head
from .patching import PROCESS, patched
from .text import encode, format_prompt


@dataclass
class Samples:
    """Token ids of a generated batch. `queries` are left-padded, `responses` right-padded with PAD."""

    queries: torch.Tensor  # [B, Tq]
    query_mask: torch.Tensor  # [B, Tq] 1 on real tokens
    responses: torch.Tensor  # [B, Tr]
    hidden: torch.Tensor | None = None  # [B, Tr, H] final hidden states that predicted each response token
    logprobs: torch.Tensor | None = None  # [B, Tr] log-probs of the sampled tokens at the sampling temperature


# One thread uses the models at a time: sample() holds it (seeding the global RNG, eval() and generate() are
# process-wide), a ranking panel's background sampler holds it for each batch and a stage run from a magic for the
# whole stage, so each waits for the other's batch or stage instead of running under it.
MODEL_LOCK = threading.RLock()
_SHOULD_STOP: ContextVar[Callable[[], bool] | None] = ContextVar("rlhf_magic_should_stop", default=None)


class SamplingStopped(Exception):
    """sample() ended between two decode steps because the caller's stop check said so (see `stoppable`)."""


@contextmanager
def stoppable(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Inside, in this thread, sample() calls `should_stop()` before each decode step (the LM head's forward, on
    both decoders) and raises SamplingStopped once it is true."""
    token = _SHOULD_STOP.set(should_stop)
    try:
        yield
    finally:
        _SHOULD_STOP.reset(token)


def stop_requested() -> bool:
    """Whether this thread's stop check (see `stoppable`) asks to stop now: a policy of your own that a ranking
    panel samples from may call it between its steps and end early."""
    should_stop = _SHOULD_STOP.get()
    return should_stop is not None and bool(should_stop())


@contextmanager
def _stop_check(model: Any) -> Iterator[None]:
    should_stop = _SHOULD_STOP.get()
    head = getattr(model, "get_output_embeddings", lambda: None)() if should_stop is not None else None
    if head is None:
        yield
        return
    me = threading.get_ident()

    def check(*_: Any) -> None:
        if threading.get_ident() == me and should_stop():
            raise SamplingStopped("sampling stopped")

    handle = head.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def encode_prompts(
    lm: LoadedModel, prompts: list[str], max_prompt_tokens: int = 1024, chat: bool = True
) -> list[list[int]]:
    """Chat-formatted prompt ids (raw text ids with chat=False), keeping the last `max_prompt_tokens` tokens."""
    return [encode(lm.tokenizer, format_prompt(lm.tokenizer, p) if chat else p)[-max_prompt_tokens:] for p in prompts]


def context_length(lm: LoadedModel) -> int | None:
    """Tokens the model attends over: its config's max_position_embeddings (n_positions), else the tokenizer's
    model_max_length; None when neither says."""
    config = getattr(lm.model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n
    n = getattr(lm.tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < 1 << 30 else None  # transformers' "no limit" is int(1e30)


def check_new_tokens(lm: LoadedModel, rows: list[list[int]], max_new_tokens: Any) -> None:
    """One line for a max_new_tokens that is not a positive integer, or that the model's context cannot hold after
    the longest prompt (every entry to sampling: %%ppo, %rank, %compare, handle.generate)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens!r}: use a positive integer")
    context, longest = context_length(lm), max(map(len, rows), default=0)
    if context is not None and longest + max_new_tokens > context:
        fix = f"so use at most {context - longest}" if longest < context else "so shorten the prompts"
        raise ConfigError(
            f"max_new_tokens = {max_new_tokens}: the model's context is {context} tokens and the longest prompt "
            f"has {longest}, {fix}"
        )


def _one_thread(fn: Callable[..., Samples]) -> Callable[..., Samples]:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> Samples:
        with MODEL_LOCK:
            return fn(*args, **kwargs)

    return locked


@_one_thread
@torch.no_grad()
def sample(
    lm: LoadedModel,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    autocast: Any = None,
    min_new_tokens: int = 0,
    chat: bool = True,
    capture: bool = False,
    bf16_weights: bool = False,
) -> Samples:
    """Generate for every prompt (each repeated `num_return_sequences` times) in one batched call.

    capture=True also returns, from the decode steps themselves, the final hidden state that predicted each
    response token and that token's log-prob under the raw logits at `temperature` (what PPO's rollout needs;
    None when the model post-processes its logits). bf16_weights=True (precision 'bf16' on a CPU): the fast path
    samples with the frozen weights' kept bf16 copies."""
    tok = lm.tokenizer
    rows = [r for r in encode_prompts(lm, prompts, chat=chat) for _ in range(num_return_sequences)]
    check_new_tokens(lm, rows, max_new_tokens)  # before anything is allocated
    memory.check_sampling(lm, rows, max_new_tokens, autocast=bool(autocast), capture=capture and temperature > 0)
    device = next(lm.model.parameters()).device
    ids, mask = left_pad(rows, tok.pad_token_id, device)
    settings = {
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    plain = functools.partial(_generate, lm.model, config=generation_config(tok, settings))
    decoder = fastpath.sampler(lm.model, plain, settings, bf16_weights=bf16_weights)
    if seed is not None:
        torch.manual_seed(seed)
    was_training = lm.model.training
    lm.model.eval()
    steps = _StepCapture(lm.model, temperature) if capture and temperature > 0 else None
    try:
        # no autocast on a CPU: activations, adapters and the LM head stay fp32 (so do the captured logprobs)
        ctx = autocast() if autocast and device.type != "cpu" else nullcontext()
        with ctx, steps or nullcontext(), finite_logits(lm.model, temperature), _stop_check(lm.model):
            responses = decoder(ids, mask)  # NaN logits: NonFiniteError, no draw
    finally:
        lm.model.train(was_training)
    result = Samples(ids, mask, responses)
    if steps is not None:
        result.hidden, result.logprobs = steps.collect(result.responses)
    return result


# generate()'s logits processors and warpers at their neutral values, and one sequence per row. Those whose neutral
# value is None (bad_words_ids, suppress_tokens, min_p, stop_strings...) cannot be set off here: see `_generate`.
NEUTRAL = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "remove_invalid_values": False,
    "renormalize_logits": False,
}


def generation_config(tok: Any, settings: dict[str, Any]) -> Any:
    """A complete config: only temperature (and top_p below 1) shape the sampling distribution. The model's own
    defaults (top_k=50, a checkpoint's repetition_penalty...) would sample from another distribution than the one
    whose logprobs PPO computes, which shows up as a biased (even negative) KL."""
    from transformers import GenerationConfig

    temperature = settings["temperature"]
    gen = GenerationConfig(
        max_new_tokens=settings["max_new_tokens"],
        min_new_tokens=settings["min_new_tokens"] or None,  # 0 would add a (no-op) min-length processor
        do_sample=temperature > 0,
        use_cache=True,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **NEUTRAL,
    )
    if temperature > 0:
        gen.temperature, gen.top_p, gen.top_k = temperature, settings["top_p"], 0
    return gen


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, *, config: Any) -> torch.Tensor:
    """The plain decoder: transformers' generate(), responses only. generate() fills every field that its config
    leaves unset (None) from the model's own generation_config (a checkpoint's bad_words_ids, suppress_tokens, min_p,
    stop_strings...), so for the call `config` stands in for the model's own: only what it says applies."""
    with PROCESS.generate_lock, patched(model, "generation_config", config):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return out[:, ids.shape[1] :]


class _StepCapture:
    """A hook on the LM head during generate: each step's last hidden state and the logsumexp of its scaled
    logits. The sampled token's log-prob is then its logit (hidden . W[token] + b) / T minus that logsumexp,
    without keeping any [B, V] tensor."""

    def __init__(self, model: Any, temperature: float):
        trunk, self.head = trunk_and_head(model)
        self.ok = trunk is not None  # else the logits are post-processed after the head: nothing to capture
        self.temperature = temperature
        self.hidden: list[torch.Tensor] = []
        self.lse: list[torch.Tensor] = []

    def _hook(self, module: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        self.hidden.append(inputs[0][:, -1].detach().clone())
        self.lse.append(torch.logsumexp(output[:, -1].detach().float() / self.temperature, dim=-1))

    def __enter__(self) -> None:
        self.handle = self.head.register_forward_hook(self._hook) if self.ok else None

    def __exit__(self, *a: Any) -> None:
        if self.handle is not None:
            self.handle.remove()

    def collect(self, responses: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if not self.ok or len(self.hidden) != responses.shape[1]:
            return None, None
        hidden = torch.stack(self.hidden, 1)  # [B, Tr, H]
        bias = getattr(self.head, "bias", None)
        lse = torch.stack(self.lse, 1)
        return hidden, ops.logprobs_from_hidden(hidden, self.head.weight, bias, responses, lse, self.temperature)


def decode(lm: LoadedModel, responses: torch.Tensor) -> list[str]:
    """Answer texts: everything up to the first EOS, special tokens removed."""
    tok = lm.tokenizer
    texts = []
    for row in responses.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode(row, skip_special_tokens=True).strip())
    return texts
