"""One process of `tests/test_distributed.py`'s launches: `rlhf_magic.cli.main` with spies.

The spies log, per process, the training rows it saw, the rollouts it sampled (prompts, seed, answers), its raw PPO
rows, its metric history, every folder it saved and whether the divergence watch watched the sharded weights, to
$RLHF_MAGIC_TEST_SPIES/rank<N>.json; after the run, the main process alone uses the handle (`_use_after`). With
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
    from rlhf_magic.engine import dpo, handles, ppo, reward, reward_model, rollout, sft

    log: dict[str, Any] = {"rows": [], "rollouts": [], "ppo_rows": [], "saved": [], "history": []}
    for module in (sft, reward, dpo):
        _spy_rows(module, log["rows"])
    for module in (handles, reward_model):
        _spy_saves(module, log["saved"])
    generate, step, summary = rollout.generate, ppo.ppo_step, cli._summary
    trained: list[Any] = []  # the handle the run returned

    def spy_generate(roles: Any, prompts: list[str], cfg: Any, seed: int, capture: bool = False) -> Any:
        ro = generate(roles, prompts, cfg, seed, capture)
        log["rollouts"].append({"prompts": list(prompts), "seed": seed, "texts": list(ro.texts)})
        return ro

    def spy_step(run: Any, prompts: list[str]) -> Any:
        row = step(run, prompts)
        log["ppo_rows"].append(dict(row) if row else None)
        return row

    def spy_summary(handle: Any) -> dict[str, Any]:
        log["history"], trained[:] = handle.metrics.history, [handle]
        return summary(handle)

    rollout.generate, ppo.ppo_step, cli._summary = spy_generate, spy_step, spy_summary
    if os.environ.get("RLHF_MAGIC_TEST_FSDP2"):
        _as_fsdp2()
    _spy_sharding(log)
    code = cli.main(argv)
    if trained and os.environ.get("RANK", "0") == "0":
        log["after"] = _use_after(trained[0])
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


def _use_after(handle: Any) -> list[Any]:
    """The handle after the run, in this process alone (the other may have exited): a policy's greedy answers, a
    reward model's scores. Any collective left on the model (FSDP2's) would fail here."""
    prompts = [f"Tell me about number {i}." for i in range(3)]
    if hasattr(handle, "generate"):
        return handle.generate(prompts, max_new_tokens=6)
    return handle.score(prompts, ["It is a number.", "q", "abab"])


def _spy_sharding(log: dict[str, Any]) -> None:
    """Log whether accelerate sharded the model with FSDP2 (its parameters became DTensors), and whether the
    divergence watch watches the weights that train (under FSDP2 the sharded ones, not the pre-`prepare` ones)."""
    from torch.distributed.tensor import DTensor

    from rlhf_magic.engine import divergence, sharding

    original, watch = sharding.prepare, divergence.watch
    log["fsdp2"] = False

    def watched(params: Any, *args: Any, **kw: Any) -> Any:
        log["watched_sharded"] = bool(params) and all(isinstance(p, DTensor) for p in params)
        return watch(params, *args, **kw)

    divergence.watch = watched

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

    def atomic_dir(path: Path, write: Any, **kw: Any) -> Path:
        saved.append(str(Path(path).expanduser().resolve()))
        return original(path, write, **kw)

    module.atomic_dir = atomic_dir


if __name__ == "__main__":
    sys.exit(_launched(sys.argv[1:]))
