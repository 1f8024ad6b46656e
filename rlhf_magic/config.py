"""The settings of every stage and panel: frozen dataclasses, the only schema.

Each field carries a one-line help text and, where a range makes sense, a `Check` in its metadata; `RULES` relate
settings to each other. Parsing (cell text), the Python API, the CLI and the panels all build configs through
`validation.build_config`, which checks keys, types, ranges and rules and suggests near-miss names.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

DEFAULT_MODEL = "smollm2-135m"


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help line (used by `%%sft?`, the CLI and error messages).

    `check=Check(predicate, text, short)` adds a range check that `build_config` runs on the typed value; a
    failure reads "key = value: text", and help shows `short` next to the default.
    """
    if isinstance(default, (list, dict, set)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class Check(NamedTuple):
    """What a setting accepts: `ok(value)`, the error's advice ("use ..."), and a short form for help texts."""

    ok: Callable[[Any], bool]
    text: str
    short: str = ""


POSITIVE_INT = Check(lambda v: v >= 1, "use a positive integer", ">= 1")
POSITIVE_INT_OR_NONE = Check(lambda v: v is None or v >= 1, "use a positive integer, or None", ">= 1")
POSITIVE = Check(lambda v: 0 < v < math.inf, "use a number > 0", "> 0")
POSITIVE_OR_NONE = Check(lambda v: v is None or 0 < v < math.inf, "use a number > 0, or None", "> 0")
NON_NEGATIVE = Check(lambda v: 0 <= v < math.inf, "use a number >= 0", ">= 0")
FINITE = Check(lambda v: math.isfinite(v), "use a finite number", "finite")
FINITE_OR_NONE = Check(lambda v: v is None or math.isfinite(v), "use a finite number, or None", "finite")
FRACTION = Check(lambda v: 0 <= v < 1, "use a number from 0 up to (not including) 1", "in [0, 1)")
UNIT = Check(lambda v: 0 <= v <= 1, "use a number from 0 to 1", "in [0, 1]")
OPEN_UNIT = Check(lambda v: 0 < v <= 1, "use a number in (0, 1]", "in (0, 1]")
LENGTH = Check(lambda v: v >= 2, "use an integer >= 2 (room for a prompt token and an answer token)", ">= 2")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapter settings (`lora = False` in a cell means full fine-tuning)."""

    r: int = setting(16, "rank of the LoRA update matrices", check=POSITIVE_INT)
    alpha: int = setting(32, "LoRA scaling numerator (the update is scaled by alpha / r)", check=POSITIVE)
    dropout: float = setting(0.0, "dropout on the LoRA input (0 keeps training deterministic)", check=FRACTION)
    target_modules: str | tuple[str, ...] = setting(
        "all-linear", "modules that get adapters: 'all-linear' or a list such as ['q_proj', 'v_proj']"
    )
    layers: int | None = setting(
        None,
        "adapt only the top N transformer layers (backward stops there: much faster on a CPU)",
        check=POSITIVE_INT_OR_NONE,
    )


Device = Literal["cuda", "mps", "cpu"]
Precision = Literal["bf16", "fp16", "fp32"]
Tracker = Literal["tensorboard", "wandb", "trackio", "mlflow", "none"]
REPORT_TO = "experiment tracker: 'tensorboard' (logs in ./runs), 'wandb', 'trackio', 'mlflow' or 'none'"


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on prompt/response demonstrations."""

    model: Any = setting(
        DEFAULT_MODEL, "'smollm2-135m' (embedded), 'tiny' (random, for tests), a checkpoint path, or a policy handle"
    )
    data: Any = setting(None, "list of dicts, DataFrame, datasets.Dataset, or a .jsonl/.json/.csv path")
    epochs: float = setting(3, "passes over the training data (ignored when max_steps is set)", check=POSITIVE)
    max_steps: int | None = setting(None, "stop after this many optimizer steps", check=POSITIVE_INT_OR_NONE)
    lr: float | None = setting(
        None, "learning rate (default: 2e-4 with LoRA, 2e-5 for full fine-tuning)", check=POSITIVE_OR_NONE
    )
    batch_size: int = setting(8, "examples per optimizer step (before gradient accumulation)", check=POSITIVE_INT)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", check=POSITIVE_INT)
    max_length: int = setting(512, "longest tokenized example; longer ones are cut at the end", check=LENGTH)
    eval_fraction: float = setting(
        0.1, "share of examples held out for the eval loss (0 turns eval off)", check=FRACTION
    )
    seed: int = setting(0, "seed for data order, the eval split, adapter init and sampling")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings; `lora = False` means full fine-tuning")
    revision: str | None = setting(None, "hub model only: a branch, tag or commit of `model` (default: main)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final model to this folder (replacing what it holds)")
    device: Device | None = setting(None, "override the device: 'cuda', 'mps' or 'cpu' (default: best found)")
    precision: Precision | None = setting(None, "override precision: 'bf16', 'fp16', 'fp32' (default: bf16 on GPU)")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")
    report_to: Tracker = setting("none", REPORT_TO)


@dataclass(frozen=True)
class RewardConfig:
    """A scalar reward model trained from K-way rankings (InstructGPT's loss)."""

    model: Any = setting(None, "SFT handle or model name to start from (default: the latest SFT result)")
    data: Any = setting(None, "Preferences, ranking records, prompt/chosen/rejected pairs, Dataset, DataFrame, path")
    epochs: float = setting(1, "passes over the ranked prompts", check=POSITIVE)
    max_steps: int | None = setting(None, "stop after this many optimizer steps", check=POSITIVE_INT_OR_NONE)
    lr: float | None = setting(
        None, "learning rate (default: 1e-4 with LoRA, 1e-5 for full fine-tuning)", check=POSITIVE_OR_NONE
    )
    batch_size: int = setting(4, "ranked prompts per optimizer step (each brings all K answers)", check=POSITIVE_INT)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", check=POSITIVE_INT)
    max_length: int = setting(512, "longest tokenized prompt+answer", check=LENGTH)
    eval_fraction: float = setting(0.2, "share of prompts held out for accuracy", check=FRACTION)
    margin: float = setting(0.0, "required score gap between better and worse answers in the loss", check=FINITE)
    include_flagged: bool = setting(False, "also learn from prompts flagged 'all answers are bad or unsafe'")
    normalize: bool | Literal["gain"] = setting(
        True, "rewards (what PPO optimises) are scores shifted to mean 0 on SFT samples ('gain': and scaled to std 1)"
    )
    seed: int = setting(0, "seed for data order, the eval split and head init")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings; `lora = False` trains the whole backbone")
    revision: str | None = setting(None, "hub model only: a branch, tag or commit of `model` (default: main)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the reward model to this folder (replacing what it holds)")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")
    report_to: Tracker = setting("none", REPORT_TO)


@dataclass(frozen=True)
class DPOConfig:
    """DPO: the policy learns K-way rankings directly, held to its starting weights (no reward model, no sampling)."""

    policy: Any = setting(None, "policy handle or saved policy folder to improve (default: the latest SFT result)")
    data: Any = setting(None, "Preferences, ranking records, prompt/chosen/rejected pairs, Dataset, DataFrame, path")
    reference: Any = setting(None, "frozen reference: None (the policy as it starts) or a policy, same tokenizer")
    beta: float = setting(0.1, "KL leash: implicit reward = beta * log(pi / pi_ref) of an answer", check=POSITIVE)
    loss: Literal["sigmoid", "ipo", "plackett_luce"] = setting(
        "sigmoid", "'sigmoid' or 'ipo' on every pair of a ranking, 'plackett_luce' on whole rankings"
    )
    include_flagged: bool = setting(False, "also learn from prompts flagged 'all answers are bad or unsafe'")
    epochs: float = setting(1, "passes over the ranked prompts", check=POSITIVE)
    max_steps: int | None = setting(None, "stop after this many optimizer steps", check=POSITIVE_INT_OR_NONE)
    lr: float | None = setting(
        None, "learning rate (default: 1e-4 with LoRA, 5e-6 for full fine-tuning)", check=POSITIVE_OR_NONE
    )
    batch_size: int = setting(4, "ranked prompts per optimizer step (each brings all K answers)", check=POSITIVE_INT)
    grad_accum: int = setting(1, "micro-batches accumulated per optimizer step", check=POSITIVE_INT)
    max_length: int = setting(512, "longest prompt+answer; prompts lose their start, answers their end", check=LENGTH)
    eval_fraction: float = setting(0.2, "share of prompts held out for the implicit-reward accuracy", check=FRACTION)
    seed: int = setting(0, "seed for data order, the eval split and adapter init")
    lora: LoraConfig | None = setting(
        LoraConfig(), "LoRA adapter stacked on the policy's own; False trains a full copy (a second model)"
    )
    revision: str | None = setting(None, "hub model only: a branch, tag or commit of `policy` (default: main)")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final policy to this folder (replacing what it holds)")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")
    report_to: Tracker = setting("none", REPORT_TO)


