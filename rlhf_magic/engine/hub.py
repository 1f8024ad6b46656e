"""Hub models: `model = "org/name"` downloads through huggingface_hub's cache (with its progress bars), or reads that
cache offline (`HF_HUB_OFFLINE=1`). Every failure is one line that names the fix."""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# What a transformers checkpoint needs (config, tokenizer, chat template, code if trusted), never other formats.
METADATA = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
SAFETENSORS = ["model*.safetensors"]  # top-level shards only: no `consolidated.safetensors` or onnx/ copies
PICKLES = ["pytorch_model*.bin"]  # older repositories without safetensors


def is_hub_id(spec: str) -> bool:
    """'org/name' (or a bare legacy 'name'): what the Hub accepts as a model id."""
    return bool(HUB_ID.match(spec)) and ".." not in spec


def hub_config(spec: str, revision: str | None) -> Path:
    """config.json of a hub model, fetched (or read from the cache) first: a model that cannot load or fit is
    refused before its weights download."""
    from huggingface_hub import hf_hub_download

    with hub_errors(spec, revision):
        return Path(hf_hub_download(spec, "config.json", revision=revision, local_files_only=offline()))


def hub_snapshot(spec: str, revision: str | None, trust_remote_code: bool) -> Path:
    """The model's files in huggingface_hub's cache: downloaded with progress bars when online, else the cached ones."""
    from huggingface_hub import snapshot_download

    meta = METADATA + (["*.py"] if trust_remote_code else [])
    kw: dict[str, Any] = {"revision": revision, "local_files_only": offline()}
    with hub_errors(spec, revision):
        path = Path(snapshot_download(spec, allow_patterns=meta + SAFETENSORS, **kw))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(spec, allow_patterns=meta + PICKLES, **kw))
    return path


def hub_adapter(spec: str, revision: str | None) -> Path | None:
    """The files of a hub repo that holds a PEFT adapter (a policy pushed with merged=False), else None: asked only
    once `spec` has no config.json, so that the caller's error stands for any other repo."""
    from huggingface_hub import hf_hub_download, snapshot_download

    kw: dict[str, Any] = {"revision": revision, "local_files_only": offline()}
    try:
        hf_hub_download(spec, "adapter_config.json", **kw)
    except Exception:  # not an adapter either (or not reachable): the config.json error says what to do
        return None
    with hub_errors(spec, revision):
        return Path(snapshot_download(spec, allow_patterns=[*METADATA, "adapter_model.safetensors"], **kw))


def cached_ids() -> list[str]:
    """Model ids in the local Hugging Face cache (from its folder names: nothing is read or scanned further)."""
    from huggingface_hub import constants

    root = Path(constants.HF_HUB_CACHE)
    if not root.is_dir():
        return []
    return sorted(p.name[len("models--") :].replace("--", "/") for p in root.glob("models--*") if p.is_dir())


def did_you_mean(spec: str, extra: tuple[str, ...] = ()) -> str:
    """' (did you mean 'org/name'?)' for the closest cached id or built-in name, else ''."""
    candidates = [*cached_ids(), *extra]
    folded = {c.lower(): c for c in candidates if c != spec}
    close = difflib.get_close_matches(spec.lower(), list(folded), n=1, cutoff=0.75)
    return f" (did you mean {folded[close[0]]!r}?)" if close else ""


@contextlib.contextmanager
def hub_errors(spec: str, revision: str | None) -> Iterator[None]:
    """huggingface_hub's exceptions -> one-line ModelErrors that say what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from .models import EMBEDDED, TINY

    fetch = f"`hf download {spec}`" + (f" --revision {revision}" if revision else "")
    try:
        yield
    except GatedRepoError:
        raise ModelError(
            f"model = {spec!r} is gated: accept its terms on {constants.ENDPOINT}/{spec}, then log in (`hf auth login`)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model = {spec!r} was not found: no such folder here, nor model on the Hub"
            f"{did_you_mean(spec, (EMBEDDED, TINY))}; check the spelling (org/name), or log in (`hf auth login`) "
            f"if it is private"
        ) from None
    except HFValidationError as e:
        raise ModelError(f"model = {spec!r} is no folder here, nor a valid hub id ({first_line(e)})") from None
    except RevisionNotFoundError:
        raise ConfigError(
            f"revision = {revision!r} was not found in model {spec!r}; pass a branch, tag or commit it has"
        ) from None
    except RemoteEntryNotFoundError:
        raise ModelError(f"model = {spec!r} has no config.json: it is not a transformers checkpoint") from None
    except LocalEntryNotFoundError as e:
        raise ModelError(_not_cached(spec, fetch, e)) from None
    except HfHubHTTPError as e:
        raise ModelError(f"model = {spec!r}: the Hub refused the download ({first_line(e)})") from None


def _not_cached(spec: str, fetch: str, error: Exception) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import IncompleteSnapshotError

    from .models import EMBEDDED, TINY

    if isinstance(error, IncompleteSnapshotError):
        where = "is only partly in the local Hugging Face cache"
    else:
        dym = did_you_mean(spec, (EMBEDDED, TINY))
        where = f"is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}){dym}"
    if offline():
        return f"model = {spec!r} {where} and HF_HUB_OFFLINE=1 forbids downloads; unset HF_HUB_OFFLINE, or run {fetch}"
    return (
        f"model = {spec!r} {where} and the Hub at {constants.ENDPOINT} cannot be reached; check the connection "
        f"(or HF_ENDPOINT), or run {fetch} where there is one"
    )


def first_line(error: BaseException) -> str:
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


def check_config(spec: str, config_file: Path, trust_remote_code: bool) -> dict[str, Any]:
    """The checkpoint's config.json, refused in one line when transformers cannot build a causal LM from it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"model = {spec!r}: cannot read {config_file} ({first_line(e)})") from None
    kind, custom = cfg.get("model_type"), "AutoModelForCausalLM" in (cfg.get("auto_map") or {})
    if custom and not trust_remote_code and kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"model = {spec!r} runs its own code (auto_map in config.json); if you trust it, pass "
            f"trust_remote_code=True to the Python API (rlhf_magic.sft / reward / load_policy)"
        )
    if custom and trust_remote_code:
        return cfg
    if kind not in CONFIG_MAPPING_NAMES:
        import transformers

        raise ModelError(
            f"model = {spec!r} has model type {kind!r}, which transformers {transformers.__version__} does not "
            f"know; upgrade it (`pip install -U transformers`), or pass trust_remote_code=True if the model ships "
            f"its own code and you trust it"
        )
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(
            f"model = {spec!r} ({kind}) is not a causal language model; pick a decoder-only model that generates "
            f"text (e.g. a Llama, Qwen, SmolLM or GPT-2 checkpoint)"
        )
    return cfg


def note_missing_chat_template(spec: str, tokenizer: Any) -> None:
    """A model without a chat template still trains; say once how its prompts are fed instead."""
    import warnings

    if getattr(tokenizer, "chat_template", None):
        return
    warnings.warn(
        f"model = {spec!r} has no chat template: prompts go in as plain text (the turns of a chat joined by "
        f"newlines) and answers end with EOS; for chat behaviour use an instruct model or set tokenizer.chat_template",
        UserWarning,
        stacklevel=3,
    )


def offline() -> bool:
    """huggingface_hub reads HF_HUB_OFFLINE once, at import; a notebook that sets it later is obeyed too."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return constants.is_offline_mode() or constants._is_true(env)
