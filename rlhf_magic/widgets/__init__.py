"""Notebook views: live training metrics, the ranking panel, the compare panel (with text fallbacks).

ipywidgets, matplotlib and anywidget come with the `notebook` extra (`pip install "rlhf-magic[notebook]"`); they are
imported only when a view is built, so the CLI and the Python API run without them.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ..errors import NOTEBOOK_EXTRA, MissingExtra

NOTEBOOK_PACKAGES = ("ipywidgets", "matplotlib")  # what every notebook view needs; anywidget is optional


def notebook_module(name: str) -> ModuleType:
    """`import name` for a notebook view; when its package is not installed, a one-line MissingExtra naming the
    extra. An installed package that fails to import raises its own error."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        top = name.partition(".")[0]
        if (e.name or "").partition(".")[0] != top:
            raise
        raise MissingExtra(f"the notebook views need {top}, not installed here: {NOTEBOOK_EXTRA}") from None


def require_notebook() -> None:
    """Raises MissingExtra when a package every notebook view needs is not installed (checked by %load_ext)."""
    missing = [name for name in NOTEBOOK_PACKAGES if importlib.util.find_spec(name) is None]  # found, not imported
    if missing:
        raise MissingExtra(f"the notebook views need {' and '.join(missing)}, not installed here: {NOTEBOOK_EXTRA}")
