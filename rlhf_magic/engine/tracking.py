"""Experiment trackers (`report_to`): a stage's events sent to TensorBoard, W&B, trackio or MLflow.

The tracker is one more callback on the stage's events, built from accelerate's tracker classes
(`accelerate.tracking`) on the main process only. The session's Accelerator is shared by every stage and its
`log_with` is fixed when it is built, so each stage opens its own tracker run instead: one run per stage, named
`NAME-YYYYmmdd-HHMMSS`. What goes out: every metric of every step (the live view's plots are a subset), the
settings as hyperparameters, sample answers as a table (W&B, trackio, MLflow) or a markdown table (TensorBoard),
histograms where the tracker has them, and warnings and divergence alarms as text (TensorBoard, W&B).

TensorBoard writes under `$RLHF_MAGIC_LOGGING_DIR` (default `./runs`), so `tensorboard --logdir runs` shows every
run; W&B and trackio log to the project `$WANDB_PROJECT` / `$TRACKIO_PROJECT` (default 'rlhf-magic'), MLflow to the
experiment `$MLFLOW_EXPERIMENT_NAME` (default 'rlhf-magic').
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..events import Event

TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")
PROJECT = "rlhf-magic"
_OPEN: set[TrackerView] = set()  # runs not yet finished: a stage that raised leaves one, closed by the next or at exit


def installed(report_to: str) -> bool:
    """Whether the tracker's package is importable (accelerate's own test; TensorBoard also takes tensorboardX)."""
    from accelerate import utils

    return {
        "tensorboard": utils.is_tensorboard_available,
        "wandb": utils.is_wandb_available,
        "trackio": utils.is_trackio_available,
        "mlflow": utils.is_mlflow_available,
    }[report_to]()


def check(report_to: str) -> None:
    """A one-line error, before anything loads or is written, when the chosen tracker is not installed."""
    if report_to in (None, "none"):
        return
    if report_to not in TRACKERS:
        raise ConfigError(f"report_to = {report_to!r} is not valid; expected one of {', '.join(TRACKERS)} or 'none'")
    if not installed(report_to):
        raise ConfigError(
            f"report_to = {report_to!r} but {report_to} is not installed; pip install {report_to} "
            "(or set report_to = 'none')"
        )


def tracker_view(report_to: str, stage: str, name: str) -> TrackerView | None:
    """The callback that sends a stage's events to `report_to`, or None ('none', or not the main process)."""
    if report_to in (None, "none") or os.environ.get("RANK", "0") != "0":
        return None
    check(report_to)
    return TrackerView(report_to, stage, name)


def logging_root() -> Path:
    """Where TensorBoard runs go: `$RLHF_MAGIC_LOGGING_DIR`, else ./runs (what torch's SummaryWriter uses)."""
    return Path(os.environ.get("RLHF_MAGIC_LOGGING_DIR") or "runs")


def hyperparameters(config: Any, stage: str, name: str) -> dict[str, Any]:
    """The settings as flat scalars: `lora.r`, ...; data, handles and callables as short descriptions."""
    from .handles import config_summary

    out: dict[str, Any] = {"stage": stage, "name": name}
    for key, value in (config_summary(config) or {}).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, v in items:
            out[f"{key}.{sub}" if sub else key] = v if v is None or isinstance(v, (bool, int, float, str)) else str(v)
    return out


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _markdown_table(columns: list[str], data: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in data])


def _tag(title: str) -> str:
    return re.sub(r"[^\w/.-]+", "_", title.strip()).strip("_") or "values"


