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

In a terminal a progress bar follows the steps (plain step lines when the output is a file or a pipe); the run
ends with its final metrics as one JSON line and a one-line summary (stage, name, steps, seconds, the main metrics,
where it saved). Under `accelerate launch` every process trains on its own share of the data (PPO, GRPO: its own
prompts and sampling seed), metrics are averaged over processes, and only the main process saves, prints (the bar
too) and writes the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from .config import STAGES
from .errors import ConfigError, RLHFError
from .events import Callback, Event
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

    view = progress_view(args.stage, f"{args.stage} {args.name}")
    started = time.monotonic()
    handle = getattr(api, args.stage)(args.name, config=cfg, progress=False, callbacks=[view] if view else [])
    summary = _summary(handle)
    summary.update(stage=args.stage, seconds=round(time.monotonic() - started, 1))
    summary["saved"] = str(Path(cfg.output_dir).resolve())
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
    if is_main_process():  # under accelerate launch: the main process prints, once
        print(json.dumps(summary["metrics"]))
        print(summary_line(summary), flush=True)
    return 0


def is_main_process() -> bool:
    """False on the processes other than the main one under `accelerate launch` (torchrun sets RANK for each)."""
    return os.environ.get("RANK", "0") == "0"


def _panels(stage: str) -> Any:
    from .widgets.live import DEFAULT_PANELS

    return DEFAULT_PANELS.get(stage, [("loss", ["train/loss"])])


def progress_view(stage: str, title: str, stream: Any = None) -> Callback | None:
    """The run's progress on `stream` (stdout): a tqdm bar in a terminal, plain step lines otherwise, and nothing on
    a process other than the main one."""
    if not is_main_process():
        return None
    from .widgets.live import TextView

    stream = stream or sys.stdout
    isatty = getattr(stream, "isatty", None)
    if callable(isatty) and isatty():
        return BarView(title, _panels(stage), stream)
    return TextView(title, _panels(stage), stream=stream)


class _AboveBar:
    """A stream for the lines printed while the bar is drawn: each whole line goes above the bar (tqdm.write)."""

    def __init__(self, stream: Any):
        self.stream, self.pending = stream, ""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            tqdm.write(line, file=self.stream)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class BarView:
    """A tqdm bar over the optimizer steps with the stage's main metrics after it; the other events (samples,
    histograms, alarms, the end) print as in TextView, above the bar."""

    def __init__(self, title: str, panels: Any, stream: Any):
        from .widgets.live import TextView

        self.title, self.stream, self.bar = title, stream, None
        self.keys = [k for _, keys in panels for k in keys]
        self.latest: dict[str, float] = {}
        self.text = TextView(title, panels, stream=_AboveBar(stream))

    def __call__(self, ev: Event) -> None:
        if ev.kind == "start" or (ev.kind in ("step", "eval") and self.bar is None):
            self._open(ev.total, ev.step if ev.kind == "start" else 0)  # a continued PPO run starts at its step
        if ev.kind in ("step", "eval"):
            self.latest.update({k: v for k, v in ev.metrics.items() if isinstance(v, (int, float))})
            shown = {k: f"{self.latest[k]:.4g}" for k in self.keys if k in self.latest}
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(max(ev.step - self.bar.n, 0))
        elif ev.kind == "warning":
            self.text.stream.write(f"[{self.title}] warning: {ev.payload}\n")
        elif ev.kind != "start":
            if ev.kind == "end":
                self.close()
            self.text(ev)

    def _open(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        self.close()
        try:  # a terminal that reports no width (some CI ptys) would get a bar of no width: 100 columns instead
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 0
        size = {"dynamic_ncols": True} if width else {"ncols": 100}
        self.bar = tqdm(total=total or None, initial=initial, desc=self.title, unit="step", file=self.stream, **size)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_line(summary: dict[str, Any]) -> str:
    """'rlhf-magic: sft 'my_sft' done: 20 steps in 12.3 s; train/loss 0.512; saved to /abs/out' (stopped: why,
    when the run ended early)."""
    metrics = summary["metrics"]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k not in ("steps", "seconds")}
    panels = dict.fromkeys(k for _, keys in _panels(summary["stage"]) for k in keys if k in numbers)
    main = list(panels) or list(numbers)
    shown = ", ".join(f"{k} {numbers[k]:.4g}" for k in main if math.isfinite(numbers[k]))
    ended = f"stopped ({metrics['stopped']})" if metrics.get("stopped") else "done"
    return (
        f"rlhf-magic: {summary['stage']} {summary['name']!r} {ended}: {metrics.get('steps', 0)} steps in "
        f"{summary['seconds']} s; {shown or 'no metrics'}; saved to {summary['saved']}"
    )


if __name__ == "__main__":
    sys.exit(main())
