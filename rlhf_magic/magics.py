"""The IPython magics: thin layers that parse cell text and call `rlhf_magic.api`.

Every `RLHFError` (bad setting, bad data, missing model) becomes a one-line `UsageError` with no traceback,
and the session is changed only when a stage returns a result.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class, no_var_expand

from ._version import __version__
from .config import PANELS, STAGES
from .errors import ConfigError, RLHFError
from .parsing import parse_cell, parse_line_args, parse_name
from .session import Session
from .validation import describe

SESSION_VAR = "rlhf"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the package's user errors into IPython's one-line UsageError. One caused by another exception (a
    reward function that raised) keeps it for `%tb` (see `keep_traceback`)."""
    try:
        yield
    except RLHFError as e:
        usage = UsageError(str(e))
        usage.rlhf_error = e if e.__cause__ is not None else None  # type: ignore[attr-defined]
        raise usage from None


def models_free() -> contextlib.AbstractContextManager[None]:
    """Around a cell that trains or samples: a ranking panel sampling in the background finishes its batch first
    (one line says so), then waits for this cell."""
    from .widgets.ranking_sampler import model_turn

    return model_turn()


def keep_traceback(result: Any) -> None:
    """post_run_cell: IPython's `%tb` shows sys.last_value, which a failed magic leaves as the one-line UsageError;
    where that stands for another exception, point it there, so `%tb` shows the whole chain down to the frame of
    the user's function that raised."""
    error = getattr(getattr(result, "error_in_exec", None), "rlhf_error", None)
    if error is None:
        return
    sys.last_type, sys.last_value, sys.last_traceback = type(error), error, error.__traceback__
    if sys.version_info >= (3, 12):
        sys.last_exc = error


def guess_device() -> str:
    """The device torch will pick, guessed without importing torch (keeps %load_ext fast)."""
    if os.environ.get("RLHF_MAGIC_DEVICE"):
        return os.environ["RLHF_MAGIC_DEVICE"]
    if os.path.exists("/proc/driver/nvidia/gpus") or shutil.which("nvidia-smi"):
        return "cuda"
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mps"
    return "cpu"


@magics_class
class RLHFMagics(Magics):
    """%%sft, %%reward, %%dpo, %%ppo, %%grpo, %rank, %compare and %rlhf over one session."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.session = Session()

    def _ns(self) -> dict[str, Any]:
        return self.shell.user_ns

    def _publish(self, handle: Any, note: str) -> Any:
        """The api already registered the handle in the session; also bind it in the notebook."""
        self._ns()[handle.name] = handle
        if note:
            print(note)
        return handle

    def _stage(self, stage: str, line: str, cell: str) -> tuple[str, Any, str]:
        """(NAME, config, the line to print once bound): a NAME that may not be used is refused before any work."""
        name, cfg = parse_cell(stage, line, cell, self._ns())
        verb = "continues" if getattr(cfg, "resume", False) else "replaces"
        kind = "reward model" if stage == "reward" else "policy"
        return name, cfg, self.session.check_name(name, self._ns(), kind, f"%%{stage}", verb)

    @no_var_expand
    @cell_magic
    def sft(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors(), models_free():
            name, cfg, note = self._stage("sft", line, cell)
            handle = api.sft(name, config=cfg, session=self.session)
        return self._publish(handle, note)

    @no_var_expand
    @cell_magic
    def reward(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors(), models_free():
            name, cfg, note = self._stage("reward", line, cell)
            handle = api.reward(name, config=cfg, session=self.session)
        return self._publish(handle, note)

    @no_var_expand
    @cell_magic
    def dpo(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors(), models_free():
            name, cfg, note = self._stage("dpo", line, cell)
            handle = api.dpo(name, config=cfg, session=self.session)
        return self._publish(handle, note)

    @no_var_expand
    @cell_magic
    def ppo(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors(), models_free():
            name, cfg, note = self._stage("ppo", line, cell)
            handle = api.ppo(name, config=cfg, session=self.session)
        return self._publish(handle, note)

    @no_var_expand
    @cell_magic
    def grpo(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors(), models_free():
            name, cfg, note = self._stage("grpo", line, cell)
            handle = api.grpo(name, config=cfg, session=self.session)
        return self._publish(handle, note)

    @no_var_expand
    @line_magic
    def rank(self, line: str) -> Any:
        from .widgets.ranking import RankingPanel

        with user_errors():
            name, options = self._line("rank", line)
            note = self.session.check_name(name, self._ns(), "ranking panel", "%rank")
            panel = RankingPanel(**options, session=self.session)
        old = self._ns().get(name)
        if isinstance(old, RankingPanel) and old is not panel:
            old.close()  # the cell ran again: the earlier panel's sampling thread ends
        self._ns()[name] = panel
        if note:
            print(note)
        return panel

    @no_var_expand
    @line_magic
    def compare(self, line: str) -> Any:
        from .widgets.compare import ComparePanel

        with user_errors(), models_free():
            pos, options = parse_line_args(line, self._ns(), "compare")
            if len(pos) != 2:
                raise ConfigError("%compare needs two policies: %compare A B prompts=... [reward=...]")
            a, b = (self._resolve(p) for p in pos)
            panel = ComparePanel(a, b, **options, session=self.session)
        return panel

    def _line(self, magic: str, line: str) -> tuple[str, dict[str, Any]]:
        pos, options = parse_line_args(line, self._ns(), magic)
        if len(pos) != 1:
            raise ConfigError(f"%{magic} needs exactly one result name first, e.g. %{magic} prefs key=value ...")
        try:
            return parse_name(pos[0], magic), options
        except ConfigError as e:  # parse_name words its errors for the cell magics' `%%`
            raise ConfigError(str(e).replace(f"%%{magic}", f"%{magic}")) from None

    def _resolve(self, name: str) -> Any:
        """A handle by notebook variable or session name."""
        if name in self._ns():
            return self._ns()[name]
        return self.session[name]

    @no_var_expand
    @line_magic
    def rlhf(self, line: str = "") -> Any:
        """List this session's results (names, stages, parents, key metrics)."""
        return self.session


