"""One check for a CUDA machine: the pipeline's invariants in bf16 and fp16, then throughput on realistic shapes.

    python bench/gpu_check.py                  # on a CUDA GPU: under 5 minutes on one H100
    python bench/gpu_check.py --device cpu --quick   # a smoke run of this script on a CPU (fp32 and bf16, toy shapes)

1. Invariants, on the tiny model, for each precision: SFT -> reward -> PPO, and DPO and GRPO from the same SFT
   model, run with finite losses; at their first step PPO's and GRPO's KL is 0 and DPO's loss is log 2 (policy and
   reference are the same weights); and every trainable parameter of each stage changed (the checks tests/ make on a
   CPU).
2. Timings, on randomly initialised models with the shapes of SmolLM2-135M and Qwen2.5-0.5B (nothing is
   downloaded; the tiny model's byte-level tokenizer feeds them): SFT tokens/s, reward ranked prompts/s, PPO seconds
   per step and generated tokens/s, peak CUDA memory per stage, and the train phase's model FLOPs utilisation
   (SFT with LoRA: 4 x parameters FLOPs per token, forward plus the backward pass to the inputs).

Prints `CHECK ...` lines as it goes and one `RESULT {...}` line at the end; exits 1 when an invariant fails.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rlhf_magic import api  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0, "T4": 65.0, "V100": 125.0}
SHAPES = {  # (config class, settings) with the shapes of the real models
    "smollm2-135m-shape": (
        "LlamaConfig",
        {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
         "num_key_value_heads": 3, "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True},
    ),
    "qwen2.5-0.5b-shape": (
        "Qwen2Config",
        {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "vocab_size": 151936, "rope_theta": 1000000.0, "tie_word_embeddings": True},
    ),
}  # fmt: skip
TOY = {
    "toy-shape": (
        "LlamaConfig",
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True},
    )
}  # fmt: skip


def demos(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"What is {i} plus {i}?", "response": f"The answer is {2 * i}."} for i in range(n)]


def rankings(n: int) -> list[dict[str, Any]]:
    return [
        {"prompt": f"Say {i}", "responses": [f"{i}.", f"It is {i}.", "no", f"{i} {i} {i}"], "ranking": [1, 0, 3, 2]}
        for i in range(n)
    ]


class Recorder:
    """Step metrics and their wall-clock times, from the engine's events."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.times: list[float] = []
        self.weights: list[torch.Tensor] = []

    def __call__(self, ev: Any) -> None:
        if ev.kind == "start":
            self.weights = [p.detach().clone() for p in ev.payload["handle"].trainable_parameters()]
        if ev.kind == "step":
            self.rows.append(dict(ev.metrics))
            self.times.append(time.perf_counter())

    def changed(self, handle: Any) -> bool:
        return all(not torch.equal(a, b.detach()) for a, b in zip(self.weights, handle.trainable_parameters()))

    def finite(self, key: str) -> bool:
        values = [r[key] for r in self.rows if key in r]
        return bool(values) and all(math.isfinite(v) for v in values)

    def step_seconds(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return statistics.median(gaps) if gaps else math.nan


def invariants(precision: str, device: str) -> dict[str, bool]:
    """SFT -> reward -> PPO, and DPO and GRPO from the same SFT model, on the tiny model in `precision`: the CPU
    tests' invariants."""
    kw = {"precision": precision, "device": device, "progress": False}
    rec = [Recorder() for _ in range(5)]
    sft = api.sft(f"sft-{precision}", model="tiny", data=demos(32), max_steps=6, lr=3e-3, callbacks=[rec[0]], **kw)
    rm = api.reward(f"rm-{precision}", model=sft, data=rankings(16), max_steps=4, lr=1e-3, callbacks=[rec[1]], **kw)
    ppo = api.ppo(f"ppo-{precision}", policy=sft, reward=rm, prompts=[f"Say {i}" for i in range(16)], steps=3,
                  batch_size=8, mini_batch_size=8, max_new_tokens=12, lr=1e-3, callbacks=[rec[2]], **kw)  # fmt: skip
    dpo = api.dpo(f"dpo-{precision}", policy=sft, data=rankings(16), max_steps=3, batch_size=4, lr=1e-3,
                  eval_fraction=0, callbacks=[rec[3]], **kw)  # fmt: skip
    grpo = api.grpo(f"grpo-{precision}", policy=sft, reward=rm, prompts=[f"Say {i}" for i in range(16)], steps=3,
                    batch_size=4, num_generations=4, max_new_tokens=12, lr=1e-3, callbacks=[rec[4]], **kw)  # fmt: skip
    first_kl = rec[2].rows[0]["ppo/objective/kl"] if rec[2].rows else math.nan
    first_dpo = rec[3].rows[0]["train/loss"] if rec[3].rows else math.nan  # policy = reference: log 2
    first_grpo_kl = rec[4].rows[0]["grpo/kl"] if rec[4].rows else math.nan
    return {
        "sft_loss_finite": rec[0].finite("train/loss"),
        "reward_loss_finite": rec[1].finite("train/loss"),
        "ppo_losses_finite": rec[2].finite("ppo/policy/loss") and rec[2].finite("ppo/val/loss"),
        "ppo_kl_zero_at_step_1": abs(first_kl) < 1e-3,
        "sft_every_param_changed": rec[0].changed(sft),
        "reward_every_param_changed": rec[1].changed(rm),
        "ppo_every_param_changed": rec[2].changed(ppo),
        "ppo_steps": len(rec[2].rows) == 3,
        "dpo_loss_finite": rec[3].finite("train/loss"),
        "dpo_loss_log2_at_step_1": abs(first_dpo - math.log(2)) < 1e-2,
        "dpo_every_param_changed": rec[3].changed(dpo),
        "grpo_loss_finite": rec[4].finite("grpo/loss"),
        "grpo_kl_zero_at_step_1": abs(first_grpo_kl) < 1e-3,
        "grpo_every_param_changed": rec[4].changed(grpo),
    }


def random_model(name: str, shape: tuple[str, dict[str, Any]], folder: Path) -> str:
    """A randomly initialised model with `shape`, saved with the tiny model's tokenizer; returns its folder."""
    import transformers

    from rlhf_magic.engine.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cls, settings = shape
    config = getattr(transformers, cls)(**settings, max_position_embeddings=2048)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = folder / name
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def peak_mib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def timings(model: str, device: str, quick: bool) -> dict[str, Any]:
    """SFT, reward and PPO throughput and peak memory on one model."""
    steps, batch, new = (3, 4, 8) if quick else (12, 16, 64)
    kw = {"device": device, "progress": False}
    out: dict[str, Any] = {}
    reset_peak(device)
    rec = Recorder()
    sft = api.sft("t-sft", model=model, data=demos(4 * batch), max_steps=steps, batch_size=batch, eval_fraction=0,
                  callbacks=[rec], **kw)  # fmt: skip
    out["sft_tokens_s"] = statistics.median([r["train/tokens_per_s"] for r in rec.rows[1:]] or [math.nan])
    out["sft_peak_mib"] = peak_mib(device)
    params = sum(p.numel() for p in sft.lm.model.parameters())
    out["params_m"] = params / 1e6
    out["sft_model_tflops"] = 4 * params * out["sft_tokens_s"] / 1e12
    reset_peak(device)
    rec = Recorder()
    rm = api.reward("t-rm", model=sft, data=rankings(2 * batch), max_steps=steps, batch_size=batch // 2,
                    eval_fraction=0, normalize=False, callbacks=[rec], **kw)  # fmt: skip
    out["reward_ranked_prompts_s"] = (batch // 2) / rec.step_seconds()
    out["reward_peak_mib"] = peak_mib(device)
    reset_peak(device)
    rec = Recorder()
    api.ppo("t-ppo", policy=sft, reward=rm, prompts=[f"Say {i}" for i in range(4 * batch)], steps=max(3, steps // 4),
            batch_size=batch, mini_batch_size=batch, max_new_tokens=new, callbacks=[rec], **kw)  # fmt: skip
    out["ppo_step_s"] = statistics.median([r["ppo/time/step_s"] for r in rec.rows[1:]] or [math.nan])
    out["ppo_generated_tok_s"] = statistics.median([r["ppo/time/generated_tok_s"] for r in rec.rows[1:]] or [0.0])
    out["ppo_peak_mib"] = peak_mib(device)
    return {k: None if v is None or not math.isfinite(v) else round(v, 3) for k, v in out.items()}


def peak_tflops(device: str) -> float | None:
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="toy shapes and few steps (a smoke run of this script)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU; run with --device cpu --quick for a smoke run", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    precisions = ["bf16", "fp16"] if args.device == "cuda" else ["fp32", "bf16"]
    if args.device == "cuda" and not torch.cuda.is_bf16_supported():
        precisions = ["fp16"]
    checks = {p: invariants(p, args.device) for p in precisions}
    for p, result in checks.items():
        print(f"CHECK {p}: " + ", ".join(f"{k}={'ok' if v else 'FAILED'}" for k, v in result.items()), flush=True)
    shapes = TOY if args.quick else SHAPES
    peak = peak_tflops(args.device)
    times: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, shape in shapes.items():
            times[name] = timings(random_model(name, shape, Path(tmp)), args.device, args.quick)
            if peak and times[name]["sft_model_tflops"]:
                times[name]["sft_mfu"] = round(times[name]["sft_model_tflops"] / peak, 4)
            print(f"TIMING {name}: {json.dumps(times[name])}", flush=True)
    ok = all(all(r.values()) for r in checks.values())
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    result = {"bench": "gpu_check", "device": device, "torch": torch.__version__, "ok": ok, "checks": checks,
              "timings": times, "peak_tflops": peak, "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    print("RESULT " + json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
