"""What each process of a data-parallel PPO run does differently, and what all of them agree on.

Under `accelerate launch` every process runs train_ppo. Each one samples its own share of the prompts with its own
seed (else the rollouts, and so the gradients, would be copies and a second process would add nothing); the
step's metrics are then reduced across processes, and the KL controller steps on the mean KL of the whole batch,
as TRL's does. With one process (rank 0 of 1) everything is as it was.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..errors import ConfigError

RANK_STRIDE = 1_000_003  # sampling seeds of two ranks differ by this much: their streams never meet in a run
THROUGHPUT = "ppo/time/generated_tok_s"


def processes() -> int:
    """How many processes `accelerate launch` (or torchrun) started, before any accelerate state exists."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank_of(acc: Any) -> tuple[int, int]:
    """(this process's index, number of processes)."""
    return int(getattr(acc, "process_index", 0)), int(getattr(acc, "num_processes", 1))


def prompt_batch(prompts: list[str], order: list[int], step: int, batch_size: int, acc: Any) -> list[str]:
    """This rank's prompts at `step`: the rank-th of the step's consecutive slices of the shuffled `order`, one
    slice per process, so the processes of a step never share a prompt while there are enough of them."""
    rank, n = rank_of(acc)
    start = (step * n + rank) * batch_size
    return [prompts[order[(start + i) % len(order)]] for i in range(batch_size)]


def sampling_seed(seed: int, step: int, acc: Any) -> int:
    """The sampling seed of this rank at `step` (rank 0 keeps the single-process seed)."""
    return seed * 100_003 + step + rank_of(acc)[0] * RANK_STRIDE


def same_chunks(cfg: Any) -> Any:
    """Every process must run the same forward and backward passes (DDP synchronises each one). The CPU fast path
    sizes PPO's micro-batches by the rollout's token width, which differs between ranks' prompts, so with several
    processes an unset micro_batch_size becomes the whole minibatch (what a GPU runs anyway)."""
    whole = cfg.mini_batch_size or cfg.batch_size
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" and (cfg.micro_batch_size or whole) < whole:
        raise ConfigError(
            f"micro_batch_size = {cfg.micro_batch_size}: under DeepSpeed every backward pass ends in an optimizer "
            "step, so a minibatch must be one pass; leave micro_batch_size unset"
        )
    if processes() > 1 and cfg.micro_batch_size is None:
        return dataclasses.replace(cfg, micro_batch_size=whole)
    return cfg


def reduce_row(run: Any, row: dict[str, float] | None) -> dict[str, float] | None:
    """The step's metrics averaged over processes (maxima for `*_max`, the sum for the throughput), and every
    rank's KL controller stepped again on the mean KL of all ranks' answers. One process: the row as it is."""
    acc = run.acc
    if row is None or acc.num_processes == 1:
        return row
    keys = sorted(row)
    values = torch.tensor([float(row[k]) for k in keys], dtype=torch.float64, device=acc.device)
    mean, high = acc.reduce(values, "mean"), acc.reduce(values, "max")
    out = {k: float(h if k.endswith("_max") else m) for k, m, h in zip(keys, mean.tolist(), high.tolist())}
    if THROUGHPUT in out:
        out[THROUGHPUT] *= acc.num_processes  # the job's, not one process's
    kl = out["ppo/objective/kl" if run.cfg.kl_estimator == "k1" else "ppo/objective/kl_k3"]
    ctl = run.state.kl_ctl
    ctl.value = row["ppo/objective/kl_coef"]  # its value before this rank's own update
    ctl.update(kl, run.cfg.batch_size * acc.num_processes)
    return {k: out[k] for k in row}


def any_rank(acc: Any, flag: bool) -> bool:
    """Whether `flag` holds in any process (one process: `flag`)."""
    if getattr(acc, "num_processes", 1) == 1:
        return flag
    return bool(acc.reduce(torch.tensor([float(flag)], device=acc.device), "sum").item() > 0)