class TrackerView:
    """An engine callback: 'start' opens the tracker run and stores the settings, 'end' finishes it."""

    def __init__(self, report_to: str, stage: str, name: str):
        self.report_to, self.stage, self.name = report_to, stage, name
        self.tracker: Any = None
        self.run_name = ""
        self.logging_dir: Path | None = None  # TensorBoard: the run's folder
        self.step = 0  # the latest step: W&B drops values logged at an earlier step
        self.refused: set[str] = set()  # kinds of extras the tracker would not take (warned once)

    def __call__(self, ev: Event) -> None:
        if ev.kind == "start":
            self.open(ev)
            return
        if self.tracker is None:
            return
        self.step = max(self.step, ev.step)
        if ev.kind in ("step", "eval"):
            self.tracker.log(_scalars(ev.metrics), step=self.step)
        elif ev.kind in ("samples", "histogram", "warning", "alarm"):
            self.extra(ev)
        elif ev.kind == "end":
            self.close()

    def extra(self, ev: Event) -> None:
        """Samples, histograms and notes. One the tracker refuses is warned about once and skipped, so the metrics
        still go out (an exception here would detach the whole view)."""
        try:
            if ev.kind == "samples":
                self.table(ev.payload or {})
            elif ev.kind == "histogram":
                self.histogram(ev.payload or {})
            else:
                self.text(ev.kind, ev.payload["message"] if isinstance(ev.payload, dict) else str(ev.payload))
        except Exception as e:
            if ev.kind not in self.refused:
                self.refused.add(ev.kind)
                warnings.warn(f"rlhf-magic: {self.report_to} did not take the {ev.kind} of {self.name!r}: {e!r}; "
                              "the metrics still go out", stacklevel=2)  # fmt: skip

    def open(self, ev: Event) -> None:
        for stale in list(_OPEN):  # a stage that raised never sent 'end'
            with contextlib.suppress(Exception):
                stale.close()
        config = ev.payload.get("config") if isinstance(ev.payload, dict) else None
        self.step = ev.step
        self.tracker = self._build()
        _OPEN.add(self)
        self.tracker.start()
        self.tracker.store_init_configuration(hyperparameters(config, self.stage, self.name))

    def _build(self) -> Any:
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        cls = LOGGER_TYPE_TO_CLASS[self.report_to]
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.report_to == "tensorboard":
            root, self.run_name = logging_root(), f"{self.name}-{stamp}"
            n = 1
            while (root / self.run_name).exists():  # two runs in one second
                n += 1
                self.run_name = f"{self.name}-{stamp}-{n}"
            self.logging_dir = root / self.run_name
            return cls(self.run_name, str(root))
        self.run_name = f"{self.name}-{stamp}"
        if self.report_to == "mlflow":
            return cls(experiment_name=PROJECT, run_name=self.run_name)
        project = os.environ.get(f"{self.report_to.upper()}_PROJECT") or PROJECT
        return cls(project, name=self.run_name)

    def table(self, payload: dict[str, Any]) -> None:
        """Sample answers: a table where the tracker has one, a markdown table in TensorBoard's text tab."""
        rows = payload.get("rows") or []
        if not rows:
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[row.get(c, "") for c in columns] for row in rows]
        key = f"{self.stage}/samples"
        if hasattr(self.tracker, "log_table"):  # W&B (accelerate's log_table)
            self.tracker.log_table(key, columns=columns, data=data, step=self.step)
        elif self.report_to == "trackio":
            import pandas as pd
            import trackio

            self.tracker.log({key: trackio.Table(dataframe=pd.DataFrame(data, columns=columns))}, step=self.step)
        elif self.report_to == "mlflow":
            import mlflow

            cols = {c: [row[i] for row in data] for i, c in enumerate(columns)}
            mlflow.log_table(data=cols, artifact_file=f"{key}/step_{self.step:06d}.json")
        else:
            self.text("samples", f"**{payload.get('title', 'samples')}**\n\n{_markdown_table(columns, data)}")

    def histogram(self, payload: dict[str, Any]) -> None:
        """Each series of a histogram event (reward and DPO score distributions); MLflow has no histograms. A count
        in the title ("(18 pairs, eval)") stays out of the tag, so runs on other data compare."""
        title = _tag(re.sub(r"\(\d+ \w+,?\s*", "(", str(payload.get("title", "histogram"))))
        for series, values in (payload.get("series") or {}).items():
            finite = [float(v) for v in values if math.isfinite(float(v))]
            if not finite:
                continue
            tag = f"{self.stage}/{title}/{_tag(str(series))}"
            if self.report_to == "tensorboard":
                import numpy as np

                self.tracker.writer.add_histogram(tag, np.asarray(finite), global_step=self.step)
            elif self.report_to in ("wandb", "trackio"):
                module = importlib.import_module(self.report_to)
                self.tracker.log({tag: module.Histogram(finite)}, step=self.step)

    def text(self, tag: str, message: str) -> None:
        """A note at the current step, where the tracker takes text (MLflow and trackio log numbers and media)."""
        if self.report_to in ("tensorboard", "wandb"):
            self.tracker.log({f"{self.stage}/{tag}": message}, step=self.step)

    def close(self) -> None:
        if self.tracker is not None:
            tracker, self.tracker = self.tracker, None
            _OPEN.discard(self)
            tracker.finish()


@atexit.register
def _finish_open() -> None:
    for view in list(_OPEN):
        with contextlib.suppress(Exception):
            view.close()
