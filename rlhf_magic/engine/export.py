"""Leaving the notebook: model cards and PEFT adapter folders (uploads to the Hub: hub_upload.py).

`write_card` writes the README.md every saved folder carries (policy or reward model): the stage, its parents, the
settings, the final metrics and the data it learned from, described by name and size (never the data itself).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from ..errors import ModelError

DATA_FIELDS = ("data", "prompts")  # the settings that hold what a stage learned from


def describe_data(value: Any) -> str | None:
    """'name (N records)' for a stage's data setting: a path, Preferences, a Dataset, a DataFrame, a list."""
    if value is None:
        return None
    if isinstance(value, (str, Path)):
        path = Path(value).expanduser()
        return f"{path.name} ({_count_records(path)})" if path.is_file() else path.name
    if hasattr(value, "name") and hasattr(value, "kind"):  # a handle (its own card tells its data)
        return f"{value.kind} {value.name}"
    name = _data_name(value)
    try:
        size = len(value.records) if hasattr(value, "records") else len(value)
    except TypeError:
        return name
    return f"{name} ({size} records)"


def _data_name(value: Any) -> str:
    source = getattr(value, "source", None)  # Preferences read from a file
    if source:
        return Path(str(source)).name
    info = getattr(value, "info", None)  # datasets.Dataset
    named = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    return f"{type(value).__name__} {named}" if named else type(value).__name__


def _count_records(path: Path) -> str:
    from ..data import read_file

    try:
        return f"{len(read_file(path))} records"
    except Exception:  # an unreadable file is described by its size on disk instead
        return f"{path.stat().st_size} bytes"


def card_text(handle: Any, *, weights: str, base: dict[str, Any] | None = None) -> str:
    """The model card of `handle` as markdown with a Hub metadata header."""
    from .handles import config_summary

    settings = config_summary(handle.config) or {}
    data_rows = [(f, describe_data(getattr(handle.config, f, None))) for f in DATA_FIELDS]
    data_rows = [(f, d) for f, d in data_rows if d]
    for f, _ in data_rows:
        settings.pop(f, None)
    base_name = base["path"] if base else getattr(getattr(handle, "lm", None), "spec", "unknown")
    meta: dict[str, Any] = {"library_name": "peft" if weights == "adapter" else "transformers"}
    meta["tags"] = ["rlhf-magic", handle.stage]
    if _hub_id(base_name):  # the Hub accepts only a model id here, never a local path
        meta["base_model"] = base_name
    head = "\n".join(f"{k}: {json.dumps(v)}" for k, v in meta.items())
    lines = [
        f"---\n{head}\n---\n",
        f"# {handle.name}\n",
        f"A {handle.kind} trained with rlhf-magic (`%%{handle.stage}`), saved as {_weights_words(weights)}.\n",
        f"- **stage**: {handle.stage}",
        f"- **parents**: {', '.join(handle.parents) or 'none'}",
        f"- **base model**: {base_name}",
        f"- **created**: {handle.created}\n",
        "## Training data\n",
        *([f"- `{f}`: {d}" for f, d in data_rows] or ["- not recorded"]),
        "\n## Final metrics\n",
        *_table(handle.metrics.summary, "metric"),
        "\n## Settings\n",
        *_table(settings, "setting"),
        "\n## Use\n",
        *_usage(weights, base),
    ]
    return "\n".join(lines) + "\n"


def _hub_id(name: str) -> bool:
    from .hub import is_hub_id

    return "/" in name and not Path(name).expanduser().exists() and is_hub_id(name)


def _weights_words(weights: str) -> str:
    return {"adapter": "a PEFT LoRA adapter", "reward": "a reward model"}.get(weights, "a full (merged) model")


HERE = "<this folder or repo>"
USAGE = {
    "merged": [
        "from transformers import AutoModelForCausalLM",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{HERE}")',
    ],
    "adapter": [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{HERE}")',
        f'model = PeftModel.from_pretrained(base, "{HERE}")',
    ],
    "reward": [
        "import rlhf_magic",
        "from transformers import AutoModelForSequenceClassification",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{HERE}")  # one logit: the score',
        "norm = model.config.rlhf_magic  # rlhf-magic's reward = (score - norm['mean']) * norm['gain']",
        'rm = rlhf_magic.load_reward("<this folder>")  # rm.score(prompts, responses), rm.reward(...)',
    ],
}
RESIZE = "base.resize_token_embeddings(len(tokenizer))  # rlhf-magic added a PAD token; the adapter holds its row"


