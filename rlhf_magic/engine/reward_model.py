"""The reward model: the SFT backbone plus a scalar head read at the last real token (the EOS) of each answer."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import ops
from ..errors import DataError, ModelError
from .adapters import adapter_parameters, merged_copy, use_adapter
from .fastpath import Prefix
from .generation import MODEL_LOCK
from .handles import Handle, atomic_dir, check_target, config_summary
from .models import LoadedModel
from .modules import OverModel, hidden_states
from .reward_export import quiet_load, read_head, saved_format, write_reward
from .runtime import Runtime
from .text import encode, format_prompt

HEAD_FILE = "reward_head.pt"


def make_head(hidden: int, device: torch.device, *, bias: bool = True) -> nn.Linear:
    """A scalar head initialised with std 1/sqrt(d+1) (as in lm-human-preferences), with a zero bias or (a reward
    head: the ranking loss sees only differences of scores, so a bias would get no gradient) none, like the `score`
    head of transformers' sequence classifiers. Built the same way either way, so it draws the same random numbers."""
    head = nn.Linear(hidden, 1).to(device)
    nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
    nn.init.zeros_(head.bias)
    if not bias:
        head.bias = None
    return head


def answer_ids(tokenizer: Any, prompt: str, response: str, max_length: int) -> list[int]:
    """Chat-formatted prompt + answer + EOS; long ones lose the start of the prompt, never the EOS."""
    ids = encode(tokenizer, format_prompt(tokenizer, prompt)) + encode(tokenizer, response) + [tokenizer.eos_token_id]
    return ids[-max_length:]


def right_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def last_token_scores(
    model: Any, head: nn.Module, ids: torch.Tensor, mask: torch.Tensor, prefix: Prefix | None = None
) -> torch.Tensor:
    """Raw scores [N]: the head on the hidden state of each row's last real token (one trunk pass for N rows)."""
    hidden = hidden_states(model, ids, mask, prefix)
    last = mask.long().cumsum(1).argmax(1)  # index of the last 1, for left or right padding alike
    picked = hidden[torch.arange(ids.shape[0], device=ids.device), last]
    with torch.autocast(ids.device.type, enabled=False):  # the scalar head stays in fp32 under mixed precision
        return head(picked.float()).squeeze(-1)


class RankingLoss(OverModel):
    """All K answers of each prompt in one forward pass; the InstructGPT loss over every ordered pair."""

    def __init__(self, model: Any, head: nn.Module, margin: float):
        super().__init__()
        self.model, self.head, self.margin = model, head, margin

    def forward(self, input_ids, attention_mask, winners, losers, weights):  # type: ignore[no-untyped-def]
        scores = last_token_scores(self.model, self.head, input_ids, attention_mask)
        loss = ops.pairwise_ranking_loss(scores, winners, losers, weights, self.margin)
        acc = ops.pairwise_accuracy(scores.detach(), winners, losers, weights)
        return loss, {"train/accuracy": acc}


