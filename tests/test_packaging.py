"""Packaging: the CLI and the Python API run where the `notebook` extra (ipywidgets, anywidget, matplotlib) and
IPython are not installed; the notebook entry points say in one line what to install.

"Not installed" is made real: a child `python -S` gets a copy of this environment's site-packages (symlinks) with
those distributions left out, so `import`, `importlib.util.find_spec` and `importlib.metadata` all miss them.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from importlib import import_module
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from rlhf_magic.errors import NOTEBOOK_EXTRA, MissingExtra, RLHFError

NOTEBOOK = ("ipywidgets", "anywidget", "matplotlib")  # the extra's distributions (each imports as its own name)
ROOT = Path(__file__).resolve().parent.parent


def without(tmp_path: Path, distributions: list[str]) -> Path:
    """site-packages as symlinks, less every top-level file and folder of `distributions` (their dist-info too)."""
    hidden: set[str] = set()
    for name in distributions:
        try:
            files = importlib.metadata.distribution(name).files or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here either
        hidden |= {f.parts[0] for f in files if f.parts and f.parts[0] != ".."}
    shadow = tmp_path / "site-packages"
    shadow.mkdir()
    for folder in {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}:
        for entry in folder.iterdir():
            if entry.name not in hidden and not (shadow / entry.name).exists():
                (shadow / entry.name).symlink_to(entry)
    return shadow


def run_child(tmp_path: Path, shadow: Path, body: str) -> subprocess.CompletedProcess:
    """`body` in `python -S` with only `shadow` as site-packages (its .pth files run, as site would run them)."""
    script = tmp_path / "child.py"
    script.write_text(f"import site\nsite.addsitedir({str(shadow)!r})\n{body}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}  # RLHF_MAGIC_FASTPATH goes along
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["IPYTHONDIR"] = str(tmp_path / "ipython")
    return subprocess.run(
        [sys.executable, "-S", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


CLI_AND_API = """
import importlib.util, json, sys
BLOCKED = ["ipywidgets", "anywidget", "matplotlib", "IPython"]
assert [m for m in BLOCKED if importlib.util.find_spec(m) is not None] == []  # really not installed here
from rlhf_magic.cli import main
rc = main(["sft", "sft.toml", "--name", "cli_sft", "--summary", "summary.json"])
import rlhf_magic
pairs = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."} for i in range(16)]
handle = rlhf_magic.sft("api_sft", model="tiny", data=pairs, max_steps=2, batch_size=4, lora={"r": 4})
print(json.dumps({
    "rc": rc, "api_steps": handle.metrics.summary["steps"], "answer": handle.generate(["What is 1 plus 1?"])[0],
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED + ["gguf"]),
}))
"""


def test_the_cli_and_the_python_api_run_without_the_notebook_extra_and_ipython(tmp_path):
    shadow = without(tmp_path, [*NOTEBOOK, "ipython"])
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"prompt": f"Say {i}.", "response": f"{i}!"}) + "\n" for i in range(16))
    )
    (tmp_path / "sft.toml").write_text(
        'model = "tiny"\ndata = "pairs.jsonl"\nmax_steps = 2\nbatch_size = 4\noutput_dir = "out"\n[lora]\nr = 4\n'
    )
    child = run_child(tmp_path, shadow, CLI_AND_API)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0 and result["api_steps"] == 2 and isinstance(result["answer"], str)
    assert result["loaded"] == []  # nor is gguf imported: the tiny model is no GGUF file
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["steps"] == 2
    assert "rlhf-magic: sft 'cli_sft' done: 2 steps in " in child.stdout
    assert (tmp_path / "out" / "config.json").exists()


NOTEBOOK_ENTRY_POINTS = """
import json
from IPython.core.interactiveshell import InteractiveShell
shell = InteractiveShell.instance()
result = shell.run_cell("%load_ext rlhf_magic")
errors = {}
from rlhf_magic.errors import MissingExtra
from rlhf_magic.widgets.ranking_cards import Cards
from rlhf_magic.widgets.live import new_figure
for name, call in [("cards", lambda: Cards(lambda: None, "t", "me")), ("figure", lambda: new_figure(1, 1))]:
    try:
        call()
    except MissingExtra as e:
        errors[name] = str(e)
print(json.dumps({"loaded": result.success, "sft": "sft" in shell.magics_manager.magics["cell"], "errors": errors}))
"""


def test_notebook_entry_points_without_the_extra_say_what_to_install(tmp_path):
    child = run_child(tmp_path, without(tmp_path, list(NOTEBOOK)), NOTEBOOK_ENTRY_POINTS)
    assert child.returncode == 0, child.stderr[-4000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["loaded"] is False and result["sft"] is False  # nothing registered
    usage = [line for line in child.stderr.splitlines() if line.strip()]
    assert usage == [
        f"UsageError: the notebook views need ipywidgets and matplotlib, not installed here: {NOTEBOOK_EXTRA}"
    ]
    assert result["errors"] == {
        "cards": f"the notebook views need ipywidgets, not installed here: {NOTEBOOK_EXTRA}",
        "figure": f"the notebook views need matplotlib, not installed here: {NOTEBOOK_EXTRA}",
    }


WIDGETS = {  # each notebook entry point, built as far as its first import
    "agreement": ("ipywidgets", lambda: import_module("rlhf_magic.widgets.agreement").AgreementView(None)),
    "sampling": ("ipywidgets", lambda: import_module("rlhf_magic.widgets.ranking_sampling").SamplingView()),
    "live view": ("ipywidgets", lambda: import_module("rlhf_magic.widgets.live").WidgetView("t", [], None)),
    "compare": ("ipywidgets", lambda: import_module("rlhf_magic.widgets.compare").ComparePanel._build(None)),
    "figure": ("matplotlib", lambda: import_module("rlhf_magic.widgets.live").new_figure(1, 1)),
}


@pytest.mark.parametrize("widget", list(WIDGETS))
def test_every_widget_names_the_extra_when_its_package_is_missing(monkeypatch, widget):
    module, build = WIDGETS[widget]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if it were not installed
    if module == "matplotlib":
        monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # imported by earlier tests: cached otherwise
    with pytest.raises(MissingExtra) as err:
        build()
    assert isinstance(err.value, RLHFError) and isinstance(err.value, ImportError)  # one line in a notebook
    assert str(err.value) == f"the notebook views need {module}, not installed here: {NOTEBOOK_EXTRA}"


def test_an_installed_package_that_fails_to_import_keeps_its_own_error(tmp_path, monkeypatch):
    from rlhf_magic.widgets import notebook_module

    (tmp_path / "rlhf_broken_view_pkg.py").write_text("import rlhf_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as err:
        notebook_module("rlhf_broken_view_pkg")  # installed, but its own import fails: that error, not 'install'
    assert not isinstance(err.value, MissingExtra) and err.value.name == "rlhf_no_such_dependency"
    with pytest.raises(MissingExtra, match=r"need rlhf_not_installed_pkg, not installed here: pip install "):
        notebook_module("rlhf_not_installed_pkg.sub")


def test_the_project_declares_tomli_and_the_notebook_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [Requirement(d) for d in project["dependencies"]]
    tomli = [d for d in deps if d.name == "tomli"]
    assert len(tomli) == 1 and str(tomli[0].marker) == 'python_version < "3.11"'
    assert not [d for d in deps if d.name in NOTEBOOK]
    assert sorted(Requirement(d).name for d in project["optional-dependencies"]["notebook"]) == sorted(NOTEBOOK)
