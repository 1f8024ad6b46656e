"""`rlhf-magic STAGE CONFIG`: run a stage from a config file, also under `accelerate launch`.

CONFIG is a TOML file (`epochs = 2`, `[lora]` table or `lora.r = 8`) or a file with the same `key = value`
lines as a cell body. Names of notebook variables are not available here, so strings name what is on disk:
`data` and `prompts` are files, `model` / `policy` / `reference` the folder of a saved policy (an SFT run's
output_dir), `reward` the folder of a saved reward model or 'module:function' (an importable f(prompts, responses)).

    rlhf-magic sft sft.toml --name my_sft --set max_steps=20
    rlhf-magic dpo dpo.toml --set beta=0.2 'loss="plackett_luce"'
    rlhf-magic ppo ppo.toml --set 'reward="rules:score"'
    rlhf-magic grpo grpo.toml --set num_generations=8 'algorithm="rloo"'
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m rlhf_magic.cli sft sft.toml

Under `accelerate launch` every process trains on its own share of the data (PPO, GRPO: its own prompts and
sampling seed), metrics are averaged over processes, and only the main process saves, prints and writes the summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import STAGES
from .errors import ConfigError, RLHFError
from .parsing import parse_body, parse_line_args
from .validation import build_config, describe


def read_config_file(path: Path) -> dict[str, Any]:
    """Settings from TOML (nested tables become dotted keys) or from cell-body lines."""
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            return _flatten(tomllib.loads(text))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    values, _ = parse_body(text, {})
    return values


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict) and key == "lora":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-magic", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    for stage, cls in STAGES.items():
        sp = sub.add_parser(
            stage,
            help=cls.__doc__,
            description=f"{cls.__doc__}\n\nSettings:\n{describe(cls)}",
            formatter_class=argparse.RawTextHelpFormatter,
        )
        sp.add_argument("config", type=Path, help="TOML file or `key = value` lines")
        sp.add_argument("--name", default=stage, help="result name (default: the stage)")
        sp.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override settings")
        sp.add_argument("--summary", type=Path, help="write a JSON summary (metrics, processes) here")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    values = read_config_file(args.config)
    if args.set:
        _, overrides = parse_line_args(" ".join(args.set), {}, args.stage)
        values.update(overrides)
    cfg = build_config(STAGES[args.stage], values)
    if cfg.output_dir is None:
        raise ConfigError(f"set output_dir in {args.config}: a CLI run keeps its result only on disk")
    from . import api

    handle = getattr(api, args.stage)(args.name, config=cfg)
    summary = _summary(handle)
    if args.summary and handle.runtime.is_main_process:
        args.summary.write_text(json.dumps(summary, indent=2))
    _finish(handle.runtime.accelerator())
    return summary


def _finish(acc: Any) -> None:
    """With several processes: all of them wait for the main one's writes, then leave the process group together
    (a process that exits while the group lives may abort in gloo's teardown)."""
    if acc.num_processes > 1:
        acc.wait_for_everyone()
        acc.end_training()


def _summary(handle: Any) -> dict[str, Any]:
    """Metrics plus a checksum of the trained weights from every process (equal when data parallelism syncs)."""
    import torch

    acc = handle.runtime.accelerator()
    params = handle.trainable_parameters() if hasattr(handle, "trainable_parameters") else []
    checksum = sum(float(p.detach().double().abs().sum()) for p in params)
    sums = acc.gather(torch.tensor([checksum], dtype=torch.float64, device=acc.device)).tolist()
    return {
        "name": handle.name,
        "num_processes": acc.num_processes,
        "param_checksums": sums,
        "metrics": json.loads(json.dumps(handle.metrics.summary, default=repr)),
    }


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run(argv)
    except RLHFError as e:
        print(f"rlhf-magic: error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch: the main process prints, once
        print(json.dumps(summary["metrics"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
