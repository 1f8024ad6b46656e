"""User-facing errors. The magics turn every `RLHFError` into a one-line `UsageError`.

Engine code raises these (never IPython's `UsageError`), so scripts and the CLI get ordinary exceptions.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sysconfig
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

NEED_LABELS = "rank the answers above first"  # what every cell that needs labels says when there are none yet


class RLHFError(Exception):
    """A mistake in what the user asked for: shown as one line, with no traceback, in a notebook."""


class ConfigError(RLHFError, ValueError):
    """A bad setting: unknown key, wrong type, value out of range."""


class DataError(RLHFError, ValueError):
    """Training data that cannot be used: missing fields, empty, unreadable."""


class ModelError(RLHFError):
    """A model that cannot be found or loaded."""


class UserFunctionError(RLHFError):
    """A function the user passed (a reward callable) raised. The message is one line; `__cause__` is the user's
    own exception, so its full traceback is one `%tb` away in a notebook."""


class MissingExtra(RLHFError, ImportError):
    """A package that only the notebook views need (ipywidgets, matplotlib, anywidget) is not installed."""


NOTEBOOK_EXTRA = 'pip install "rlhf-magic[notebook]"'  # what a MissingExtra tells the user to run


class LabelWriteError(DataError):
    """A ranking could not be written (a read-only or removed folder, a full disk); nothing on disk changed."""


@contextlib.contextmanager
def calling(role: str, fn: Any) -> Iterator[None]:
    """Run the user's `fn` (`role` says what it is for, e.g. 'reward'): an exception it raises becomes one line,
    'reward brevity() raised ZeroDivisionError at line 3: division by zero', chained to the original."""
    try:
        yield
    except RLHFError:
        raise
    except Exception as e:
        raise user_function_error(role, fn, e) from e


def user_function_error(role: str, fn: Any, exc: BaseException) -> UserFunctionError:
    line = raised_at(fn, exc)
    text = str(exc).strip().splitlines()
    where = f" at line {line}" if line is not None else ""
    return UserFunctionError(
        f"{role} {function_name(fn)}() raised {type(exc).__name__}{where}" + (f": {text[0]}" if text else "")
    )


def function_name(fn: Any) -> str:
    """'brevity', 'Scorer.score' (a bound method), 'rm.score' (a method of an object with a name)."""
    fn = getattr(fn, "func", fn)  # functools.partial
    owner = getattr(fn, "__self__", None)
    name = getattr(fn, "__name__", None) or type(fn).__name__
    if owner is None or isinstance(owner, type(contextlib)):  # a plain function (or one of a module)
        return name
    label = getattr(owner, "name", None)
    return f"{label if isinstance(label, str) else type(owner).__name__}.{name}"


def raised_at(fn: Any, exc: BaseException) -> int | None:
    """The line in `fn` where `exc` was raised (its last frame in the traceback), else the innermost line of
    user code (not this package, the standard library or an installed package), else None."""
    codes = set()
    for obj in (fn, getattr(fn, "func", None), getattr(fn, "__func__", None), vars(type(fn)).get("__call__")):
        obj = getattr(obj, "__func__", obj)
        code = getattr(obj, "__code__", None)
        if code is not None:
            codes.add(code)
    frames = list(traceback.walk_tb(exc.__traceback__))
    own = [line for frame, line in frames if frame.f_code in codes]
    user = [line for frame, line in frames if _user_file(frame.f_code.co_filename)]
    return (own or user or [None])[-1]


_LIBRARY = tuple(  # folders whose code is not the user's: the standard library, installed packages, this package
    {str(Path(sysconfig.get_paths()[key]).resolve()) + os.sep for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    | {str(Path(__file__).resolve().parent) + os.sep}
)


def _user_file(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return False
    try:
        path = str(Path(filename).resolve())
    except (OSError, ValueError):
        return True
    return not path.startswith(_LIBRARY)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
