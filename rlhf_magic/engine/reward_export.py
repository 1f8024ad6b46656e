"""A reward model as a standard `AutoModelForSequenceClassification` checkpoint, and back.

The checkpoint is the backbone (adapters merged) plus the reward model's own bias-free `score` head with one label,
so TRL, OpenRLHF and any other trainer read it, and its logits are `rm.score()` on every backbone (the logit at the
answer's EOS, the last non-pad token, which is the token transformers pools). The normalisation that turns a score
into the reward PPO optimises, `reward = (score - mean) * gain`, is not folded into the weights (an RMSNorm backbone
has no bias that could carry the shift): `config.rlhf_magic` records `mean` and `gain`, as OpenRLHF's reward models
record theirs. Checkpoints written before the logits were the score (with a `score_offset`) still load.
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
REWARD = "logits = rm.score(); the reward PPO optimises = (logits - mean) * gain"


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


def write_reward(folder: Path, model: Any, handle: Any) -> dict[str, Any]:
    """Save `model` (the merged backbone) with `handle`'s head and normalisation as a sequence-classification
    checkpoint in `folder`; returns what `config.rlhf_magic` records."""
    extra = {
        "mean": handle.mean,
        "gain": handle.gain,
        "max_length": handle.max_length,
        "reward": REWARD,
        "input": TOKENS,
    }
    dtype = next(model.parameters()).dtype
    cls = seq_cls_model(model, handle.head.weight.detach().reshape(-1).to(dtype), extra)
    cls.config.pad_token_id = handle.tokenizer.pad_token_id
    cls.save_pretrained(folder)
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
    return {"mean": 0.0, "gain": 1.0, **(config.get(KEY) or {})}


def read_head(path: Path, extra: dict[str, Any], device: torch.device) -> tuple[nn.Linear, float]:
    """rlhf-magic's bias-free head from the checkpoint's `score.weight`, and the `mean` of its normalisation."""
    weight = read_tensor(path, "score.weight").float().reshape(-1)
    mean = float(extra["mean"])
    if "score_offset" in extra:  # an older checkpoint: its weight was gain * w, and its logits + offset the reward
        weight, mean = weight / float(extra["gain"]), -float(extra["score_offset"]) / float(extra["gain"])
    head = nn.Linear(weight.shape[0], 1, bias=False).to(device)
    with torch.no_grad():
        head.weight.copy_(weight.reshape(1, -1))
    return head, mean


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
