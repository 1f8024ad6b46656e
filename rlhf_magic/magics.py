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
from .config import PANELS, STAGES, describe
from .errors import ConfigError, RLHFError
from .parsing import parse_cell, parse_line_args, parse_name
from .session import Session

SESSION_VAR = "rlhf"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the package's user errors into IPython's one-line UsageError."""
    try:
        yield
    except RLHFError as e:
        raise UsageError(str(e)) from None


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
    """%%sft, %%reward, %%ppo, %rank, %compare and %rlhf over one session."""

    def __init__(self, shell: Any):
        super().__init__(shell)
        self.session = Session()

    def _ns(self) -> dict[str, Any]:
        return self.shell.user_ns

    def _publish(self, handle: Any) -> Any:
        """The api already registered the handle in the session; also bind it in the notebook."""
        self._ns()[handle.name] = handle
        return handle

    @no_var_expand
    @cell_magic
    def sft(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors():
            name, cfg = parse_cell("sft", line, cell, self._ns())
            handle = api.sft(name, config=cfg, session=self.session)
        return self._publish(handle)

    @no_var_expand
    @cell_magic
    def reward(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors():
            name, cfg = parse_cell("reward", line, cell, self._ns())
            handle = api.reward(name, config=cfg, session=self.session)
        return self._publish(handle)

    @no_var_expand
    @cell_magic
    def ppo(self, line: str, cell: str) -> Any:
        from . import api

        with user_errors():
            name, cfg = parse_cell("ppo", line, cell, self._ns())
            handle = api.ppo(name, config=cfg, session=self.session)
        return self._publish(handle)

    @no_var_expand
    @line_magic
    def rank(self, line: str) -> Any:
        from .widgets.ranking import RankingPanel

        with user_errors():
            name, options = self._line("rank", line)
            panel = RankingPanel(**options, session=self.session)
        self._ns()[name] = panel
        return panel

    @no_var_expand
    @line_magic
    def compare(self, line: str) -> Any:
        from .widgets.compare import ComparePanel

        with user_errors():
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
        return parse_name(pos[0], magic), options

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
    magics = RLHFMagics(ipython)
    ipython.register_magics(magics)
    ipython.user_ns[SESSION_VAR] = magics.session
    ipython._rlhf_magics = magics
    print(f"rlhf-magic {__version__} · device: {guess_device()} · %%sft, %%reward, %%ppo, %rank, %compare, %rlhf")


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
    del ipython._rlhf_magics