@dataclass(frozen=True)
class PPOConfig:
    """PPO against a reward, with a per-token KL penalty to the frozen SFT policy."""

    policy: Any = setting(None, "policy handle to improve (default: the latest SFT result)")
    reward: Any = setting(None, "reward handle, or any callable f(prompts, responses) -> list[float]")
    prompts: Any = setting(None, "list of prompts, a Dataset, or a .jsonl/.json/.csv/.txt path")
    steps: int = setting(50, "PPO iterations (one rollout batch and its updates each)", check=POSITIVE_INT)
    batch_size: int = setting(8, "prompts per rollout", check=POSITIVE_INT)
    mini_batch_size: int | None = setting(
        None, "rollouts per gradient step inside an update epoch (None: the whole batch)", check=POSITIVE_INT_OR_NONE
    )
    micro_batch_size: int | None = setting(
        None,
        "answers per forward/backward chunk (same update, less memory; default: all on a GPU, ~768 tokens' worth "
        "on a CPU, more with lora.layers)",
        check=POSITIVE_INT_OR_NONE,
    )
    num_ppo_epochs: int = setting(4, "passes over each rollout batch", check=POSITIVE_INT)
    lr: float | None = setting(
        None, "learning rate (default: 1e-4 with LoRA, 3e-6 for full fine-tuning)", check=POSITIVE_OR_NONE
    )
    kl_coef: float = setting(
        0.05, "weight of the per-token KL penalty to the reference (initial value if adaptive)", check=NON_NEGATIVE
    )
    target_kl: float | None = setting(
        None, "turn on the adaptive KL controller with this target (per answer)", check=POSITIVE_OR_NONE
    )
    kl_horizon: int = setting(10000, "horizon of the adaptive KL controller, in rollouts", check=POSITIVE_INT)
    kl_estimator: Literal["k1", "k3"] = setting("k1", "per-token KL estimator in the reward: 'k1' or 'k3'")
    gamma: float = setting(1.0, "discount factor", check=OPEN_UNIT)
    lam: float = setting(0.95, "GAE lambda", check=UNIT)
    cliprange: float = setting(0.2, "PPO policy ratio clip", check=POSITIVE)
    cliprange_value: float = setting(0.2, "value prediction clip", check=POSITIVE)
    vf_coef: float = setting(0.1, "value loss weight", check=NON_NEGATIVE)
    max_new_tokens: int = setting(48, "longest sampled answer", check=POSITIVE_INT)
    temperature: float = setting(
        0.7,
        "sampling temperature (logprobs use the same scaled logits)",
        check=Check(POSITIVE.ok, "PPO samples, so use a number > 0 (e.g. 0.7)", "> 0"),
    )
    missing_eos_penalty: float | None = setting(
        None, "subtract this from the score of answers with no EOS", check=FINITE_OR_NONE
    )
    whiten_rewards: bool = setting(False, "whiten rewards (no mean shift) before GAE")
    max_grad_norm: float = setting(1.0, "gradient clipping norm", check=POSITIVE)
    seed: int = setting(0, "seed for sampling and prompt order")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings for the policy; False trains the whole model")
    resume: bool = setting(False, "continue training the handle of the same name")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final policy to this folder (replacing what it holds)")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")
    report_to: Tracker = setting("none", REPORT_TO)


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO (or RLOO): G answers per prompt, each judged against its group; no value model, k3 KL in the loss."""

    policy: Any = setting(None, "policy handle to improve (default: the latest SFT result)")
    reward: Any = setting(None, "reward handle, or any callable f(prompts, responses) -> list[float]")
    prompts: Any = setting(None, "list of prompts, a Dataset, or a .jsonl/.json/.csv/.txt path")
    num_generations: int = setting(
        4, "G: answers sampled per prompt", check=Check(lambda v: v >= 2, "use an integer >= 2 (a group)", ">= 2")
    )
    steps: int = setting(50, "GRPO iterations (one rollout and its updates each)", check=POSITIVE_INT)
    batch_size: int = setting(4, "prompts per step (batch_size * num_generations answers)", check=POSITIVE_INT)
    micro_batch_size: int | None = setting(
        None, "answers per forward/backward chunk (same update, less memory)", check=POSITIVE_INT_OR_NONE
    )
    algorithm: Literal["grpo", "rloo"] = setting("grpo", "'grpo' (group mean) or 'rloo' (leave-one-out mean)")
    scale_rewards: bool = setting(True, "grpo: divide advantages by the group's std (False: Dr. GRPO)")
    loss_type: Literal["token", "sequence"] = setting(
        "token", "'token': mean over all tokens (TRL's dapo); 'sequence': mean of answer means (TRL's grpo)"
    )
    num_iterations: int = setting(1, "updates per rollout (1: the ratio is 1, no clipping)", check=POSITIVE_INT)
    cliprange: float = setting(0.2, "policy ratio clip (TRL's epsilon)", check=POSITIVE)
    beta: float = setting(0.04, "weight of the k3 KL to the reference in the loss", check=NON_NEGATIVE)
    lr: float | None = setting(
        None, "learning rate (default: 1e-4 with LoRA, 3e-6 for full fine-tuning)", check=POSITIVE_OR_NONE
    )
    max_new_tokens: int = setting(48, "longest sampled answer", check=POSITIVE_INT)
    temperature: float = setting(
        1.0, "sampling temperature", check=Check(POSITIVE.ok, "GRPO samples, so use a number > 0 (e.g. 1.0)", "> 0")
    )
    missing_eos_penalty: float | None = setting(
        None, "subtract this from the score of answers with no EOS", check=FINITE_OR_NONE
    )
    max_grad_norm: float = setting(1.0, "gradient clipping norm", check=POSITIVE)
    seed: int = setting(0, "seed for sampling and prompt order")
    lora: LoraConfig | None = setting(LoraConfig(), "LoRA settings for the policy; False trains the whole model")
    resume: bool = setting(False, "continue training the handle of the same name")
    gradient_checkpointing: bool = setting(False, "recompute activations in backward: less memory, ~30% slower")
    output_dir: str | None = setting(None, "also save the final policy to this folder (replacing what it holds)")
    device: Device | None = setting(None, "override the device")
    precision: Precision | None = setting(None, "override precision")
    fast_path: bool = setting(
        True, "CPU speed-ups (engine/fastpath); False, or RLHF_MAGIC_FASTPATH=0, runs the plain path a GPU runs"
    )
    stop_on_divergence: bool = setting(True, "stop a diverging run (NaN, loss blow-up) and keep the last good model")
    report_to: Tracker = setting("none", REPORT_TO)


STAGES: dict[str, type] = {
    "sft": SFTConfig,
    "reward": RewardConfig,
    "dpo": DPOConfig,
    "ppo": PPOConfig,
    "grpo": GRPOConfig,
}

# Settings that depend on each other, checked after the ranges: (the setting the error names, the test, what is
# accepted, with `{c}` the config).
RULES: dict[type, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    PPOConfig: (
        (
            "mini_batch_size",
            lambda c: c.mini_batch_size is None or c.mini_batch_size <= c.batch_size,
            "use at most batch_size ({c.batch_size}), or None for the whole batch",
        ),
        (
            "kl_coef",
            lambda c: c.target_kl is None or c.kl_coef > 0,
            "target_kl = {c.target_kl} adapts kl_coef by scaling it, so use a number > 0",
        ),
    ),
}


# ------------------------------------------------------------------------------------------- panels
PROMPTS_HELP = "required: prompt strings, records with a `prompt` field, a Dataset, or a .jsonl/.json/.csv/.txt path"


@dataclass(frozen=True)
class RankConfig:
    """The ranking panel, bound to NAME: a person orders K answers per prompt (its `.preferences` feed %%reward)."""

    prompts: Any = setting(None, PROMPTS_HELP)
    policy: Any = setting(None, "the %%sft result (or its session name) that samples the answers")
    responses: Any = setting(None, "answers to rank instead of sampling: one list per prompt, or {prompt: answers}")
    k: int | None = setting(
        None,
        "answers per prompt, 2 to 9 (None: 4 when sampling, as many as given with responses)",
        check=Check(
            lambda v: v is None or 2 <= v <= 9, "the number of answers per prompt must be an integer from 2 to 9"
        ),
    )
    file: Any = setting("preferences.jsonl", "the .jsonl file every Submit appends one record to")
    ties: bool = setting(False, "allow tied ranks (two answers always offer Tie)")
    labeler: str = setting(
        "",
        "your name, saved with every ranking (empty: asked once per file, then remembered)",
        check=Check(lambda v: not v or v.strip(), "a name cannot be only spaces; give yours, or leave it empty"),
    )
    temperature: float = setting(
        0.7,
        "sampling temperature (0 is greedy)",
        check=Check(NON_NEGATIVE.ok, "use a number >= 0 (0 is greedy: K identical answers)", ">= 0"),
    )
    top_p: float = setting(
        1.0,
        "nucleus sampling: keep the likeliest tokens up to this total probability",
        check=OPEN_UNIT,
    )
    seed: int | None = setting(None, "sampling seed (the same seed gives the same answers on a rerun)")
    max_new_tokens: int = setting(64, "longest sampled answer, in tokens", check=POSITIVE_INT)
    prefetch: int = setting(
        8,
        "prompts sampled per batched call",
        check=Check(POSITIVE_INT.ok, "use a positive integer (prompts sampled per batched call)", ">= 1"),
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
        check=Check(POSITIVE_INT_OR_NONE.ok, "the number of prompts to compare must be an integer >= 1", ">= 1"),
    )
    max_new_tokens: int = setting(64, "longest answer, in tokens", check=POSITIVE_INT)
    temperature: float = setting(
        0.0,
        "sampling temperature (0 is greedy)",
        check=Check(NON_NEGATIVE.ok, "use a number >= 0 (0 is greedy)", ">= 0"),
    )
    seed: int | None = setting(0, "seed for sampling, the prompt sample and the sides")
    labeler: Any = setting(
        None,
        "your name, or a simulated labeler from rlhf_magic.labelers (blind only; it judges every pair at once)",
        check=Check(
            lambda v: v is None or isinstance(v, str) or callable(v),
            "give your name, or a simulated labeler from rlhf_magic.labelers",
        ),
    )


PANELS: dict[str, type] = {"rank": RankConfig, "compare": CompareConfig}
