"""The browser test's notebook (%load_ext, fixed answers, a K=4 and a pairwise panel) and screenshot folder."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"  # git-ignored; CI keeps them
PROMPTS = ["What does RLHF stand for?", "Name a primary colour.", "How many legs does a spider have?"]
ANSWERS = [
    [
        "Reinforcement learning from human feedback.",
        "Really Large Hadron Feeder.",
        "It is a way to fine-tune a model with a reward model learned from people's rankings.",
        "No idea.",
    ],
    ["Red.", "Purple, probably.", "Blue is one of them.", "Chartreuse."],
    ["Eight.", "Six.", "Spiders have eight legs.", "Ten, like crabs."],
]
PAIR = [["Paris.", "Lyon."]]


def write_notebook(path: Path, file: str, pair_file: str) -> Path:
    """A notebook whose panels append to `file` (K = 4) and `pair_file` (K = 2), relative to its folder."""
    cells = [
        new_markdown_cell("# Ranking panel: real-browser test"),
        new_code_cell("%load_ext rlhf_magic"),
        new_code_cell(f"prompts = {PROMPTS!r}\nanswers = {ANSWERS!r}\nout_file = {file!r}"),
        new_code_cell('%rank panel prompts=prompts responses=answers k=4 file=out_file labeler="browser"'),
        new_code_cell(
            f"pair_prompts = ['Capital of France?']\npair_answers = {PAIR!r}\n"
            f"%rank pair prompts=pair_prompts responses=pair_answers file={pair_file!r} "
            f'labeler="browser" title="Pairwise"'
        ),
    ]
    meta = {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    }
    nbformat.write(new_notebook(cells=cells, metadata=meta), path)
    return path
