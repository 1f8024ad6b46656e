"""Comparisons/s and peak memory of `%%dpo`'s engine against TRL 1.16's DPOTrainer, same rankings, same run.

    python bench/dpo_step.py [--prompts 24] [--k 4] [--batch 4] [--steps 6] [--rounds 2] [--lora 1]
                             [--threads 1] [--model smollm2-135m|tiny] [--trl-precompute 0]

The engine trains on K-way rankings: a step takes `batch` prompts with all K answers in one forward pass (batch * K
rows) and forms the C(K, 2) pair terms of each prompt from those K log-probs; each answer's reference log-prob is
computed once, before training. TRL's DPOTrainer trains on (chosen, rejected) pairs: the same rankings expanded into
their C(K, 2) pairs, `batch * C(K, 2)` pairs a step (2 * batch * C(K, 2) rows, and as many reference rows unless
`--trl-precompute 1`), so a step of either covers the same prompts and the same comparisons. Both get the same model
(the embedded SmolLM2-135M-Instruct, or `--model tiny`), fp32 on the CPU, LoRA r=16 alpha=32 on every linear layer
(`--lora 0`: both train every weight; TRL then keeps a frozen reference copy), the sigmoid loss at beta 0.1, fused
AdamW at lr 1e-4, no gradient checkpointing, no eval; TRL gets the same prompts and answers as chat messages.

Each side runs in its own process, so its peak RSS is its own. Time per step is wall time from one step's end to the
next; the first `--warmup` steps of each run are dropped. Comparisons/s = batch * C(K, 2) / median step time. The
engine's one reference pass over the timed run's prompts is reported apart, and in `per_run` (all steps of a run,
reference pass included, against TRL's steps). TRL lives in a side venv, `.bench-trl/` (git-ignored, shared with
bench/reward_throughput.py), created on first use. Rounds alternate which side goes first. Prints one `RESULT {...}`
line.
"""

from __future__ import annotations

import argparse
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
from reward_throughput import ensure_side_venv, rankings, run_side  # the same data, side venv and runner


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def model_dir(name: str, tmp: Path) -> str:
    """A folder both sides load: the embedded checkpoint, or the tiny model saved once."""
    if name == "tiny":
        from rlhf_magic.engine.tiny import tiny_model

        model, tok = tiny_model()
        model.save_pretrained(tmp / "tiny")
        tok.save_pretrained(tmp / "tiny")
        return str(tmp / "tiny")
    from rlhf_magic.engine.models import embedded_checkpoint

    return str(embedded_checkpoint())


# ------------------------------------------------------------------------------------------- the engine
def engine_side(args: argparse.Namespace) -> None:
    """Runs in its own process: api.dpo on the rankings; prints 'ENGINE {json}'."""
    import torch

    torch.set_num_threads(args.threads)
    from rlhf_magic import api
    from rlhf_magic.engine import dpo as D

    data = json.loads(Path(args.data).read_text())
    marks: list[float] = []
    ref_s: list[float] = []
    set_reference = D.set_reference

    def timed_reference(*a, **kw):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        set_reference(*a, **kw)
        ref_s.append(time.perf_counter() - t0)

    D.set_reference = timed_reference
    policy = api.load_policy(args.model_dir)
    api.dpo(
        "bench",
        policy=policy,
        data=data,
        max_steps=args.steps,
        batch_size=args.batch,
        lr=1e-4,
        beta=0.1,
        loss="sigmoid",
        lora={"r": 16, "alpha": 32} if args.lora else False,
        eval_fraction=0,
        max_length=args.max_length,
        precision="fp32",
        progress=False,
        callbacks=[lambda ev: marks.append(time.perf_counter()) if ev.kind in ("start", "step") else None],
    )
    steps = [b - a for a, b in itertools.pairwise(marks)]
    out = {"steps": steps[args.warmup :], "all_steps": steps, "reference_s": sum(ref_s), "peak_rss_mib": peak_rss_mib()}
    print("ENGINE " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- TRL
def trl_side(args: argparse.Namespace) -> None:
    """Runs inside .bench-trl: TRL's DPOTrainer on the rankings expanded to pairs; prints 'TRL {json}'."""
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    pairs = []
    for rec in json.loads(Path(args.data).read_text()):
        order = rec["ranking"]
        prompt = [{"role": "user", "content": rec["prompt"]}]
        for i, better in enumerate(order):
            for worse in order[i + 1 :]:
                chosen = [{"role": "assistant", "content": rec["responses"][better]}]
                rejected = [{"role": "assistant", "content": rec["responses"][worse]}]
                pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=args.per_step, max_steps=args.steps, learning_rate=1e-4,
            optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=10**6, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, seed=0, log_level="error", beta=0.1, loss_type=["sigmoid"],
            max_length=args.max_length, precompute_ref_log_probs=bool(args.trl_precompute),
        )  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = trl.DPOTrainer(
            model=model,
            args=cfg,
            train_dataset=Dataset.from_list(pairs),
            processing_class=tok,
            peft_config=lora if args.lora else None,
            callbacks=[Timer()],
        )
        trainer.train()
    steps = [b - a for a, b in itertools.pairwise(marks)]
    info = {"steps": steps[args.warmup :], "all_steps": steps, "peak_rss_mib": peak_rss_mib()}
    print("TRL " + json.dumps({**info, "trl": trl.__version__, "torch": torch.__version__}), flush=True)