def _usage(weights: str, base: dict[str, Any] | None) -> list[str]:
    """How to load the folder (or the Hub repo it was pushed to), in code."""
    code = [line.replace("{base}", str((base or {}).get("path"))) for line in USAGE[weights]]
    if base and base.get("resized"):
        code.insert(-1, RESIZE)
    where = f'`model = "{HERE}"` in any rlhf-magic stage' if weights != "reward" else "rlhf-magic"
    return ["```python", *code, "```", f"\nor {where}."]


def _table(values: dict[str, Any], what: str) -> list[str]:
    if not values:
        return ["none recorded"]
    rows = [f"| {what} | value |", "| --- | --- |"]
    for key, val in values.items():
        shown = f"{val:.4g}" if isinstance(val, float) else json.dumps(_plain(val), default=repr)
        rows.append(f"| {key} | {shown.replace('|', '/')} |")
    return rows


def _plain(val: Any) -> Any:
    return dataclasses.asdict(val) if dataclasses.is_dataclass(val) and not isinstance(val, type) else val


def write_card(folder: Path, handle: Any, *, weights: str | None = None, base: dict[str, Any] | None = None) -> None:
    """Write `folder/README.md`, the model card of `handle` (a policy or reward handle). `weights`: 'merged',
    'adapter' or 'reward' (default: 'reward' for reward handles, else 'merged'); `base`: an adapter's base model, as
    `base_source` records it."""
    weights = weights or ("reward" if handle.kind == "reward" else "merged")
    (Path(folder) / "README.md").write_text(card_text(handle, weights=weights, base=base))


# ------------------------------------------------------------------------------------------------ PEFT adapter folders
ADAPTER_FILE = "adapter_model.safetensors"
MERGED_FIX = "save with merged=True (the adapter merged into a full model)"


def write_adapter(folder: Path, handle: Any) -> dict[str, Any]:
    """Write the policy's LoRA adapter(s) as one PEFT adapter (adapter_config.json + adapter_model.safetensors).
    Stacked adapters (a PPO adapter on the SFT one) become one adapter of their summed rank: the sum of LoRA updates
    s1 B1 A1 + s2 B2 A2 is exactly [s1 B1 | s2 B2] [A1; A2]. Returns the base model recorded (see `base_source`)."""
    from safetensors.torch import save_file

    names = [handle.adapter] if isinstance(handle.adapter, str) else list(handle.adapter or [])
    lm = handle.lm
    if not names:
        raise ModelError(f"{handle.name!r} has no LoRA adapter (its weights were all fine-tuned); {MERGED_FIX}")
    if not _base_is_pristine(handle):
        raise ModelError(
            f"{handle.name!r} is an adapter on a fully fine-tuned model, which no saved base holds; {MERGED_FIX}"
        )
    base = base_source(lm)
    config = copy.deepcopy(lm.peft.peft_config[names[0]])
    if len(names) == 1:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(lm.peft, adapter_name=names[0], save_embedding_layers=False)
    else:
        state, rank, targets = _stacked(lm, names)
        config.r, config.lora_alpha, config.use_rslora = rank, rank, False  # scaling 1: each B carries its own
        config.target_modules, config.layers_to_transform, config.layers_pattern = targets, None, None
        config.rank_pattern, config.alpha_pattern = {}, {}
    grown = _resized_embeddings(lm)
    state.update(grown)
    base["resized"] = bool(grown)
    config.base_model_name_or_path, config.revision = base["path"], base.get("revision")
    config.task_type, config.inference_mode = "CAUSAL_LM", True
    config.save_pretrained(str(folder))
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}
    save_file(tensors, str(Path(folder) / ADAPTER_FILE), metadata={"format": "pt"})
    return base


