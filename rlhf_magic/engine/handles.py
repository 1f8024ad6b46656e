"""Result handles: what a stage hands to the next cell by name."""

from __future__ import annotations

import dataclasses
import html
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .adapters import adapter_parameters, merged_copy, use_adapter
from .generation import MODEL_LOCK, decode, encode_prompts, left_pad, sample
from .models import LoadedModel
from .runtime import Runtime
from .text import encode


class Metrics:
    """Per-step history and a summary. `m["train/loss"]` is the list of that metric's values over steps."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self.summary: dict[str, Any] = {}

    def log(self, step: int, values: dict[str, float]) -> None:
        self.history.append({"step": step, **values})

    def __getitem__(self, key: str) -> list[float]:
        vals = [row[key] for row in self.history if key in row]
        if not vals and key in self.summary:
            return self.summary[key]
        if not vals:
            raise KeyError(f"no metric {key!r}; logged: {', '.join(self.keys())}")
        return vals

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.history:
            seen.update(dict.fromkeys(k for k in row if k != "step"))
        return list(seen)

    def last(self, key: str, default: float | None = None) -> float | None:
        vals = [row[key] for row in self.history if key in row]
        return vals[-1] if vals else default

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.history)

    def __repr__(self) -> str:
        return f"Metrics(steps={len(self.history)}, summary={self.summary})"


class Handle:
    """Common part of every result: name, stage, parents (lineage), config, metrics and runtime."""

    kind = "handle"

    def __init__(self, name: str, stage: str, config: Any, parents: Iterable[str], runtime: Runtime):
        self.name = name
        self.stage = stage
        self.config = config
        self.parents = tuple(parents)
        self.runtime = runtime
        self.metrics = Metrics()
        self.created = time.strftime("%Y-%m-%d %H:%M:%S")

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "stage": self.stage, "parents": list(self.parents)}

    def _rows(self) -> list[tuple[str, str]]:
        return [("stage", self.stage), ("parents", ", ".join(self.parents) or "none")]

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
            f"{html.escape(v)}</td></tr>"
            for k, v in self._rows()
        )
        return (
            f"<div class='rlhf-handle'><b>{html.escape(self.name)}</b> "
            f"<span style='color:#666'>({self.kind})</span><table>{rows}</table></div>"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} stage={self.stage} parents={list(self.parents)}>"

    def push_to_hub(self, repo_id: str, *, private: bool = True, merged: bool = True, token: str | None = None) -> str:
        """Save into a temporary folder and upload it to the Hugging Face Hub as model repo `repo_id` ('user/name'),
        created private unless `private=False`; `merged=False` uploads a policy's PEFT adapter. Returns the URL."""
        from .hub_upload import push_to_hub

        return push_to_hub(self, repo_id, private=private, merged=merged, token=token)


