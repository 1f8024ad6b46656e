"""One process of `tests/test_distributed.py`'s launches: `rlhf_magic.cli.main` with spies.

The spies log, per process, the training rows it saw, the rollouts it sampled (prompts, seed, answers), its raw PPO
rows, its metric history and every folder it saved, to $RLHF_MAGIC_TEST_SPIES/rank<N>.json. With
$RLHF_MAGIC_TEST_FSDP2 set, accelerate prepares the models with FSDP2.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch


def _launched(argv: list[str]) -> int:
    """A process of `launch`: the CLI, with spies that log what this process did to RLHF_MAGIC_TEST_SPIES."""
    from rlhf_magic import cli
    from rlhf_magic.engine import handles, ppo, reward, reward_model, rollout, sft

    log: dict[str, Any] = {"rows": [], "rollouts": [], "ppo_rows": [], "saved": [], "history": []}
    for module in (sft, reward):
        _spy_rows(module, log["rows"])
    for module in (handles, reward_model):
        _spy_saves(module, log["saved"])
    generate, step, summary = rollout.generate, ppo.ppo_step, cli._summary

    def spy_generate(roles: Any, prompts: list[str], cfg: Any, seed: int, capture: bool = False) -> Any:
        ro = generate(roles, prompts, cfg, seed, capture)
        log["rollouts"].append({"prompts": list(prompts), "seed": seed, "texts": list(ro.texts)})
        return ro

    def spy_step(run: Any, prompts: list[str]) -> Any:
        row = step(run, prompts)
        log["ppo_rows"].append(dict(row) if row else None)
        return row

    def spy_summary(handle: Any) -> dict[str, Any]:
        log["history"] = handle.metrics.history
        return summary(handle)

    rollout.generate, ppo.ppo_step, cli._summary = spy_generate, spy_step, spy_summary
    if os.environ.get("RLHF_MAGIC_TEST_FSDP2"):
        _as_fsdp2()
    _spy_sharding(log)
    code = cli.main(argv)
    out = Path(os.environ["RLHF_MAGIC_TEST_SPIES"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(log, default=float))
    return code


def _as_fsdp2() -> None:
    """Make accelerate prepare models with FSDP2 on CPU processes. `accelerate launch --config_file fsdp2.yaml`
    sets the FSDP environment, but accelerate turns FSDP on only for GPU (and similar) processes, while torch's
    FSDP2 itself runs on gloo: this builds the state accelerate would build on GPUs, with the plugin read from that
    environment, so the engine's FSDP2 path runs here for real."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from rlhf_magic.engine import runtime

    original = runtime.Runtime.accelerator

    def accelerator(self: Any, grad_accum: int = 1) -> Any:
        acc = original(self, grad_accum)
        if acc.state.distributed_type != DistributedType.FSDP:
            plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables that the config file set
            assert plugin.fsdp_version == 2, plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            acc.state.distributed_type, acc.state.fsdp_plugin = DistributedType.FSDP, plugin
        return acc

    runtime.Runtime.accelerator = accelerator


def _spy_sharding(log: dict[str, Any]) -> None:
    """Log whether accelerate sharded the model with FSDP2 (its parameters became DTensors)."""
    from torch.distributed.tensor import DTensor

    from rlhf_magic.engine import sharding

    original = sharding.prepare
    log["fsdp2"] = False

    def prepare(acc: Any, module: Any, *objects: Any, **kw: Any) -> tuple[Any, ...]:
        prepared = original(acc, module, *objects, **kw)
        log["fsdp2"] = any(isinstance(p, DTensor) for p in prepared[0].parameters())
        log["fsdp2_groups"] = len(sharding._fsdp_modules(prepared[0]))
        return prepared

    sharding.prepare = prepare


def _spy_rows(module: Any, rows: list) -> None:
    """Log the unpadded token rows of every training batch this process runs."""
    original = module.run_steps

    def run_steps(*args: Any, tokens_of: Any, **kwargs: Any) -> Any:
        def counted(batch: dict[str, torch.Tensor]) -> int:
            ids, mask = batch["input_ids"], batch["attention_mask"].bool()
            rows.extend(ids[i][mask[i]].tolist() for i in range(ids.shape[0]))
            return tokens_of(batch)

        return original(*args, tokens_of=counted, **kwargs)

    module.run_steps = run_steps


def _spy_saves(module: Any, saved: list) -> None:
    original = module.atomic_dir

    def atomic_dir(path: Path, write: Any) -> Path:
        saved.append(str(Path(path).expanduser().resolve()))
        return original(path, write)

    module.atomic_dir = atomic_dir


if __name__ == "__main__":
    sys.exit(_launched(sys.argv[1:]))