def _stacked(lm: Any, names: list[str]) -> tuple[dict[str, Any], int, list[str]]:
    """(state dict, rank, target module names) of one LoRA equal to the sum of the stacked adapters `names`."""
    import torch
    from peft.tuners.lora import LoraLayer

    parts: dict[str, tuple[list[Any], list[Any]]] = {}
    for module_name, m in lm.model.named_modules():
        if not isinstance(m, LoraLayer) or not any(n in m.lora_A for n in names):
            continue
        if any(n in m.lora_embedding_A or m.use_dora.get(n) or m.lora_bias.get(n) for n in names):
            raise ModelError(f"stacked adapters on {module_name} are not plain LoRA; {MERGED_FIX}")
        a_rows, b_cols = [], []
        for n in names:
            if n in m.lora_A:
                a_rows.append(m.lora_A[n].weight.detach().float())
                b_cols.append(m.lora_B[n].weight.detach().float() * m.scaling[n])
        parts[module_name] = (a_rows, b_cols)
    rank = max(sum(a.shape[0] for a in a_rows) for a_rows, _ in parts.values())
    state: dict[str, Any] = {}
    for module_name, (a_rows, b_cols) in parts.items():
        a, b = torch.cat(a_rows, 0), torch.cat(b_cols, 1)
        pad = rank - a.shape[0]  # modules some adapters leave out: zero rows add nothing
        state[f"base_model.model.{module_name}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad))
        state[f"base_model.model.{module_name}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad))
    return state, rank, sorted(parts)


def _base_is_pristine(handle: Any) -> bool:
    """True when the handle's base weights are the loaded checkpoint's (the runtime's shared copy), not a private
    copy that a full fine-tuning changed."""
    held = getattr(handle.runtime, "_models", {})
    return any(lm is handle.lm for lm in held.values())


def base_source(lm: Any) -> dict[str, Any]:
    """The base model an adapter of `lm` applies to: {"path": what `AutoModelForCausalLM.from_pretrained` loads,
    "spec": what `model = ...` loads in rlhf-magic, "revision" for hub models}. The tiny test model and the
    embedded SmolLM2 are written once as checkpoints in rlhf-magic's cache, so both have a local path."""
    from . import hub
    from .models import EMBEDDED, TINY

    spec, source = lm.spec, Path(lm.source)
    if (source / "adapter_config.json").exists() and not (source / "config.json").exists():
        raise ModelError(f"the base of this policy is itself an adapter ({spec!r}, merged on load); {MERGED_FIX}")
    if spec == TINY:
        return {"path": str(tiny_checkpoint()), "spec": TINY}
    if spec == EMBEDDED:
        return {"path": str(Path(lm.source).resolve()), "spec": EMBEDDED}
    local = Path(spec).expanduser()
    if local.exists():
        return {"path": str(local.resolve()), "spec": str(local.resolve())}
    repo, _, revision = spec.partition("@")
    if hub.is_hub_id(repo):
        return {"path": repo, "spec": repo, **({"revision": revision} if revision else {})}
    return {"path": str(Path(lm.source).resolve()), "spec": str(Path(lm.source).resolve())}


def tiny_checkpoint() -> Path:
    """The tiny test model as a checkpoint folder in rlhf-magic's cache (written on first use, atomically)."""
    import shutil
    import tempfile

    from .models import cache_dir, quiet_progress
    from .tiny import tiny_model

    out = cache_dir() / "tiny"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out.parent))
    try:
        model, tok = tiny_model()
        with quiet_progress():
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _resized_embeddings(lm: Any) -> dict[str, Any]:
    """The embedding and output layers, when rlhf-magic added a PAD token to the base (its vocabulary grew): a base
    loaded as published needs `resize_token_embeddings(len(tokenizer))` first, and these rows then load exactly."""
    config_file = Path(lm.source) / "config.json"
    try:
        published = json.loads(config_file.read_text()).get("vocab_size")
    except (OSError, ValueError):
        return {}
    model = lm.model
    if published is None or published == model.get_input_embeddings().weight.shape[0]:
        return {}
    out = {}
    for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
        for name, module in model.named_modules():
            if module is layer and layer is not None:
                out[f"base_model.model.{name}.weight"] = layer.weight
                break
    return out


def recorded_base(folder: Path) -> tuple[str, str | None]:
    """(model spec, revision) of the base an adapter folder applies to: what rlhf-magic recorded when it saved the
    folder, else the `base_model_name_or_path` of its adapter_config.json (an adapter from elsewhere)."""
    meta_file, config_file = folder / "rlhf_magic.json", folder / "adapter_config.json"
    try:
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model = {str(folder)!r}: cannot read its adapter_config.json ({e})") from None
    base = meta.get("base_model") or {}
    spec = base.get("spec") or config.get("base_model_name_or_path")
    if not spec:
        raise ModelError(f"model = {str(folder)!r}: its adapter_config.json names no base_model_name_or_path")
    return spec, base.get("revision", config.get("revision"))


def load_adapter_folder(spec: str, folder: Path, device: Any, *, dtype: Any, trust: bool, workload: Any) -> Any:
    """`model = "<adapter folder>"`: its base model loaded as any model is, with the adapter merged into it."""
    import warnings

    from peft import PeftModel

    from .hub import first_line
    from .models import LoadedModel, load_model

    base_spec, revision = recorded_base(folder)
    if Path(base_spec).expanduser().resolve() == folder.resolve():
        raise ModelError(f"model = {spec!r}: the adapter names itself as its base model")
    base = load_model(base_spec, device, dtype=dtype, revision=revision, trust_remote_code=trust, workload=workload)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft's notes on names and dtypes; a real mismatch raises
            model = PeftModel.from_pretrained(base.model, str(folder)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise ModelError(
            f"model = {spec!r}: its adapter does not fit its base {base_spec!r} ({first_line(e)})"
        ) from None
    return LoadedModel(spec, model.eval(), base.tokenizer, str(folder))
