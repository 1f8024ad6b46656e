"""Memory estimates that refuse big work before it starts: a stage's weights, optimizer state and activations
(checked before a checkpoint loads, and again before training on a model already in memory), PPO's update
chunks, and sampling's KV cache and logits. Each is a low estimate: a refusal means the work cannot fit, never
that it might not. Every refusal is one line naming the numbers and the settings that lower them."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError

GIB = 2**30
KEPT_LOGITS = 3  # [rows, V] fp32 tensors alive in a decode step: the head's output, its fp32 copy, the probabilities


@dataclass(frozen=True)
class Workload:
    """What a stage does with a model, for the memory estimate: train nothing ('none'), a LoRA adapter or every
    weight ('full'), on batches of `rows` sequences of up to `max_length` tokens. `logits`: whether the loss forms
    [tokens, vocab] logits (SFT does; a reward model's scalar head and PPO's chunked log-probs do not)."""

    train: str = "none"
    rows: int = 1
    max_length: int = 512
    lora_r: int = 16
    grad_layers: int | None = None  # layers that backward runs through (LoRA on the top N layers); None: all
    checkpointing: bool = False
    act_bytes: int = 4  # 2 under bf16 / fp16 autocast
    logits: bool = True

    @classmethod
    def of(cls, cfg: Any) -> Workload:
        """From an SFTConfig or RewardConfig (a reward batch holds at least 2 answers per prompt)."""
        from ..config import RewardConfig

        reward = isinstance(cfg, RewardConfig)
        rows, logits = cfg.batch_size * (2 if reward else 1), not reward
        lora, ckpt = cfg.lora, bool(getattr(cfg, "gradient_checkpointing", False))
        if not lora:
            return cls("full", rows, cfg.max_length, checkpointing=ckpt, logits=logits)
        return cls("lora", rows, cfg.max_length, lora.r, lora.layers, ckpt, logits=logits)

    def under(self, runtime: Any) -> Workload:
        """With the runtime's activation width: 16-bit autocast (precision bf16 / fp16) except on MPS."""
        if runtime.precision != "fp32" and runtime.device.type != "mps":
            return replace(self, act_bytes=2)
        return self


