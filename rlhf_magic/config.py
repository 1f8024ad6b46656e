"""The settings of every stage: frozen dataclasses, the only schema.

Each field carries a one-line help text in its metadata. Parsing (cell text), the Python API and the CLI all
build configs through `build_config`, which checks keys and types and suggests near-miss names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError, did_you_mean

DEFAULT_MODEL = "smollm2-135m"


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help line (used by `%%sft?`, the CLI and error messages).

    `check=(predicate, text)` adds a range check that `build_config` runs on the typed value; a failure reads
    "key = value: text".
    """
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (`lora = False` in a cell means full fine-tuning)."""

    r: int = setting(16, "rank of the LoRA update matrices")
    alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r)")
    dropout: float = setting(0.0, "dropout on the LoRA input (0 keeps training deterministic)")
    target_modules: str | tuple[str, ...] = setting(
        "all-linear", "modules that get adapters: 'all-linear' or a list such as ['q_proj', 'v_proj']"
    )
    layers: int | None = setting(
        None, "adapt only the top N transformer layers (backward stops there: much faster on a CPU)"
    )


Device = Literal["cuda", "mps", "cpu"]
Precision = Literal["bf16", "fp16", "fp32"]


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on prompt/response demonstrations."""

    model: Any = setting(
        DEFAULT_MODEL, "'smollm2-135m' (embedded), 'tiny' (random, for tests), a checkpoint path, or a policy handle"
    )
    data: Any = setting(None, "list of dicts, DataFrame, datasets.Dataset, or a .jsonl/.json/.csv path")
    epochs: float = setting(3, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = setting(None, "stop after this many optimizer steps")
    lr: float | None = setting(None, "learning rate (default: 2e-4 with LoRA, 2e-5 for full fine-tuning)")
    batch_size: int = setting(8, "examples per optimizer step (before gradient accumulation)")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    max_length: int = setting(512, "longest tokenized example; longer ones are cut at the end")
    eval_fraction: float = setting(0.1, "share of examples held out for the eval loss (0 turns eval off)")
    seed: int = setting(0, "seed for data order, the eval split, adapter init and sampling")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings; `lora = False` means full fine-tuning")
    revision: str | None = setting(None, "hub model only: a branch, tag or commit of `model` (default: main)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final model to this folder")
    device: Device | None = setting(None, "override the device: 'cuda', 'mps' or 'cpu' (default: best found)")
    precision: Precision | None = setting(None, "override precision: 'bf16', 'fp16', 'fp32' (default: bf16 on GPU)")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")


@dataclass(frozen=True)
class RewardConfig:
    """A scalar reward model trained from K-way rankings (InstructGPT's loss)."""

    model: Any = setting(None, "SFT handle or model name to start from (default: the latest SFT result)")
    data: Any = setting(None, "Preferences, ranking records, prompt/chosen/rejected pairs, Dataset, DataFrame, path")
    epochs: float = setting(1, "passes over the ranked prompts")
    max_steps: int | None = setting(None, "stop after this many optimizer steps")
    lr: float | None = setting(None, "learning rate (default: 1e-4 with LoRA, 1e-5 for full fine-tuning)")
    batch_size: int = setting(4, "ranked prompts per optimizer step (each brings all K answers)")
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step")
    max_length: int = setting(512, "longest tokenized prompt+answer")
    eval_fraction: float = setting(0.2, "share of prompts held out for accuracy")
    margin: float = setting(0.0, "required score gap between better and worse answers in the loss")
    normalize: bool | Literal["gain"] = setting(
        True, "after training shift scores to mean 0 on SFT samples ('gain': also scale to std 1)"
    )
    seed: int = setting(0, "seed for data order, the eval split and head init")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings; `lora = False` trains the whole backbone")
    revision: str | None = setting(None, "hub model only: a branch, tag or commit of `model` (default: main)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the reward model to this folder")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")


@dataclass(frozen=True)
class PPOConfig:
    """PPO against a reward, with a per-token KL penalty to the frozen SFT policy."""

    policy: Any = setting(None, "policy handle to improve (default: the latest SFT result)")
    reward: Any = setting(None, "reward handle, or any callable f(prompts, responses) -> list[float]")
    prompts: Any = setting(None, "list of prompts, a Dataset, or a .jsonl/.json/.csv/.txt path")
    steps: int = setting(50, "PPO iterations (one rollout batch and its updates each)")
    batch_size: int = setting(8, "prompts per rollout")
    mini_batch_size: int = setting(8, "rollouts per gradient step inside an update epoch")
    micro_batch_size: int | None = setting(
        None,
        "answers per forward/backward chunk (same update, less memory; default: all on a GPU, ~768 tokens' worth "
        "on a CPU, more with lora.layers)",
    )
    num_ppo_epochs: int = setting(4, "passes over each rollout batch")
    lr: float | None = setting(None, "learning rate (default: 1e-4 with LoRA, 3e-6 for full fine-tuning)")
    kl_coef: float = setting(0.05, "weight of the per-token KL penalty to the reference (initial value if adaptive)")
    target_kl: float | None = setting(None, "turn on the adaptive KL controller with this target (per answer)")
    kl_horizon: int = setting(10000, "horizon of the adaptive KL controller, in rollouts")
    kl_estimator: Literal["k1", "k3"] = setting("k1", "per-token KL estimator in the reward: 'k1' or 'k3'")
    gamma: float = setting(1.0, "discount factor")
    lam: float = setting(0.95, "GAE lambda")
    cliprange: float = setting(0.2, "PPO policy ratio clip")
    cliprange_value: float = setting(0.2, "value prediction clip")
    vf_coef: float = setting(0.1, "value loss weight")
    max_new_tokens: int = setting(48, "longest sampled answer")
    temperature: float = setting(0.7, "sampling temperature (logprobs use the same scaled logits)")
    missing_eos_penalty: float | None = setting(None, "subtract this from the score of answers with no EOS")
    whiten_rewards: bool = setting(False, "whiten rewards (no mean shift) before GAE")
    max_grad_norm: float = setting(1.0, "gradient clipping norm")
    seed: int = setting(0, "seed for sampling and prompt order")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings for the policy; False trains the whole model")
    resume: bool = setting(False, "continue training the handle of the same name")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final policy to this folder")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")