class RewardHandle(Handle):
    """A trained reward model: `.score(prompts, responses)` (its logits), `.reward(...)` (the normalised score that
    PPO and GRPO optimise), `.accuracy`, `.save(path)`."""

    kind = "reward"

    def __init__(
        self,
        name: str,
        lm: LoadedModel,
        head: nn.Linear,
        *,
        runtime: Runtime,
        adapter: str | None = None,
        config: Any = None,
        parents: Iterable[str] = (),
        max_length: int = 512,
    ):
        super().__init__(name, "reward", config, parents, runtime)
        self.lm, self.adapter, self.head, self.max_length = lm, adapter, head, max_length
        self.mean, self.gain = 0.0, 1.0  # normalisation: reward = (score - mean) * gain

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def accuracy(self) -> float | None:
        """Held-out pairwise accuracy (train accuracy when nothing was held out)."""
        s = self.metrics.summary
        return s.get("eval/accuracy", s.get("train/accuracy"))

    @property
    def lineage(self) -> dict[str, str | None]:
        """Where this reward model came from: the SFT model (or checkpoint) and the preferences it learned."""
        p = list(self.parents)
        return {"model": p[0] if p else None, "preferences": p[1] if len(p) > 1 else None}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        body = adapter_parameters(self.lm, self.adapter) if self.adapter else list(self.lm.model.parameters())
        return body + list(self.head.parameters())

    @torch.no_grad()
    def raw_scores(self, ids: torch.Tensor, mask: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
        """Scores (logits) of token rows (any padding side), always in eval mode (no dropout anywhere).
        `prefix`: the rows' shared frozen-prefix states, when computed on this reward model's own base model."""
        model = self.lm.model
        was_training = model.training
        model.eval()
        try:
            with (
                MODEL_LOCK,
                use_adapter(self.lm, self.adapter),
                self.runtime.fast_path_scope(),
                self.runtime.autocast(),
            ):
                return last_token_scores(model, self.head, ids, mask, prefix).float()
        finally:
            model.train(was_training)

    def reward_tokens(self, ids: torch.Tensor, mask: torch.Tensor, prefix: Prefix | None = None) -> torch.Tensor:
        """Normalised scores [N] of token rows written with this model's tokenizer: what PPO and GRPO optimise."""
        return (self.raw_scores(ids, mask, prefix) - self.mean) * self.gain

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """One score per (prompt, response), in batches: the model's logit, which the saved checkpoint gives too
        (`AutoModelForSequenceClassification`). Only differences of scores mean something to the ranking loss."""
        out: list[float] = []
        tok, device = self.lm.tokenizer, self.runtime.device
        prompts, responses = pairs_of(prompts, responses, "score")
        for i in range(0, len(prompts), batch_size):
            rows = [
                answer_ids(tok, p, r, self.max_length)
                for p, r in zip(prompts[i : i + batch_size], responses[i : i + batch_size])
            ]
            ids, mask = right_pad(rows, tok.pad_token_id)
            out += self.raw_scores(ids.to(device), mask.to(device)).tolist()
        return out

    def reward(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> list[float]:
        """The reward PPO and GRPO optimise: `(score - mean) * gain`, where (with `normalize`) the SFT policy's own
        answers average 0 (and, with 'gain', have std 1); `mean` and `gain` are in the saved config."""
        prompts, responses = pairs_of(prompts, responses, "reward")
        return [(s - self.mean) * self.gain for s in self.score(prompts, responses, batch_size)]

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return self.reward(prompts, responses)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """A standard sequence-classification checkpoint with a model card (README.md): the backbone with its adapter
        merged, a one-label `score` head, the pad token set and the normalisation in `config.rlhf_magic`, for
        `AutoModelForSequenceClassification.from_pretrained(path)` (TRL, OpenRLHF, ...), `load_reward(path)` and
        `reward = "<path>"`. Its logits on the same tokens are `score()`; `config.rlhf_magic` holds `mean` and `gain`,
        which turn them into `reward()`.
        An existing non-empty folder is replaced only with `overwrite=True`."""
        from .export import write_card

        check_target(Path(path), overwrite)
        meta = {
            **self.describe(),
            "base": self.lm.spec,
            "mean": self.mean,
            "gain": self.gain,
            "max_length": self.max_length,
            "metrics": self.metrics.summary,
            "config": config_summary(self.config),
        }

        def write(tmp: Path) -> None:
            write_reward(tmp, model, self)
            self.lm.tokenizer.save_pretrained(tmp)
            (tmp / "rlhf_magic.json").write_text(json.dumps(meta, indent=2, default=repr))
            write_card(tmp, self)

        with MODEL_LOCK:  # the weights read here are not changing under a stage or a background sampler
            model = merged_copy(self.lm, self.adapter)
            return atomic_dir(Path(path), write, overwrite=overwrite)

    def _rows(self) -> list[tuple[str, str]]:
        acc = self.accuracy
        rows = [
            ("trained from", f"{self.lineage['model']} on {self.lineage['preferences']}"),
            ("base model", self.lm.spec),
            ("weights", f"LoRA adapter {self.adapter} + scalar head" if self.adapter else "full model + head"),
            ("held-out accuracy", f"{acc:.1%}" if acc is not None else "n/a"),
            ("normalisation", f"reward = (score - {self.mean:.3f}) x {self.gain:.3f}"),
        ]
        return rows + super()._rows()


def pairs_of(prompts: Any, responses: Any, method: str) -> tuple[Sequence[str], Sequence[str]]:
    """Two equally long lists of prompts and responses (one string of each is one pair)."""
    if isinstance(prompts, str) and isinstance(responses, str):
        return [prompts], [responses]
    if isinstance(prompts, str) or isinstance(responses, str):
        raise DataError(f"{method}() takes a list of prompts and a list of responses (or one string of each)")
    if len(prompts) != len(responses):
        raise DataError(f"{method}() got {len(prompts)} prompts and {len(responses)} responses; give one each")
    return prompts, responses


def load_reward(path: str | Path, runtime: Runtime, name: str | None = None) -> RewardHandle:
    """A reward model written by `RewardHandle.save`: a one-label sequence-classification checkpoint (any trainer's;
    rlhf-magic's carries its normalisation), or rlhf-magic's older causal LM + reward_head.pt folder."""
    path = Path(path).expanduser()
    meta_file = path / "rlhf_magic.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    saved = saved_format(path)
    if saved is None and (meta.get("kind") != "reward" or not (path / HEAD_FILE).exists()):
        raise ModelError(
            f"{str(path)!r} is not a saved reward model: expected a sequence-classification checkpoint with one "
            f"label (what a reward model's .save() writes) or an older folder with {HEAD_FILE}"
        )
    with quiet_load():
        lm = runtime.load_fresh(str(path))
    norm = saved if saved is not None else meta
    if saved is not None:
        head, mean = read_head(path, saved, runtime.device)
    else:  # the older folder: a head with a bias, which moves into the mean (the reward is the same)
        state = torch.load(path / HEAD_FILE, map_location=runtime.device, weights_only=True)
        head = make_head(lm.model.config.hidden_size, runtime.device, bias=False)
        with torch.no_grad():
            head.weight.copy_(state["weight"])
        mean = float(meta.get("mean", 0.0)) - (float(state["bias"]) if "bias" in state else 0.0)
    name = name or meta.get("name", "reward")
    parents, max_length = meta.get("parents", []), int(norm.get("max_length", meta.get("max_length", 512)))
    handle = RewardHandle(name, lm, head, runtime=runtime, parents=parents, max_length=max_length)
    handle.mean, handle.gain = mean, float(norm.get("gain", 1.0))
    handle.metrics.summary.update(meta.get("metrics") or {})
    return handle