@dataclass(frozen=True)
class ModelShape:
    """The sizes memory scales with: parameters, and per token the hidden, MLP and vocabulary widths."""

    params: int
    hidden: int
    layers: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    optimizer: int  # gradients, AdamW's moments and fp32 master weights of the trainable part
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def estimate_memory(shape: ModelShape, work: Workload, *, weight_bytes: int) -> MemoryEstimate:
    """A low estimate (bytes) of a stage's peak: the weights in their dtype; for the trainable part its gradients,
    AdamW's two fp32 moments and an fp32 master copy of 16-bit weights; for one batch the activations backward keeps
    (~6 hidden + 4 MLP values a token and layer, or the layer input alone with checkpointing) and the fp32 logits."""
    weights = shape.params * weight_bytes
    if work.train == "none":
        return MemoryEstimate(weights, 0, 0)
    layers = shape.layers if work.train == "full" else min(work.grad_layers or shape.layers, shape.layers)
    if work.train == "full":
        trainable, per_param = shape.params, weight_bytes + 8 + (4 if weight_bytes < 4 else 0)
    else:  # r x (in + out) for each of a Llama layer's 7 linear layers
        trainable, per_param = work.lora_r * layers * (11 * shape.hidden + 3 * shape.intermediate), 4 + 8
    full_layer = 6 * shape.hidden + 4 * shape.intermediate
    kept = layers * shape.hidden + full_layer if work.checkpointing else layers * full_layer
    tokens = work.rows * work.max_length
    logits = shape.vocab * (work.act_bytes + 4) if work.logits else 0
    activations = tokens * (kept * work.act_bytes + logits)
    return MemoryEstimate(weights, trainable * per_param, activations)


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device`: the GPU's free memory plus what torch's caching allocator holds unused, or the
    machine's available RAM (None: unknown, e.g. MPS, which shares the machine's memory)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(torch.cuda.mem_get_info(device)[0]) + max(0, int(cached))
    if device.type != "cpu":
        return None
    try:
        import psutil  # (a dependency of accelerate)

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def model_shape(config_file: Path) -> ModelShape | None:
    """The shape of a checkpoint from its config.json: parameters counted on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
        with torch.device("meta"), warnings.catch_warnings():  # (accelerate's init_empty_weights unties embeddings)
            warnings.simplefilter("ignore")
            params = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
        return shape_of_config(cfg, params)
    except Exception:  # custom code or an unusual config: no estimate is better than a wrong refusal
        return None


def shape_of(model: Any) -> ModelShape | None:
    """The shape of a model in memory (None where its config is unusual)."""
    try:
        return shape_of_config(model.config, sum(p.numel() for p in model.parameters()))
    except Exception:
        return None


def shape_of_config(config: Any, params: int) -> ModelShape:
    text = config.get_text_config()
    hidden, layers, vocab = int(text.hidden_size), int(text.num_hidden_layers), int(text.vocab_size)
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    return ModelShape(params, hidden, layers, intermediate, vocab)


def size(n: float) -> str:
    """Bytes for a person: '84.0 TiB', '11.6 GiB', '340.0 MiB', '12.0 KiB'."""
    for unit, scale in (("TiB", 2**40), ("GiB", GIB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def _on(device: torch.device) -> str:
    return f"{'GPU memory' if device.type == 'cuda' else 'RAM'} is free on {device}"


def training_refusal(
    label: str,
    need: MemoryEstimate,
    free: int,
    device: torch.device,
    *,
    dtype: torch.dtype | None,
    work: Workload,
    lower: str = "batch_size or max_length",
) -> str:
    """The one-line refusal of a stage that cannot fit: `label` needs about X (the parts) but only Y is free, and
    what would lower it (`lower`: the settings). `dtype` None: the weights are in memory already (the estimate
    holds what training adds)."""
    parts = [f"{size(need.weights)} weights in {str(dtype).removeprefix('torch.')}"] if dtype is not None else []
    fixes = ["pick a smaller model or another device"]
    if work.train != "none":
        parts += [
            f"{size(need.optimizer)} gradients + optimizer state",
            f"{size(need.activations)} activations at {work.rows} x {work.max_length} tokens",
        ]
        fixes = [f"lower {lower}"]
        fixes += [] if work.checkpointing else ["set gradient_checkpointing = True"]
        fixes += ["use LoRA", "pick a smaller model"] if work.train == "full" else ["pick a smaller model"]
    fix = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])}, or {fixes[-1]}"
    return f"{label} needs about {size(need.total)} ({', '.join(parts)}) but only {size(free)} of {_on(device)}; {fix}"


def check_training(cfg: Any, model: Any, runtime: Any, *, label: str, copy: bool = False) -> None:
    """Refuse an SFT or reward stage on a model already in memory (a handle, a cached or just-loaded model) whose
    gradients, optimizer state and activations at cfg's batch size cannot fit; `copy`: the stage will first make
    a private fp32 copy of the weights (full fine-tuning from a handle)."""
    check_work(Workload.of(cfg).under(runtime), model, runtime.device, label=label, copy=copy)


def check_work(
    work: Workload, model: Any, device: torch.device, *, label: str, copy: bool = False, lower: str | None = None
) -> None:
    """Refuse `work` on `model` (in memory) where what it adds (and a `copy` of the weights) cannot fit."""
    shape = shape_of(model)
    free = available_memory(device) if shape is not None else None
    if shape is None or free is None:
        return
    need = estimate_memory(shape, work, weight_bytes=4)
    need = need if copy else replace(need, weights=0)
    if need.total > free:
        dtype = torch.float32 if copy else None
        kw = {"lower": lower} if lower else {}
        raise ConfigError(training_refusal(label, need, free, device, dtype=dtype, work=work, **kw))


def check_ppo(cfg: Any, prompts: list[str], runtime: Any, previous: Any = None) -> None:
    """Refuse, before anything is set up, a PPO run whose update cannot fit: one chunk of the minibatch (rows of
    the longest prompt plus max_new_tokens) with gradients through the trained layers, the gradients and optimizer
    state of what trains, and for a new full fine-tuning run its fp32 copy of the policy. The log-probs never form
    [tokens, vocab] logits (head_logprobs.py)."""
    from .generation import check_new_tokens, encode_prompts
    from .ppo import micro_batch_size

    lm = (previous or cfg.policy).lm
    ids = encode_prompts(lm, prompts)
    check_new_tokens(lm, ids, cfg.max_new_tokens)  # a length the context cannot hold is named as such, first
    width = max(map(len, ids), default=0) + cfg.max_new_tokens
    rows = min(micro_batch_size(cfg, runtime.device, 1.0, width), cfg.mini_batch_size or cfg.batch_size)
    lora = cfg.lora
    work = Workload(
        "lora" if lora else "full",
        rows,
        width,
        lora.r if lora else 0,
        lora.layers if lora else None,
        cfg.gradient_checkpointing,
        logits=False,
    ).under(runtime)
    label = f"PPO on {getattr(previous or cfg.policy, 'name', lm.spec)!r}"
    lower = "mini_batch_size, micro_batch_size or max_new_tokens"
    check_work(work, lm.model, runtime.device, label=label, copy=not lora and previous is None, lower=lower)


@dataclass(frozen=True)
class SamplingEstimate:
    kv_cache: int  # keys and values of every layer for every row and position, with the per-position tables
    logits: int  # one decode step's [rows, vocab] fp32 tensors
    states: int  # hidden states kept while sampling for PPO (capture), else 0

    @property
    def total(self) -> int:
        return self.kv_cache + self.logits + self.states


def estimate_sampling(
    config: Any, rows: int, tokens: int, new_tokens: int, *, kv_bytes: int, capture: bool = False
) -> SamplingEstimate | None:
    """A low estimate of sampling `rows` answers to `tokens` positions (prompt + new tokens) with a KV cache: keys
    and values (layers x kv heads x head dim, in `kv_bytes`) and rotary tables for every position, KEPT_LOGITS
    [rows, vocab] fp32 tensors per step, and with `capture` the final hidden state of every new token (twice:
    the per-step list and its stack). None where the config lacks the sizes."""
    try:
        text = config.get_text_config()
        layers, heads, hidden = int(text.num_hidden_layers), int(text.num_attention_heads), int(text.hidden_size)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        vocab = int(text.vocab_size)
    except (AttributeError, TypeError, ValueError, ZeroDivisionError):
        return None
    per_position = 2 * layers * kv_heads * head_dim * kv_bytes + 2 * head_dim * 4 + 32
    states = rows * new_tokens * (2 * hidden * 4 + 4) if capture else 0
    return SamplingEstimate(rows * tokens * per_position, KEPT_LOGITS * rows * vocab * 4, states)


def check_sampling(
    lm: Any, rows: list[list[int]], max_new_tokens: int, *, autocast: bool = False, capture: bool = False
) -> None:
    """Refuse, before anything is allocated, sampling whose KV cache and logits cannot fit in the free memory of
    the model's device (every entry to sampling: PPO rollouts, %rank, %compare, handle.generate)."""
    param = next(lm.model.parameters(), None)
    if not rows or param is None:
        return
    device = param.device
    kv_bytes = 2 if autocast and device.type != "cpu" else param.dtype.itemsize  # 16-bit autocast on a GPU
    tokens = max(map(len, rows)) + max_new_tokens
    need = estimate_sampling(lm.model.config, len(rows), tokens, max_new_tokens, kv_bytes=kv_bytes, capture=capture)
    free = available_memory(device) if need is not None else None
    if need is None or free is None or need.total <= free:
        return
    what = "KV cache and logits" + (" and the hidden states kept for PPO" if need.states else "")
    raise ConfigError(
        f"sampling {len(rows)} answers of up to {tokens} tokens needs about {size(need.total)} of {what}, but "
        f"only {size(free)} of {_on(device)}; lower max_new_tokens or the batch"
    )