STAGES: dict[str, type] = {"sft": SFTConfig, "reward": RewardConfig, "ppo": PPOConfig}


# ------------------------------------------------------------------------------------------- panels
PROMPTS_HELP = "required: prompt strings, records with a `prompt` field, a Dataset, or a .jsonl/.json/.csv/.txt path"
_POSITIVE = (lambda v: v >= 1, "use a positive integer")


@dataclass(frozen=True)
class RankConfig:
    """The ranking panel, bound to NAME: a person orders K answers per prompt (its `.preferences` feed %%reward)."""

    prompts: Any = setting(None, PROMPTS_HELP)
    policy: Any = setting(None, "the %%sft result (or its session name) that samples the answers")
    responses: Any = setting(None, "answers to rank instead of sampling: one list per prompt, or {prompt: answers}")
    k: int | None = setting(
        None,
        "answers per prompt, 2 to 9 (None: 4 when sampling, as many as given with responses)",
        check=(lambda v: v is None or 2 <= v <= 9, "the number of answers per prompt must be an integer from 2 to 9"),
    )
    file: Any = setting("preferences.jsonl", "the .jsonl file every Submit appends one record to")
    ties: bool = setting(False, "allow tied ranks (two answers always offer Tie)")
    labeler: str = setting("", "your name, saved with every ranking (empty: 'anonymous')")
    temperature: float = setting(
        0.7,
        "sampling temperature (0 is greedy)",
        check=(lambda v: v >= 0, "use a number >= 0 (0 is greedy: K identical answers)"),
    )
    top_p: float = setting(
        1.0,
        "nucleus sampling: keep the likeliest tokens up to this total probability",
        check=(lambda v: 0 < v <= 1, "use a number in (0, 1]"),
    )
    seed: int | None = setting(None, "sampling seed (prompt i uses seed + i: the same answers on a rerun)")
    max_new_tokens: int = setting(64, "longest sampled answer, in tokens", check=_POSITIVE)
    prefetch: int = setting(
        8,
        "prompts sampled per batched call",
        check=(lambda v: v >= 1, "use a positive integer (prompts sampled per batched call)"),
    )
    title: str | None = setting(None, "the panel's heading (None: 'Rank the answers')")


@dataclass(frozen=True)
class CompareConfig:
    """Policies A and B (handles or session names) answer the same prompts: a table, or a blind A/B test."""

    prompts: Any = setting(None, PROMPTS_HELP)
    reward: Any = setting(None, "reward handle (or its session name) or f(prompts, responses) -> scores")
    blind: bool = setting(False, "one pair at a time on shuffled sides; the win rate is shown once all are judged")
    n: int | None = setting(
        None,
        "compare a seeded random sample of n prompts (None: all of them)",
        check=(lambda v: v is None or v >= 1, "the number of prompts to compare must be an integer >= 1"),
    )
    max_new_tokens: int = setting(64, "longest answer, in tokens", check=_POSITIVE)
    temperature: float = setting(
        0.0, "sampling temperature (0 is greedy)", check=(lambda v: v >= 0, "use a number >= 0 (0 is greedy)")
    )
    seed: int | None = setting(0, "seed for sampling, the prompt sample and the sides")
    labeler: Any = setting(
        None,
        "your name, or a simulated labeler from rlhf_magic.labelers (blind only; it judges every pair at once)",
        check=(
            lambda v: v is None or isinstance(v, str) or callable(v),
            "give your name, or a simulated labeler from rlhf_magic.labelers",
        ),
    )


PANELS: dict[str, type] = {"rank": RankConfig, "compare": CompareConfig}