# ------------------------------------------------------------------------------------------- main
def child(python: Path, side: str, args: argparse.Namespace, data_file: Path, mdir: str, per_step: int) -> dict:
    flags = ["--side", side, "--data", str(data_file), "--model-dir", mdir,
             "--steps", str(args.steps), "--batch", str(args.batch), "--per-step", str(per_step),
             "--lora", str(args.lora), "--threads", str(args.threads), "--warmup", str(args.warmup),
             "--max-length", str(args.max_length), "--trl-precompute", str(args.trl_precompute)]  # fmt: skip
    tag = "ENGINE " if side == "engine" else "TRL "
    return run_side(python, __file__, flags, threads=args.threads, tag=tag, name=side)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="ranked prompts per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lora", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--model", default="smollm2-135m", choices=["smollm2-135m", "tiny"])
    ap.add_argument("--trl-precompute", type=int, default=0, help="TRL's precompute_ref_log_probs")
    ap.add_argument("--side", default="main")
    ap.add_argument("--data", default="")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--per-step", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse()
    if args.side == "trl":
        return trl_side(args)
    if args.side == "engine":
        return engine_side(args)
    python = ensure_side_venv()
    per_prompt = args.k * (args.k - 1) // 2
    engine_s, trl_s, runs = [], [], {"engine": [], "trl": []}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data_file = Path(tmp) / "rankings.json"
        data_file.write_text(json.dumps(rankings(args.prompts, args.k)))
        mdir = model_dir(args.model, Path(tmp))
        for r in range(args.rounds):
            for side in ("engine", "trl") if r % 2 == 0 else ("trl", "engine"):
                py = Path(sys.executable) if side == "engine" else python
                rec = child(py, side, args, data_file, mdir, args.batch * per_prompt)
                runs[side].append(rec)
                (engine_s if side == "engine" else trl_s).extend(rec["steps"])
                print(f"round {r + 1} {side}: {statistics.median(rec['steps']):.2f} s/step, "
                      f"{rec['peak_rss_mib']:.0f} MiB (load {os.getloadavg()[0]:.1f})", flush=True)  # fmt: skip
    print("RESULT " + json.dumps(result(args, engine_s, trl_s, runs, load)))


def result(args: argparse.Namespace, engine_s: list, trl_s: list, runs: dict, load: float) -> dict:
    per_step = args.batch * args.k * (args.k - 1) // 2
    e, t = per_step / statistics.median(engine_s), per_step / statistics.median(trl_s)
    mem_e = max(r["peak_rss_mib"] for r in runs["engine"])
    mem_t = max(r["peak_rss_mib"] for r in runs["trl"])
    whole_e = statistics.median(sum(r["all_steps"]) + r["reference_s"] for r in runs["engine"])
    whole_t = statistics.median(sum(r["all_steps"]) for r in runs["trl"])
    return {
        "bench": "dpo_step",
        "model": args.model,
        "lora": bool(args.lora),
        "k": args.k,
        "prompts_per_step": args.batch,
        "comparisons_per_step": per_step,
        "rows_per_step": {"engine": args.batch * args.k, "trl": 2 * per_step * (1 if args.trl_precompute else 2)},
        "threads": args.threads,
        "fast_path": os.environ.get("RLHF_MAGIC_FASTPATH", "1") != "0",
        "steps_timed": {"engine": len(engine_s), "trl": len(trl_s)},
        "engine_comparisons_s": round(e, 3),
        "trl_comparisons_s": round(t, 3),
        "ratio": round(e / t, 2),
        "engine_reference_pass_s": round(statistics.median(r["reference_s"] for r in runs["engine"]), 2),
        "per_run_ratio": round(whole_t / whole_e, 2),
        "engine_peak_rss_mib": round(mem_e),
        "trl_peak_rss_mib": round(mem_t),
        "memory_ratio": round(mem_e / mem_t, 2),
        "trl": runs["trl"][-1].get("trl"),
        "trl_precompute_ref_log_probs": bool(args.trl_precompute),
        "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)],
    }


if __name__ == "__main__":
    main()
