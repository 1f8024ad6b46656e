"""User-facing errors. The magics turn every `RLHFError` into a one-line `UsageError`.

Engine code raises these (never IPython's `UsageError`), so scripts and the CLI get ordinary exceptions.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class RLHFError(Exception):
    """A mistake in what the user asked for: shown as one line, with no traceback, in a notebook."""


class ConfigError(RLHFError, ValueError):
    """A bad setting: unknown key, wrong type, value out of range."""


class DataError(RLHFError, ValueError):
    """Training data that cannot be used: missing fields, empty, unreadable."""


class ModelError(RLHFError):
    """A model that cannot be found or loaded."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