# ------------------------------------------------------------------------------------------- validation
def field_help(cls: type) -> dict[str, str]:
    """Help line of every field of a config class, including the nested `lora.*` ones."""
    out = {}
    for f in dataclasses.fields(cls):
        out[f.name] = f.metadata.get("help", "")
        if f.name == "lora":
            for lf in dataclasses.fields(LoraConfig):
                out[f"lora.{lf.name}"] = lf.metadata.get("help", "")
    return out


def describe(cls: type) -> str:
    """Plain-text settings table of a config class (used for magic docstrings and `--help`)."""
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    lines = []
    for key, text in field_help(cls).items():
        if key.startswith("lora."):
            d = _default(next(f for f in dataclasses.fields(LoraConfig) if f.name == key[5:]))
        else:
            d = defaults[key]
        shown = "" if dataclasses.is_dataclass(d) else f" (default {d!r})"
        lines.append(f"  {key:<20} {text}{shown}")
    return "\n".join(lines)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def build_config(cls: type, values: dict[str, Any], where: dict[str, str] | None = None) -> Any:
    """Check `values` against `cls` and return a frozen config.

    Keys may be dotted (`lora.r`). `where` maps a key to a location such as "line 3" for error messages.
    """
    where = where or {}
    names = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    plain: dict[str, Any] = {}
    lora_over: dict[str, Any] = {}
    for key, value in values.items():
        top, _, sub = key.partition(".")
        if top not in names or (sub and top != "lora"):
            known = list(field_help(cls))
            raise ConfigError(
                f"{_at(where, key)}unknown setting {key!r}{did_you_mean(key, known)}; "
                f"settings are: {', '.join(sorted(names))}"
            )
        if sub:
            lora_over[sub] = value
        else:
            plain[top] = check_value(key, value, hints[top], where)
            _check_range(key, value, plain[top], _field(cls, top), where)
    if "lora" in names:
        plain["lora"] = _merge_lora(plain.get("lora", _default(_field(cls, "lora"))), lora_over, where)
    return cls(**plain)


def with_options(cls: type, config: Any, options: dict[str, Any], where: str | None = None) -> Any:
    """`config` (or the defaults) with `options` on top, all checked by `build_config`; `where` prefixes errors
    about `options` (e.g. "%rank")."""
    if config is not None and not isinstance(config, cls):
        raise ConfigError(f"config must be a {cls.__name__}, not {type(config).__name__}")
    base = {} if config is None else {f.name: getattr(config, f.name) for f in dataclasses.fields(cls)}
    return build_config(cls, {**base, **options}, {k: where for k in options} if where else None)


def _check_range(key: str, given: Any, value: Any, f: dataclasses.Field, where: dict[str, str]) -> None:
    ok, text = f.metadata.get("check", (None, ""))
    if ok is not None and not ok(value):
        raise ConfigError(f"{_at(where, key)}{key} = {given!r}: {text}")


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


def _merge_lora(base: Any, overrides: dict[str, Any], where: dict[str, str]) -> LoraConfig | None:
    if not overrides:
        return base
    if base is None:
        base = LoraConfig()  # `lora = False` then `lora.r = 8`: the explicit sub-setting wins
    hints = typing.get_type_hints(LoraConfig)
    fixed = {}
    for sub, value in overrides.items():
        if sub not in hints:
            raise ConfigError(
                f"{_at(where, 'lora.' + sub)}unknown setting 'lora.{sub}'"
                f"{did_you_mean(sub, hints)}; lora settings are: {', '.join(hints)}"
            )
        fixed[sub] = check_value(f"lora.{sub}", value, hints[sub], where)
    return dataclasses.replace(base, **fixed)


def _at(where: dict[str, str], key: str) -> str:
    return f"{where[key]}: " if key in where else ""


def check_value(key: str, value: Any, tp: Any, where: dict[str, str] | None = None) -> Any:
    """Return `value` converted to type `tp`, or raise a one-line ConfigError naming the key."""
    ok, out = _coerce(value, tp)
    if ok:
        return out
    raise ConfigError(f"{_at(where or {}, key)}{key} = {value!r} is not valid; expected {_type_name(tp)}")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    if tp is Any:
        return True, value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is False and LoraConfig in typing.get_args(tp):
            return True, None  # `lora = False`: full fine-tuning
        for arm in typing.get_args(tp):
            ok, out = _coerce(value, arm)
            if ok:
                return True, out
        return False, None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp)), value
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return True, tuple(value)
        return False, None
    if tp is LoraConfig:
        return _coerce_lora(value)
    return isinstance(value, tp), value


def _coerce_lora(value: Any) -> tuple[bool, Any]:
    if isinstance(value, LoraConfig):
        return True, value
    if value is True:
        return True, LoraConfig()
    if value is False or value is None:
        return False, None  # the `None` arm of `LoraConfig | None` takes False below
    if isinstance(value, dict):
        try:
            return True, build_config(LoraConfig, value)
        except ConfigError:
            return False, None
    return False, None


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if tp is LoraConfig:
        return "True, False or a dict of lora settings"
    if origin is tuple:
        return "a list of strings"
    return getattr(tp, "__name__", str(tp))
