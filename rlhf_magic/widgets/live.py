"""Live training view: progress with ETA, metric plots updated in place, sample tables, warnings, Stop, and a red
alarm when the run diverges.

In a notebook it uses core ipywidgets plus one matplotlib image updated through a display handle (works in
JupyterLab, Notebook 7, VS Code, Colab and nbclient). Elsewhere it prints a line now and then.
"""

from __future__ import annotations

import html
import math
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any

from ..events import Event, StopControl
from . import notebook_module

Panels = Sequence[tuple[str, Sequence[str]]]
DEFAULT_PANELS: dict[str, Panels] = {
    "sft": [("loss", ["train/loss", "eval/loss"])],
    "reward": [("loss", ["train/loss"]), ("pairwise accuracy", ["train/accuracy", "eval/accuracy"])],
    "dpo": [
        ("loss", ["train/loss", "eval/loss"]),
        ("implicit-reward accuracy", ["train/rewards/accuracies", "eval/rewards/accuracies"]),
        ("implicit-reward margin", ["train/rewards/margins", "eval/rewards/margins"]),
        ("held-out implicit rewards", ["eval/rewards/chosen", "eval/rewards/rejected"]),
    ],
    "ppo": [
        ("score and reward", ["ppo/objective/scores", "ppo/objective/rlhf_reward"]),
        ("KL to the SFT policy (per answer)", ["ppo/objective/kl", "ppo/objective/kl_k3"]),
        ("entropy (per token)", ["ppo/policy/entropy"]),
        ("policy updates", ["ppo/policy/clipfrac", "ppo/policy/approxkl"]),
        ("value function", ["ppo/val/loss", "ppo/val/explained_var"]),
        ("answers", ["ppo/response/length", "ppo/response/eos_rate"]),
    ],
    "grpo": [
        ("reward", ["grpo/reward", "grpo/reward_std"]),
        ("KL to the SFT policy (per token)", ["grpo/kl"]),
        ("entropy (per token)", ["grpo/entropy"]),
        ("groups with equal rewards (advantage 0)", ["grpo/frac_reward_zero_std"]),
        ("policy updates", ["grpo/loss", "grpo/clip_ratio/region_mean"]),
        ("answers", ["grpo/completions/mean_length", "grpo/completions/clipped_ratio"]),
    ],
}


RED = "#dc2626"  # the divergence alarm


def in_notebook() -> bool:
    """True inside a Jupyter kernel (where widgets and display updates reach a front end)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


def live_view(stage: str, title: str, stop: StopControl | None = None, panels: Panels | None = None) -> Any:
    """A callback for engine events: the widget view in a notebook, the text view elsewhere."""
    panels = panels or DEFAULT_PANELS.get(stage, [("loss", ["train/loss"])])
    if in_notebook():
        try:
            return WidgetView(title, panels, stop)
        except ImportError:
            pass
    return TextView(title, panels)


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    return (
        f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


class _Progress:
    """Step timing shared by both views."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.first_step: float | None = None

    def line(self, ev: Event) -> str:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now
        if ev.step and self.first_step is None:
            self.first_step = now
        done = max(ev.step, 0)
        rate = (now - self.t0) / done if done else math.nan
        left = (ev.total - done) * rate if done else math.nan
        return (
            f"step {done}/{ev.total} · {rate:.2f} s/step · ETA {fmt_eta(left)}"
            if done
            else f"step 0/{ev.total} · starting"
        )


