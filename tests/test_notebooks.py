"""Every example notebook runs top to bottom headless (nbclient), with live views updated in place."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BOOKS = sorted((ROOT / "examples").glob("[0-9]*.ipynb"))
sys.path.insert(0, str(ROOT / "scripts"))

pytestmark = pytest.mark.slow

# Claims a tutorial makes, checked on the run itself (appended as extra cells before execution).
CHECKS = {
    "03_ppo": [
        "_check = rlhf_magic.compare(sft, ppo, held_out, reward=rm, max_new_tokens=ANSWER_TOKENS, seed=1).mean_scores",
        "print('held-out reward-model score:', _check)\nassert _check['ppo'] > _check['sft'], _check",
    ],
    "04_kl_leash": [
        "assert final['kl_coef = 0'][0] > final['kl_coef = 1'][0], final  # no leash: furthest from SFT",
        "assert final['kl_coef = 0'][1] > final['kl_coef = 1'][1], final  # and the most score",
        "assert unfinished['kl_coef = 0'] > unfinished['sft'], unfinished  # hacked answers stop mid-sentence",
    ],
    "05_whose_preferences": [  # the two reward models order the same two answers oppositely
        "_a, _b = (rm.score([probe_q] * 2, probe) for rm in (rm_alice, rm_bob))\n"
        "assert _a[0] > _a[1] and _b[1] > _b[0], (_a, _b)",
        "assert lengths['ppo_bob'] > lengths['ppo_alice'], lengths  # Bob's policy writes longer answers than Alice's",
    ],
}


@pytest.mark.parametrize("book", BOOKS, ids=[b.stem for b in BOOKS])
def test_notebook_runs_without_error_cells(book, tmp_path, monkeypatch):
    import nbformat
    from run_notebooks import run

    monkeypatch.setenv("RLHF_MAGIC_HEADLESS", "1")
    # Run a copy in a scratch folder, so files the tutorial writes (prefs.jsonl, runs/) never land in examples/.
    nb = nbformat.read(book, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell(code) for code in CHECKS.get(book.stem, [])]
    source = tmp_path / "src" / book.name
    source.parent.mkdir()
    nbformat.write(nb, source)
    t0 = time.perf_counter()
    run(source, tmp_path, timeout=900)
    minutes = (time.perf_counter() - t0) / 60
    executed = nbformat.read(tmp_path / book.name, as_version=4)
    errors = [
        o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
    ]
    assert not errors, errors[0].get("evalue")
    assert minutes < 10, f"{book.name} took {minutes:.1f} min"
    for cell in executed.cells:
        if cell.cell_type == "code" and cell.source.lstrip().startswith(("%%sft", "%%reward", "%%ppo")):
            images = [o for o in cell.outputs if "image/png" in o.get("data", {})]
            assert 1 <= len(images) <= 2, f"live plot not updated in place in {book.name}: {len(images)} images"
