"""Ranked prompts/s of `%%reward`'s engine against TRL's RewardTrainer, same rankings, same run.

    python bench/reward_throughput.py [--prompts 32] [--k 4] [--batch 4] [--steps 6] [--rounds 2] [--lora 1]
                                      [--threads 1]

The engine trains on K-way rankings: a step takes `batch` prompts with all K answers in one forward pass
(batch * K rows). TRL's RewardTrainer trains on (chosen, rejected) pairs: the same rankings expanded into their
C(K, 2) pairs, `batch * C(K, 2)` pairs a step (2 * batch * C(K, 2) rows), so a step of either covers the same
prompts and the same comparisons. Both get the same token rows (the engine's tokenization is handed to TRL as
`chosen_ids` / `rejected_ids`), the same model (the embedded SmolLM2-135M-Instruct, fp32, CPU), LoRA r=16
alpha=32 on every linear layer (`--lora 0`: both train every weight), fused AdamW at lr 1e-4, no gradient
checkpointing, no eval. Time per step is wall time from one step's end to the next (data, forward, backward,
optimizer); the first `--warmup` steps of each run are dropped. Ranked prompts/s = batch / median step time.

TRL lives in a side venv, `.bench-trl/` (git-ignored), created on first use with
`python3 -m venv .bench-trl && .bench-trl/bin/pip install torch==2.13.0 trl==1.16.0 peft datasets`, and runs in a
subprocess of this script. Rounds alternate which side goes first, so machine noise hits both. Threads default to 1:
on a shared 2-core machine OpenMP threads that compete with other jobs run several times slower.
Prints one `RESULT {...}` line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDE_VENV = ROOT / ".bench-trl"
SIDE_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "peft", "datasets"]
TOPICS = ["bread", "sleep", "houseplants", "coffee", "running", "email", "saving money", "cooking rice",
          "learning Spanish", "bike repair", "public speaking", "packing a suitcase", "taking notes", "tea",
          "painting a room", "job interviews", "camping", "cleaning windows", "baking cookies", "meditation",
          "stretching", "writing letters", "cycling in rain", "growing tomatoes", "saving energy", "moving house",
          "first aid", "reading faster", "photography", "chess", "knitting", "birdwatching"]  # fmt: skip


def rankings(n: int, k: int) -> list[dict]:
    """n prompts with k answers of different quality and length (~15-60 tokens), ranked best first."""
    styles = [
        lambda t, i: (
            f"Here is a practical tip about {t}: start small, keep a routine, and check your progress "
            f"every week so you can adjust. It works for most people (tip {i})."
        ),
        lambda t, i: f"For {t}, the key is patience and a little planning ahead of time (tip {i}).",
        lambda t, i: f"{t.capitalize()}? Just do it, honestly, there is not much to say about it. {i}",
        lambda t, i: f"I don't know anything about {t}. Ask someone else. {i}",
        lambda t, i: (
            f"Many people ask about {t}. There are books, videos and forums about it, and opinions "
            f"differ a lot from one person to the next, so it is hard to say ({i})."
        ),
    ]
    out = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        answers = [styles[(i + j) % len(styles)](topic, i) for j in range(k)]
        quality = [(i + j) % len(styles) for j in range(k)]  # style 0 best, then 1, 4, 2, 3
        order = sorted(range(k), key=lambda j: [0, 1, 4, 2, 3].index(quality[j]))
        out.append({"prompt": f"Give me one tip about {topic}.", "responses": answers, "ranking": order})
    return out


# ------------------------------------------------------------------------------------------- the engine
def engine_round(data: list[dict], args: argparse.Namespace, runtime) -> list[float]:
    from rlhf_magic import api

    marks: list[float] = []

    class Lender:  # lends the runtime, so the model loads once for every round
        def __init__(self, rt):
            self.runtime = rt

        def add(self, handle):
            return handle

    api.reward(
        "bench",
        model="smollm2-135m",
        data=data,
        max_steps=args.steps,
        batch_size=args.batch,
        lr=1e-4,
        lora={"r": 16, "alpha": 32} if args.lora else False,
        eval_fraction=0,
        normalize=False,
        max_length=args.max_length,
        progress=False,
        callbacks=[lambda ev: marks.append(time.perf_counter()) if ev.kind in ("start", "step") else None],
        session=Lender(runtime),
    )
    return [b - a for a, b in itertools.pairwise(marks)][args.warmup :]


def token_pairs(data: list[dict], max_length: int, tokenizer) -> list[dict]:
    """The engine's token rows of every (better, worse) answer pair, for TRL's pre-tokenized path."""
    from rlhf_magic.engine import reward as R
    from rlhf_magic.preferences import Preferences

    out = []
    for item in R.load_items(Preferences.from_records(data), tokenizer, max_length):
        for gi, better in enumerate(item.groups):
            for worse in item.groups[gi + 1 :]:
                out += [{"chosen_ids": item.rows[b], "rejected_ids": item.rows[w]} for b in better for w in worse]
    return out


# ------------------------------------------------------------------------------------------- TRL
def ensure_side_venv() -> Path:
    python = SIDE_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {SIDE_VENV} for TRL (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(SIDE_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SIDE_PACKAGES], check=True)
    return python


def run_side(python: Path | str, script: str, flags: list[str], *, threads: int, tag: str, name: str) -> dict:
    """`script` with `flags`, run by `python` in a fresh process on `threads` threads, offline; the JSON on its
    output line that starts with `tag`. Shared by the TRL comparisons."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([str(python), script, *flags], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith(tag)), None)
    if done.returncode or line is None:
        raise SystemExit(f"the {name} side failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[len(tag) :])


def trl_round(python: Path, pairs_file: Path, model_dir: str, args: argparse.Namespace, per_step: int) -> dict:
    flags = ["--side", "trl", "--pairs", str(pairs_file), "--model-dir", model_dir,
             "--steps", str(args.steps), "--per-step", str(per_step), "--lora", str(args.lora),
             "--threads", str(args.threads), "--warmup", str(args.warmup)]  # fmt: skip
    return run_side(python, __file__, flags, threads=args.threads, tag="TRL ", name="TRL")


def trl_side(args: argparse.Namespace) -> None:
    """Runs inside .bench-trl: TRL's RewardTrainer on the pre-tokenized pairs; prints 'TRL {json}'."""
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    marks: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **kw):
            marks.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(args.model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    with tempfile.TemporaryDirectory() as out:
        cfg = trl.RewardConfig(
            output_dir=out, per_device_train_batch_size=args.per_step, max_steps=args.steps, learning_rate=1e-4,
            optim="adamw_torch_fused", weight_decay=0.0, max_grad_norm=1.0, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=False, logging_steps=10**6, save_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, seed=0, log_level="error",
        )  # fmt: skip
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS")
        pairs = Dataset.from_list(json.loads(Path(args.pairs).read_text()))
        trainer = trl.RewardTrainer(
            model=model,
            args=cfg,
            train_dataset=pairs,
            processing_class=tok,
            peft_config=lora if args.lora else None,
            callbacks=[Timer()],
        )
        trainer.train()
    steps = [b - a for a, b in itertools.pairwise(marks)][args.warmup :]
    print("TRL " + json.dumps({"steps": steps, "trl": trl.__version__, "torch": torch.__version__}), flush=True)


# ------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4, help="ranked prompts per step")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--lora", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--side", default="main")
    ap.add_argument("--pairs", default="")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--per-step", type=int, default=0)
    args = ap.parse_args()
    if args.side == "trl":
        return trl_side(args)

    import torch

    torch.set_num_threads(args.threads)
    from rlhf_magic.engine.models import embedded_checkpoint
    from rlhf_magic.engine.runtime import Runtime

    python = ensure_side_venv()
    runtime = Runtime("cpu", "fp32")
    data = rankings(args.prompts, args.k)
    pairs = token_pairs(data, args.max_length, runtime.load("smollm2-135m").tokenizer)
    per_prompt = args.k * (args.k - 1) // 2
    assert len(pairs) == per_prompt * args.prompts
    load = os.getloadavg()[0]
    engine_s, trl_s, trl_info = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        pairs_file = Path(tmp) / "pairs.json"
        pairs_file.write_text(json.dumps(pairs))
        for r in range(args.rounds):
            for side in ("engine", "trl") if r % 2 == 0 else ("trl", "engine"):
                if side == "engine":
                    engine_s += engine_round(data, args, runtime)
                else:
                    trl_info = trl_round(python, pairs_file, str(embedded_checkpoint()), args, args.batch * per_prompt)
                    trl_s += trl_info["steps"]
                print(f"round {r + 1} {side}: done (load {os.getloadavg()[0]:.1f})", flush=True)
    e, t = args.batch / statistics.median(engine_s), args.batch / statistics.median(trl_s)
    result = {
        "bench": "reward_throughput",
        "model": "smollm2-135m",
        "lora": bool(args.lora),
        "k": args.k,
        "prompts_per_step": args.batch,
        "rows_per_step": {"engine": args.batch * args.k, "trl": 2 * args.batch * per_prompt},
        "threads": args.threads,
        "steps_timed": {"engine": len(engine_s), "trl": len(trl_s)},
        "engine_ranked_prompts_s": round(e, 3),
        "trl_ranked_prompts_s": round(t, 3),
        "ratio": round(e / t, 2),
        "trl": trl_info.get("trl"),
        "torch": torch.__version__,
        "load_avg": [round(load, 1), round(os.getloadavg()[0], 1)],
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