class PolicyHandle(Handle):
    """A language-model policy: `.generate`, `.sample`, `.save`, `.metrics`."""

    kind = "policy"

    def __init__(
        self,
        name: str,
        stage: str,
        lm: LoadedModel,
        *,
        runtime: Runtime,
        adapter: Any = None,
        config: Any = None,
        parents: Iterable[str] = (),
        chat: bool = True,
    ):
        super().__init__(name, stage, config, parents, runtime)
        self.lm = lm
        self.adapter = adapter
        self.chat = chat  # False: prompts go in as raw text, the way a pretrained (base) model sees text

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def trainable_parameters(self) -> list[Any]:
        """The weights this result owns: its LoRA adapter, or the whole model."""
        return adapter_parameters(self.lm, self.adapter) if self.adapter else list(self.lm.model.parameters())

    def generate(
        self,
        prompts: str | list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """One answer per prompt (greedy when temperature is 0)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        return [a[0] for a in self.sample(prompts, 1, max_new_tokens, temperature, top_p, seed)]

    def sample(
        self,
        prompts: list[str],
        k: int,
        max_new_tokens: int = 64,
        temperature: float = 0.7,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[str]]:
        """`k` answers per prompt, all sampled in one batched call."""
        if not prompts:
            return []
        with MODEL_LOCK, use_adapter(self.lm, self.adapter), self.runtime.fast_path_scope():
            out = sample(
                self.lm,
                list(prompts),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                num_return_sequences=k,
                seed=seed,
                autocast=self.runtime.autocast,
                chat=self.chat,
                bf16_weights=self.runtime.precision == "bf16",
            )
        texts = decode(self.lm, out.responses)
        return [texts[i * k : (i + 1) * k] for i in range(len(prompts))]

    @torch.no_grad()
    def logprobs(self, prompts: list[str], responses: list[str], batch_size: int = 8) -> list[float]:
        """log p(response + EOS | prompt) under this policy (temperature 1), one number per pair."""
        from .modules import response_logprobs

        out: list[float] = []
        tok = self.lm.tokenizer
        for i in range(0, len(prompts), batch_size):
            pairs = list(zip(prompts[i : i + batch_size], responses[i : i + batch_size]))
            queries = encode_prompts(self.lm, [p for p, _ in pairs], chat=self.chat)
            answers = [[*encode(tok, r), tok.eos_token_id] for _, r in pairs]
            q_ids, q_mask = left_pad(queries, tok.pad_token_id, self.runtime.device)
            width = max(len(a) for a in answers)
            a_ids = torch.full((len(pairs), width), tok.pad_token_id, dtype=torch.long)
            a_mask = torch.zeros((len(pairs), width))
            for j, a in enumerate(answers):
                a_ids[j, : len(a)], a_mask[j, : len(a)] = torch.tensor(a), 1
            a_ids, a_mask = a_ids.to(q_ids.device), a_mask.to(q_ids.device)
            with (
                MODEL_LOCK,
                use_adapter(self.lm, self.adapter),
                self.runtime.fast_path_scope(),
                self.runtime.autocast(),
            ):
                ids, mask = torch.cat([q_ids, a_ids], 1), torch.cat([q_mask, a_mask.long()], 1)
                lp = response_logprobs(self.lm.model, ids, mask, q_ids.shape[1]).logprobs
            out += (lp * a_mask).sum(1).tolist()
        return out

    def save(self, path: str | os.PathLike, *, merged: bool = True, overwrite: bool = False) -> Path:
        """A folder that `model = "<path>"` loads back, with a model card (README.md). `merged=True`: a plain
        checkpoint (adapters merged) for `AutoModelForCausalLM.from_pretrained(path)`; `merged=False`: a PEFT adapter
        folder for `PeftModel.from_pretrained(base, path)` (stacked adapters become one). An existing non-empty
        folder is replaced only with `overwrite=True`."""
        from .export import write_adapter, write_card

        check_target(Path(path), overwrite)
        model = merged_copy(self.lm, self.adapter) if merged else None
        meta = {
            **self.describe(),
            "base": self.lm.spec,
            "metrics": _jsonable(self.metrics.summary),
            "config": config_summary(self.config),
        }

        def write(tmp: Path) -> None:
            if model is not None:
                model.save_pretrained(tmp)
            else:
                meta["base_model"] = write_adapter(tmp, self)  # where the adapter applies: see export.base_source
            self.lm.tokenizer.save_pretrained(tmp)
            (tmp / "rlhf_magic.json").write_text(json.dumps(meta, indent=2))
            write_card(tmp, self, weights="merged" if merged else "adapter", base=meta.get("base_model"))

        return atomic_dir(Path(path), write, overwrite=overwrite)

    def _rows(self) -> list[tuple[str, str]]:
        rows = [
            ("base model", self.lm.spec),
            ("weights", f"LoRA adapter {self.adapter}" if self.adapter else "full model"),
            ("device", f"{self.runtime.device.type} / {self.runtime.precision}"),
        ]
        rows += super()._rows()
        for key, val in self.metrics.summary.items():
            rows.append((key, f"{val:.4g}" if isinstance(val, float) else str(val)))
        return rows


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse, before anything is written, to replace an existing non-empty folder (or a file) unless asked to."""
    path = path.expanduser()
    if path.is_file() or (path.is_dir() and any(path.iterdir()) and not overwrite):
        what = "a file" if path.is_file() else "a folder that is not empty"
        fix = "pick another path" if path.is_file() else "pass overwrite=True to replace it, or pick another path"
        raise ConfigError(f"{str(path)!r} is {what}; {fix}")


def atomic_dir(path: Path, write: Any, *, overwrite: bool = False) -> Path:
    """Write a folder through a temporary sibling and swap it in, so a crash never leaves a half-written one.
    An existing non-empty folder is refused before anything is written, unless `overwrite=True`."""
    check_target(path, overwrite)
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    old = path.with_name(f".{path.name}-old-{os.getpid()}")
    try:
        write(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def config_summary(config: Any) -> dict[str, Any] | None:
    """A config as JSON-able values; data, handles and callables become short descriptions."""
    if config is None or not dataclasses.is_dataclass(config):
        return None
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if v is None or isinstance(v, (str, int, float, bool)):
            out[f.name] = v
        elif dataclasses.is_dataclass(v):
            out[f.name] = dataclasses.asdict(v)
        elif hasattr(v, "name") and hasattr(v, "kind"):
            out[f.name] = f"<{v.kind} {v.name}>"
        else:
            size = f" of {len(v)}" if hasattr(v, "__len__") else ""
            out[f.name] = f"<{type(v).__name__}{size}>"
    return _jsonable(out)


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=lambda o: repr(o)))