class TextView:
    """Plain-text progress for scripts, the CLI and terminal IPython."""

    def __init__(self, title: str, panels: Panels, every_s: float = 5.0, stream: Any = None):
        self.title, self.panels, self.every_s = title, panels, every_s
        self.stream = stream or sys.stdout
        self.progress = _Progress()
        self.last = -math.inf
        self.alarm = ""  # the line of the last divergence alarm

    def __call__(self, ev: Event) -> None:
        if ev.kind == "start":
            self.progress.line(ev)
            print(f"[{self.title}] {ev.total} steps", file=self.stream, flush=True)
        elif ev.kind == "step":
            now = time.monotonic()
            if now - self.last >= self.every_s or ev.step in (1, ev.total):
                self.last = now
                keys = [k for _, ks in self.panels for k in ks if k in ev.metrics]
                vals = " ".join(f"{k}={ev.metrics[k]:.4g}" for k in keys)
                print(f"[{self.title}] {self.progress.line(ev)} {vals}", file=self.stream, flush=True)
        elif ev.kind == "warning":
            warnings.warn(f"{self.title}: {ev.payload}", stacklevel=2)
        elif ev.kind == "alarm":
            self.alarm = ev.payload["message"]
            print(f"[{self.title}] {'stopped' if ev.payload['stopped'] else 'warning'}: {self.alarm}", file=self.stream,
                  flush=True)  # fmt: skip
        elif ev.kind == "samples":
            print(f"[{self.title}] {ev.payload.get('title', 'samples')}:", file=self.stream)
            for row in ev.payload["rows"]:
                print("  " + " | ".join(f"{k}: {str(v)[:120]!r}" for k, v in row.items()), file=self.stream)
        elif ev.kind == "histogram":
            print(f"[{self.title}] {ev.payload.get('title', 'histogram')}:", file=self.stream)
            for name, values in ev.payload["series"].items():
                print(f"  {name}: {series_line(values)}", file=self.stream, flush=True)
        elif ev.kind == "end":
            reason = ev.payload.get("reason", "done")
            reason = "stopped for divergence (see above)" if reason == self.alarm else reason
            print(f"[{self.title}] finished: {reason}", file=self.stream, flush=True)


def series_line(values: Sequence[float]) -> str:
    if not values:
        return "n=0"
    return f"n={len(values)} mean={sum(values) / len(values):.3f} min={min(values):.3f} max={max(values):.3f}"


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot: no backend state, no second copy from the inline backend."""
    figure = notebook_module("matplotlib.figure")
    return figure.Figure(figsize=(width, height), dpi=80)


def png_image(fig: Any) -> Any:
    """The figure as a PNG display object (works whatever matplotlib backend the kernel has)."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Image(data=buf.getvalue(), format="png")


def samples_html(payload: dict) -> str:
    rows = payload.get("rows") or []
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td style='text-align:left;vertical-align:top;white-space:pre-wrap'>{html.escape(_cell(r.get(c)))}</td>"
            for c in cols
        )
        + "</tr>"
        for r in rows
    )
    title = html.escape(payload.get("title", "samples"))
    return f"<b>{title}</b><table class='rlhf-samples'><tr>{head}</tr>{body}</table>"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)[:400]


