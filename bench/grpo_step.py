"""Seconds per GRPO step: `%%grpo`'s engine against TRL 1.16's GRPOTrainer, same prompts, G and lengths, same run.

    python bench/grpo_step.py [--prompts 16] [--batch 2] [--g 4] [--new-tokens 32] [--steps 5] [--warmup 1]
                              [--rounds 2] [--lora 1] [--beta 0.04] [--threads 1] [--model smollm2-135m|tiny]

A step of either side samples `batch` prompts x `g` answers of exactly `new-tokens` tokens (EOS is held off until
then on both sides: min_new_tokens, as bench/ppo_step.py does, so both generate and train on the same number of
tokens), scores them with the same Python reward, computes the reference log-probs (beta > 0: the policy with its
adapter off on both sides), the group advantages (scaled by the group std) and one optimizer step on the clipped
loss with the k3 KL, normalised over the batch's tokens (ours: loss_type "token"; TRL: "dapo"), num_iterations 1.
Both get the same model (the embedded SmolLM2-135M-Instruct, or `--model tiny`), fp32 on the CPU, LoRA r=16
alpha=32 on every linear layer (`--lora 0`: both train every weight), fused AdamW at lr 1e-4, temperature 1.0, no
gradient checkpointing, the prompts as chat messages.

Each side runs in its own process, so its peak RSS is its own. Time per step is wall time from one step's end to the
next; the first `--warmup` steps of each run are dropped. TRL lives in the side venv `.bench-trl/` (git-ignored,
shared with bench/reward_throughput.py), created on first use. Rounds alternate which side goes first. Prints one
`RESULT {...}` line: seconds per step of each side and the ratio TRL / ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reward_throughput import TOPICS, ensure_side_venv, run_side  # the same topics, side venv and runner


def prompts(n: int) -> list[str]:
    return [f"Give me one tip about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def reward(prompts: list, completions: list, **_: object) -> list[float]:
    """The same reward on both sides (TRL passes chat completions as message lists): distinct words, scaled."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [len(set(t.lower().split())) / 10 for t in texts]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ------------------------------------------------------------------------------------------- the engine
def ours(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from rlhf_magic import api
    from rlhf_magic.engine import rollout

    rollout.sample = functools.partial(rollout.sample, min_new_tokens=args.new_tokens)  # every answer full length
    policy = api.load_policy(args.model_dir)
    marks: list[float] = []
    lengths: list[float] = []

    def clock(ev: object) -> None:
        if ev.kind in ("start", "step"):
            marks.append(time.perf_counter())
        if ev.kind == "step":
            lengths.append(ev.metrics["grpo/completions/mean_length"])

    api.grpo(
        "bench", policy=policy, reward=lambda p, r: reward(p, r), prompts=prompts(args.prompts), steps=args.steps,
        batch_size=args.batch, num_generations=args.g, max_new_tokens=args.new_tokens, temperature=1.0,
        beta=args.beta, loss_type="token", lr=1e-4, lora={"r": 16, "alpha": 32} if args.lora else False, seed=0,
        progress=False, callbacks=[clock],
    )  # fmt: skip
    steps = [b - a for a, b in itertools.pairwise(marks)][args.warmup :]
    return {"steps": steps, "mean_length": statistics.fmean(lengths), "peak_rss_mib": peak_rss_mib()}


# ------------------------------------------------------------------------------------------- TRL
def trl(args: argparse.Namespace) -> dict:
    """Runs inside .bench-trl: TRL's GRPOTrainer with the same settings."""
    import torch

    torch.set_num_threads(args.threads)
    import trl as trl_lib
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    marks: list[float] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a: object, **kw: object) -> None:
            marks.append(time.perf_counter())

        def on_step_end(self, *a: object, **kw: object) -> None:
            marks.append(time.perf_counter())

        def on_log(self, *a: object, logs: dict | None = None, **kw: object) -> None:
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in prompts(args.prompts)])
    with tempfile.TemporaryDirectory() as out:
        cfg = trl_lib.GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch * args.g, num_generations=args.g,
            max_completion_length=args.new_tokens, generation_kwargs={"min_new_tokens": args.new_tokens},
            temperature=1.0, top_p=1.0, top_k=0, beta=args.beta, loss_type="dapo", scale_rewards="group",
            num_iterations=1, max_steps=args.steps, learning_rate=1e-4, optim="adamw_torch_fused", weight_decay=0.0,
            max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=0,
            log_level="error",
        )  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = trl_lib.GRPOTrainer(
            model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
            peft_config=lora if args.lora else None, callbacks=[Timer()],
        )  # fmt: skip
        trainer.train()
    steps = [b - a for a, b in itertools.pairwise(marks)][args.warmup :]
    return {
        "steps": steps,
        "mean_length": statistics.fmean(lengths) if lengths else None,
        "peak_rss_mib": peak_rss_mib(),
        "trl": trl_lib.__version__,
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------- main
def side(python: Path | str, name: str, args: argparse.Namespace, model_dir: str) -> dict:
    """One side in a fresh process; its 'SIDE {json}' line."""
    keep = ("prompts", "batch", "g", "new_tokens", "steps", "warmup", "lora", "beta", "threads")
    flags = [x for k in keep for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    flags = ["--side", name, "--model-dir", model_dir, *flags]
    return run_side(python, __file__, flags, threads=args.threads, tag="SIDE ", name=name)


def model_folder(name: str, tmp: Path) -> str:
    from rlhf_magic.engine.models import embedded_checkpoint

    if name == "smollm2-135m":
        return str(embedded_checkpoint())
    from rlhf_magic import api

    api.load_policy(name).save(tmp / name)  # a folder both sides load
    return str(tmp / name)


def main() -> None:
    ap = argparse.ArgumentParser()
    for flag, default in (("prompts", 16), ("batch", 2), ("g", 4), ("new-tokens", 32), ("steps", 5),
                          ("warmup", 1), ("rounds", 2), ("lora", 1), ("threads", 1)):  # fmt: skip
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--side", default="main")
    ap.add_argument("--model-dir", default="")
    args = ap.parse_args()
    if args.side != "main":
        print("SIDE " + json.dumps((ours if args.side == "ours" else trl)(args)), flush=True)
        return
    python = ensure_side_venv()
    load = os.getloadavg()[0]
    runs: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = model_folder(args.model, Path(tmp))
        for r in range(args.rounds):
            for name in ("ours", "trl") if r % 2 == 0 else ("trl", "ours"):
                runs[name].append(side(sys.executable if name == "ours" else python, name, args, model_dir))
                print(f"round {r + 1} {name}: done (load {os.getloadavg()[0]:.1f})", flush=True)
    step = {k: statistics.median([t for run in v for t in run["steps"]]) for k, v in runs.items()}
    result = {
        "bench": "grpo_step",
        "model": args.model,
        "lora": bool(args.lora),
        "prompts_per_step": args.batch,
        "num_generations": args.g,
        "new_tokens": args.new_tokens,
        "beta": args.beta,
        "threads": args.threads,
        "steps_timed": {k: sum(len(run["steps"]) for run in v) for k, v in runs.items()},
        "ours_step_s": round(step["ours"], 3),
        "trl_step_s": round(step["trl"], 3),
        "ratio_trl_over_ours": round(step["trl"] / step["ours"], 2),
        "mean_length": {k: [run["mean_length"] for run in v] for k, v in runs.items()},
        "peak_rss_mib": {k: round(max(run["peak_rss_mib"] for run in v)) for k, v in runs.items()},
        "trl": runs["trl"][-1]["trl"],
        "torch": {"trl side": runs["trl"][-1]["torch"]},
        "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
