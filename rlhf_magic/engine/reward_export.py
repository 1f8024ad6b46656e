"""A reward model as a standard `AutoModelForSequenceClassification` checkpoint, and back.

The checkpoint is the backbone (adapters merged) plus a bias-free `score` head with one label, so TRL, OpenRLHF and
any other trainer read it. rlhf-magic's score is `(head(h) - mean) * gain` = `gain * w . h + gain * (bias - mean)`,
where h is the last hidden state at the answer's EOS (the last non-pad token, which is the token transformers pools).
The gain goes into `score.weight` exactly. The constant `gain * (bias - mean)` needs a bias, which transformers'
score heads do not have. Where the backbone ends in a LayerNorm with a bias (GPT-2, which the tests check; Pythia,
Phi-2 and Falcon end the same way) it moves exactly into that bias, and the logits equal `score()`. RMSNorm backbones
(Llama, Qwen, Mistral, Gemma, SmolLM) have no constant to carry it, so their logits are `score()` minus that constant,
which `config.rlhf_magic` records as `score_offset` (rankings, pairwise differences and group-normalised rewards are
unaffected).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

KEY = "rlhf_magic"  # the config.json entry holding the normalisation
TOKENS = "chat-formatted prompt + response + EOS, right-padded; the logit at the last non-pad token (the EOS)"


def seq_cls_model(model: Any, weight: torch.Tensor, extra: dict[str, Any]) -> Any:
    """A `*ForSequenceClassification` around the causal LM `model`'s own backbone (shared, not copied) with a bias-free
    one-label `score` head holding `weight` [H]; `extra` lands in its config under `rlhf_magic`."""
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(model.config)
    config.num_labels, config.architectures = 1, None
    setattr(config, KEY, extra)
    try:
        with torch.device("meta"):  # the random backbone it builds is replaced below: never allocate it
            cls = AutoModelForSequenceClassification.from_config(config)
    except ValueError as e:
        raise ModelError(f"a {config.model_type} reward model has no sequence-classification class ({e})") from None
    prefix = cls.base_model_prefix
    trunk, score = getattr(model, prefix, None), getattr(cls, "score", None)
    fits = type(trunk) is type(getattr(cls, prefix, None)) and isinstance(score, nn.Linear) and score.bias is None
    if not fits:
        raise ModelError(f"{type(cls).__name__} does not hold {type(model).__name__}'s backbone and one score head")
    setattr(cls, prefix, trunk)
    cls.score = nn.Linear(weight.shape[-1], 1, bias=False, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        cls.score.weight.copy_(weight.reshape(1, -1))
    return cls


def fold_offset(cls: Any, state: dict[str, torch.Tensor], offset: float, probe: torch.Tensor) -> str | None:
    """Add `offset` to every logit of `cls` by shifting the bias of the LayerNorm that produces its last hidden state
    (in `state`, the dict that gets saved). Returns that bias's name, or None where the backbone ends otherwise.
    `probe`: a few token ids, run once to find which module's output the backbone returns."""
    prefix = cls.base_model_prefix
    trunk, w = getattr(cls, prefix), cls.score.weight.detach().float().reshape(-1)
    norms = {n: m for n, m in trunk.named_modules() if isinstance(m, nn.LayerNorm) and m.bias is not None}
    if not norms or offset == 0.0 or float(w @ w) == 0.0:
        return None
    outputs: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: outputs.__setitem__(n, out)) for n, m in norms.items()]
    try:
        with torch.no_grad():
            last = trunk(input_ids=probe.to(w.device), use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    name = next((n for n, out in outputs.items() if out.shape == last.shape and torch.equal(out, last)), None)
    if name is None:
        return None
    key = f"{prefix}.{name}.bias"
    bias = state[key]
    state[key] = (bias.float() + offset * w / float(w @ w)).to(bias.dtype)  # w . shift = offset
    return key


def write_reward(folder: Path, model: Any, handle: Any) -> dict[str, Any]:
    """Save `model` (the merged backbone) with `handle`'s head and normalisation as a sequence-classification
    checkpoint in `folder`; returns what `config.rlhf_magic` records."""
    head = handle.head
    weight = head.weight.detach().reshape(-1) * handle.gain
    bias = float(head.bias.detach()) if head.bias is not None else 0.0
    offset = (bias - handle.mean) * handle.gain
    extra = {"mean": handle.mean, "gain": handle.gain, "score_offset": offset, "folded_into": None}
    extra |= {"max_length": handle.max_length, "score": "(raw - mean) * gain = logits + score_offset", "input": TOKENS}
    dtype = next(model.parameters()).dtype
    cls = seq_cls_model(model, weight.to(dtype), extra)
    state = cls.state_dict()
    tok = handle.tokenizer
    probe = torch.tensor([[tok.bos_token_id or tok.eos_token_id, tok.eos_token_id]])
    folded = fold_offset(cls, state, offset, probe)
    if folded is not None:
        extra |= {"score_offset": 0.0, "folded_into": folded}
    cls.config.pad_token_id = tok.pad_token_id
    cls.save_pretrained(folder, state_dict=state)
    return extra


def saved_format(path: Path) -> dict[str, Any] | None:
    """The normalisation of a one-label sequence-classification checkpoint in `path` (rlhf-magic's, or any other
    trainer's, which then scores raw); None when `path` holds no such checkpoint."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    archs = config.get("architectures") or []
    if not any(str(a).endswith("ForSequenceClassification") for a in archs):
        return None
    labels = config.get("num_labels") or len(config.get("id2label") or {0: ""})
    if labels != 1:
        raise ModelError(f"{str(path)!r} is a classifier with {labels} labels; a reward model has one (num_labels = 1)")
    return {"mean": 0.0, "gain": 1.0, "score_offset": 0.0, **(config.get(KEY) or {})}


def read_head(path: Path, extra: dict[str, Any], device: torch.device) -> nn.Linear:
    """rlhf-magic's head from the checkpoint's `score.weight`: `(head(h) - mean) * gain` gives its logits plus
    `score_offset` back."""
    weight = read_tensor(path, "score.weight").float().reshape(-1)
    gain, mean, offset = float(extra["gain"]), float(extra["mean"]), float(extra["score_offset"])
    head = nn.Linear(weight.shape[0], 1).to(device)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(1, -1) / gain)
        head.bias.fill_(offset / gain + mean)
    return head


@contextlib.contextmanager
def quiet_load() -> Iterator[None]:
    """No load report from transformers while the checkpoint loads as a causal LM: its `score.weight` is read
    separately (and an untied `lm_head`, which scoring never uses, is the one weight left at its initial values)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def read_tensor(path: Path, key: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint, single-file or sharded."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    try:
        name = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
        with safe_open(str(path / name), framework="pt") as f:
            return f.get_tensor(key)
    except (OSError, KeyError) as e:
        raise ModelError(
            f"{str(path)!r}: no {key} in its safetensors weights ({e}); expected a folder written by save_pretrained()"
        ) from None