class WidgetView:
    """The notebook view: a progress bar with ETA, a plot updated in place, samples, warnings, Stop."""

    redraw_s = 0.5

    def __init__(self, title: str, panels: Panels, stop: StopControl | None):
        W = notebook_module("ipywidgets")
        from IPython.display import display

        self.title, self.panels, self.stop = title, panels, stop
        self.progress = _Progress()
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.bar = W.FloatProgress(value=0, min=0, max=1, layout=W.Layout(width="50%"))
        self.label = W.HTML(f"<b>{html.escape(title)}</b> starting")
        self.button = W.Button(
            description="Stop",
            icon="stop",
            button_style="warning",
            layout=W.Layout(width="110px"),
            disabled=stop is None,
        )
        self.button.add_class("rlhf-stop")
        self.button.on_click(self._on_stop)
        self.alerts = W.HTML("")
        self.alarm: dict | None = None  # the divergence alarm's payload, once there is one
        self.samples = W.HTML("")
        self.box = W.VBox([W.HBox([self.button, self.bar, self.label]), self.alerts])
        self.box.add_class("rlhf-live")
        display(self.box)
        if stop is not None:
            from .uipoll import poll_ui_events

            poll_ui_events(self.button)  # from now on a Stop click reaches the kernel while the cell runs
        self.fig = self._figure()
        self.plot = display(png_image(self.fig), display_id=True)
        display(self.samples)
        self.last_draw = -math.inf

    def _figure(self) -> Any:
        n = len(self.panels)
        cols = min(n, 3)
        fig = new_figure(4.2 * cols, 2.6 * math.ceil(n / cols))
        axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False)
        self.axes = [ax for row in axes for ax in row]
        for ax in self.axes[n:]:
            ax.set_visible(False)
        return fig

    def _on_stop(self, _btn: Any) -> None:
        if self.stop is not None:
            self.stop.request("stopped with the Stop button")
            self.button.disabled = True
            self.button.description = "Stopping"

    def __call__(self, ev: Event) -> None:
        if ev.kind in ("start", "step") and self.stop is not None:
            from .uipoll import poll_ui_events

            poll_ui_events(self.button)  # throttled; lets a Stop click reach the kernel during the cell
        if ev.kind == "start":
            self.bar.max = max(ev.total, 1)
            self.label.value = f"<b>{html.escape(self.title)}</b> {self.progress.line(ev)}"
        elif ev.kind == "step":
            for k, v in ev.metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.history.setdefault(k, []).append((ev.step, float(v)))
            self.bar.value = ev.step
            self.label.value = f"<b>{html.escape(self.title)}</b> {self.progress.line(ev)}"
            if time.monotonic() - self.last_draw >= self.redraw_s or ev.step == ev.total:
                self.draw()
        elif ev.kind == "warning":
            self.alerts.value += f"<div style='color:#b45309'>⚠ {html.escape(str(ev.payload))}</div>"
        elif ev.kind == "alarm":
            self.diverged(ev.payload)
        elif ev.kind == "samples":
            self.samples.value = samples_html(ev.payload)
        elif ev.kind == "histogram":
            self.histogram(ev.payload)
        elif ev.kind == "end":
            self.draw()
            self.button.disabled = True
            self.button.description = "Stopped" if self.stop is not None and self.stop.requested else "Done"
            reason = ev.payload.get("reason", "done") if isinstance(ev.payload, dict) else "done"
            if self.alarm is not None and reason == self.alarm["message"]:
                reason = "stopped for divergence"
            style = f" style='color:{RED}'" if self.alarm is not None else ""
            text = f"finished after {ev.step} steps ({html.escape(reason)})"
            self.label.value = f"<b>{html.escape(self.title)}</b> <span{style}>{text}</span>"

    def diverged(self, payload: dict) -> None:
        """The run diverged: the view turns red and says what happened and what to change (payload: message, the
        one line; stopped, whether the run stops with its last good weights)."""
        self.alarm = payload
        self.bar.bar_style = "danger"
        self.box.add_class("rlhf-diverged")
        self.box.layout.border = f"2px solid {RED}"
        head = "Stopped: diverged" if payload["stopped"] else "Diverging"
        message = html.escape(str(payload["message"]))
        self.alerts.value += f"<div class='rlhf-alarm' style='color:{RED}'><b>✖ {head}.</b> {message}</div>"

    def draw(self) -> None:
        for ax, (name, keys) in zip(self.axes, self.panels):
            ax.clear()
            for k in keys:
                pts = self.history.get(k)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k, marker="." if len(pts) < 30 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            if any(self.history.get(k) for k in keys):
                ax.legend(fontsize=7)
        self.fig.tight_layout()
        self.plot.update(png_image(self.fig))
        self.last_draw = time.monotonic()

    def histogram(self, payload: dict) -> None:
        """A second, small figure drawn once: the series' histograms overlaid on shared bins."""
        from IPython.display import display

        series = {k: list(v) for k, v in payload["series"].items() if len(v)}
        fig = new_figure(5.0, 2.6)
        ax = fig.subplots()
        if series:
            lo = min(min(v) for v in series.values())
            hi = max(max(v) for v in series.values())
            bins = [lo + (hi - lo) * i / 30 for i in range(31)] if hi > lo else 10
            for name, values in series.items():
                ax.hist(values, bins=bins, alpha=0.55, label=f"{name} (n={len(values)})")
            ax.legend(fontsize=7)
        ax.set_title(payload.get("title", "histogram"), fontsize=9)
        ax.set_xlabel(payload.get("xlabel", ""), fontsize=8)
        ax.tick_params(labelsize=7)
        fig.tight_layout()
        self.hist_plot = display(png_image(fig), display_id=True)