for _stage, _cls in STAGES.items():
    _fn = getattr(RLHFMagics, _stage, None)
    if _fn is not None:
        _fn.__doc__ = f"%%{_stage} NAME  -- {_cls.__doc__}\n\nSettings (one `key = value` per line):\n{describe(_cls)}"

# `%rank?` and `%compare?` show these: the usage line, then every RankConfig / CompareConfig field.
LINE_USAGE = {
    "rank": '%rank NAME prompts=my_prompts policy=sft [k=4 file="prefs.jsonl" ties=True labeler="ann" ...]',
    "compare": "%compare A B prompts=my_prompts [reward=rm blind=True n=20 ...]",
}
for _magic, _cls in PANELS.items():
    getattr(RLHFMagics, _magic).__doc__ = (
        f"{LINE_USAGE[_magic]}\n\n{_cls.__doc__}\n\n"
        f"Settings (`key=value` on the line; a value is a literal or a notebook variable):\n{describe(_cls)}"
    )


def load(ipython: Any) -> None:
    from .widgets import require_notebook

    with user_errors():
        require_notebook()  # ipywidgets and matplotlib (the `notebook` extra): one line naming it when missing
    magics = RLHFMagics(ipython)
    ipython.register_magics(magics)
    ipython.user_ns[SESSION_VAR] = magics.session
    ipython._rlhf_magics = magics
    ipython.events.register("post_run_cell", keep_traceback)
    stages = "%%sft, %%reward, %%dpo, %%ppo, %%grpo"
    print(f"rlhf-magic {__version__} · device: {guess_device()} · {stages}, %rank, %compare, %rlhf")


def unload(ipython: Any) -> None:
    magics = getattr(ipython, "_rlhf_magics", None)
    if magics is None:
        return
    for kind in ("line", "cell"):
        table = ipython.magics_manager.magics[kind]
        for name in [n for n, f in table.items() if getattr(f, "__self__", None) is magics]:
            del table[name]
    ipython.magics_manager.registry.pop(type(magics).__name__, None)
    if ipython.user_ns.get(SESSION_VAR) is magics.session:
        del ipython.user_ns[SESSION_VAR]
    magics.session.close()
    with contextlib.suppress(ValueError):
        ipython.events.unregister("post_run_cell", keep_traceback)
    del ipython._rlhf_magics
