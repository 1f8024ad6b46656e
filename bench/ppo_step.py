"""Seconds per PPO step, generated tokens/s and peak memory: rlhf-magic's engine vs TRL 1.12's PPOTrainer.

    python bench/ppo_step.py [--steps 6] [--lora 1] [--trl-steps 6] [--rounds 1] [--skip-trl] [--lora-layers N]
                             [--micro M]

Same model (SmolLM2-135M-Instruct, fp32), same 64 chat prompts, batch 8, exactly 48 new tokens (EOS ignored, as
in the reference), temperature 0.7, 4 PPO epochs x 1 minibatch, in the same run. Each side runs in its own process
so its peak memory is its own; a third process measures one copy of the model in inference (load + generate +
forward) for the memory ratio. TRL 1.12 (the last release with PPOTrainer) lives in a side venv,
`.bench-trl112/` (created on first use: torch==2.13.0 trl==1.12.0 peft datasets). `bench/reference/` holds the
reference script from the project's shared benchmark material. With `--rounds R` the two sides alternate R
times and every launch's steady steps are pooled, so that the machine's drift (10-20% here) hits both alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDE = ROOT / ".bench-trl112"
BATCH, RESP, EPOCHS = 8, 48, 4


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_ours(
    steps: int, lora: bool, layers: int | None = None, micro: int | None = None, precision: str = "fp32"
) -> dict:
    import torch

    from rlhf_magic import api
    from rlhf_magic.engine import rollout
    from rlhf_magic.engine.reward_model import RewardHandle, make_head

    sys.path.insert(0, str(ROOT / "bench" / "reference"))
    from common import PROMPTS  # the reference's 64 prompts

    # the reference never stops at EOS: every answer has exactly RESP tokens here too
    rollout.sample = functools.partial(rollout.sample, min_new_tokens=RESP)
    policy = api.load_policy("smollm2-135m")
    torch.manual_seed(1234)
    rm = RewardHandle("random-rm", policy.lm, make_head(576, policy.runtime.device), runtime=policy.runtime)
    times: list[float] = []
    gen: list[float] = []

    def clock(ev):
        if ev.kind == "step":
            times.append(ev.metrics["ppo/time/step_s"])
            gen.append(ev.metrics["ppo/time/generated_tok_s"])

    t0 = time.perf_counter()
    api.ppo(
        "bench",
        policy=policy,
        reward=rm,
        prompts=PROMPTS,
        steps=steps,
        batch_size=BATCH,
        mini_batch_size=BATCH,
        num_ppo_epochs=EPOCHS,
        max_new_tokens=RESP,
        temperature=0.7,
        lora={"r": 16, "alpha": 32, "layers": layers} if lora else False,
        micro_batch_size=micro,
        precision=precision,
        lr=3e-6 if not lora else 1e-4,
        progress=False,
        callbacks=[clock],
    )
    steady = times[1:] or times
    return {
        "impl": "rlhf_magic",
        "lora": lora,
        "lora_layers": layers or "all",
        "micro_batch_size": micro or "auto",
        "precision": precision,
        "steps": len(times),
        "step_times": times,
        "step_s": statistics.median(steady),
        "first_step_s": times[0],
        "gen_tok_s_generate_only": statistics.median(gen[1:] or gen),
        "gen_tok_s_whole_loop": BATCH * RESP / statistics.median(steady),
        "total_s": time.perf_counter() - t0,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_inference() -> dict:
    """One copy of the model in inference: load, generate a batch, one forward. The memory yardstick."""
    import torch

    from rlhf_magic import api

    policy = api.load_policy("smollm2-135m")
    sys.path.insert(0, str(ROOT / "bench" / "reference"))
    from common import PROMPTS

    policy.generate(PROMPTS[:BATCH], max_new_tokens=RESP, temperature=0.7, seed=0)
    ids = torch.randint(0, 1000, (BATCH, 100))
    with torch.no_grad():
        policy.lm.model(input_ids=ids)
    return {"impl": "inference", "peak_rss_mib": peak_rss_mib()}


def ensure_side_venv() -> Path:
    py = SIDE / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SIDE)], check=True)
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "torch==2.13.0", "trl==1.12.0", "peft", "datasets"], check=True
        )
    return py


def run_trl(steps: int, lora: bool, precision: str = "fp32") -> dict:
    from rlhf_magic.engine.models import embedded_checkpoint

    py = ensure_side_venv()
    env = {**os.environ, "SMOL_DIR": str(embedded_checkpoint()), "RESULTS_DIR": str(ROOT / "bench" / "results")}
    cmd = [
        str(py),
        str(ROOT / "bench" / "reference" / "bench_trl_ppo.py"),
        "--steps",
        str(steps),
        "--lora",
        "1" if lora else "0",
        "--epochs",
        str(EPOCHS),
        "--response_length",
        str(RESP),
        "--batch",
        str(BATCH),
        "--precision",
        precision,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"TRL reference failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    rec = json.loads(line[len("RESULT ") :])
    return {
        "impl": "trl 1.12 PPOTrainer",
        "lora": lora,
        "precision": precision,
        "steps": rec["steps"],
        "step_times": [r["wall_s"] for r in rec["per_step"]],
        "step_s": rec["step_s"]["median"],
        "first_step_s": rec["first_step_s"],
        "gen_tok_s_generate_only": rec["gen_tok_s_generate_only"]["median"],
        "gen_tok_s_whole_loop": rec["gen_tok_s_whole_loop"]["median"],
        "peak_rss_mib": rec["peak_rss_mib"],
        "phase_median_s": rec["phase_median_s"],
    }


def child(
    kind: str, steps: int, lora: bool, layers: int | None = None, micro: int | None = None, precision: str = "fp32"
) -> dict:
    """Run one side in a fresh process (its own peak memory)."""
    cmd = [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--lora", str(int(lora))]
    cmd += ["--lora-layers", str(layers or 0), "--micro", str(micro or 0), "--precision", precision]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    line = next((x for x in out.stdout.splitlines() if x.startswith("CHILD ")), None)
    if line is None:
        raise RuntimeError(f"{kind} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return json.loads(line[len("CHILD ") :])


def pooled(runs: list[dict]) -> dict:
    """One side's record over several launches: median of every launch's steady steps (each launch's first step
    is warm-up), the highest peak memory; one launch is returned as it is."""
    if len(runs) == 1:
        return runs[0]
    steady = [t for r in runs for t in (r["step_times"][1:] or r["step_times"])]
    out = {**runs[-1], "step_s": statistics.median(steady), "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}
    out["steps"] = sum(r["steps"] for r in runs)
    out["step_times"] = [r["step_times"] for r in runs]
    out["first_step_s"] = [r["first_step_s"] for r in runs]
    if "total_s" in out:
        out["total_s"] = sum(r["total_s"] for r in runs)
    out["gen_tok_s_generate_only"] = statistics.median(r["gen_tok_s_generate_only"] for r in runs)
    out["gen_tok_s_whole_loop"] = BATCH * RESP / out["step_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--trl-steps", type=int, default=None)
    ap.add_argument("--lora", type=int, default=1)
    ap.add_argument("--skip-trl", action="store_true")
    ap.add_argument(
        "--lora-layers",
        type=int,
        default=0,
        help="ours only: adapt the top N layers (0: all, the same adapter as the TRL reference)",
    )
    ap.add_argument("--micro", type=int, default=0, help="ours only: micro_batch_size (0: the engine's default)")
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="both sides: fp32, or bf16 autocast (ours: precision='bf16'; TRL: bf16=True)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="alternate ours and TRL this many times, pooling steps")
    ap.add_argument("--child", choices=["ours", "inference"])
    args = ap.parse_args()
    if args.child:
        layers, micro = args.lora_layers or None, args.micro or None
        if args.child == "ours":
            rec = run_ours(args.steps, bool(args.lora), layers, micro, args.precision)
        else:
            rec = run_inference()
        print("CHILD " + json.dumps(rec), flush=True)
        return
    inference = child("inference", 0, False)
    rounds = []
    for _ in range(args.rounds):  # alternate the two sides so that the machine's drift hits both alike
        ours = child("ours", args.steps, bool(args.lora), args.lora_layers or None, args.micro or None, args.precision)
        trl = None if args.skip_trl else run_trl(args.trl_steps or args.steps, bool(args.lora), args.precision)
        rounds.append((ours, trl))
    ours = pooled([o for o, _ in rounds])
    result = {
        "bench": "ppo_step",
        "batch": BATCH,
        "response_length": RESP,
        "num_ppo_epochs": EPOCHS,
        "threads": os.cpu_count(),
        "rounds": args.rounds,
        "precision": args.precision,
        "ours": ours,
        "one_model_inference_rss_mib": inference["peak_rss_mib"],
        "memory_vs_inference": round(ours["peak_rss_mib"] / inference["peak_rss_mib"], 2),
    }
    if not args.skip_trl:
        trl = pooled([t for _, t in rounds])
        result["trl"] = trl
        result["speedup_per_step"] = round(trl["step_s"] / ours["step_s"], 2)
        result["speedup_by_round"] = [round(t["step_s"] / o["step_s"], 2) for o, t in rounds]
        result["memory_ratio_ours_over_trl"] = round(ours["peak_rss_mib"] / trl["peak_rss_mib"], 2)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
