"""Tokens/s of `%%sft`'s engine against a minimal hand-written torch loop, same model, data and batch.

    python bench/sft_throughput.py [--model smollm2-135m] [--steps 8] [--batch 8] [--lora 1] [--rounds 2]

Both train the same LoRA config (r=16, all linear layers) with the same fused AdamW on the same batches, in this
process, alternating rounds so machine noise hits both. Prints one RESULT line with the ratio
engine / baseline (target: >= 0.9 on the embedded model with LoRA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PROMPTS = [
    "Write a haiku about the sea.",
    "Explain photosynthesis in one sentence.",
    "What is the capital of France?",
    "Give me three tips for better sleep.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet.",
    "What is 17 times 23?",
]


def records(n: int) -> list[dict]:
    out = []
    for k in range(n):
        words = "This is a helpful, honest and harmless answer that stays on topic and is clear. " * (3 + k % 4)
        out.append({"prompt": PROMPTS[k % len(PROMPTS)], "response": f"{words.strip()} (example {k})"})
    return out


def baseline(lm, data, steps: int, batch: int, lora: bool) -> list[float]:
    """The loop a careful person writes by hand: peft LoRA, HF loss with labels, fused AdamW."""
    from peft import LoraConfig, get_peft_model

    from rlhf_magic.data import sft_chats
    from rlhf_magic.engine.sft import collate
    from rlhf_magic.engine.text import encode_chat

    model = lm.model
    if lora:
        cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        model = get_peft_model(model, cfg, adapter_name="bench_baseline")
    params = [p for p in model.parameters() if p.requires_grad] if lora else list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    exs = [encode_chat(lm.tokenizer, c, 256) for c in sft_chats(data)]
    model.train()
    rates = []
    for s in range(steps):
        b = collate(exs[(s * batch) % len(exs) :][:batch], lm.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(int(b["attention_mask"].sum()) / (time.perf_counter() - t0))
    model.eval()
    if lora:
        model.unload()  # take the baseline's LoRA layers out again; the engine adds its own
    return rates


def engine(model_name: str, data, steps: int, batch: int, lora: bool, runtime) -> list[float]:
    from rlhf_magic import api

    rates: list[float] = []

    def grab(ev):
        if ev.kind == "step":
            rates.append(ev.metrics["train/tokens_per_s"])

    class Lender:
        def __init__(self, rt):
            self.runtime = rt

        def add(self, h):
            return h

    api.sft(
        "bench",
        model=model_name,
        data=data,
        max_steps=steps,
        batch_size=batch,
        max_length=256,
        eval_fraction=0,
        lora=lora,
        progress=False,
        callbacks=[grab],
        session=Lender(runtime),
    )
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lora", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from rlhf_magic.engine.runtime import Runtime

    runtime = Runtime()
    data = records(64)
    lm = runtime.load_fresh(args.model)  # the baseline's own copy; the engine uses the runtime's cached one
    base, eng = [], []
    for _ in range(args.rounds):
        base += baseline(lm, data, args.steps, args.batch, bool(args.lora))[2:]  # drop warm-up steps
        eng += engine(args.model, data, args.steps, args.batch, bool(args.lora), runtime)[2:]
    b, e = statistics.median(base), statistics.median(eng)
    result = {
        "bench": "sft_throughput",
        "model": args.model,
        "lora": bool(args.lora),
        "batch": args.batch,
        "device": runtime.device.type,
        "precision": runtime.precision,
        "threads": torch.get_num_threads(),
        "baseline_tok_s": round(b, 1),
        "engine_tok_s": round(e, 1),
        "ratio": round(e / b, 3),
    }
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
