"""Execute example notebooks headless (nbclient) and keep the executed copies and HTML pages.

    python scripts/run_notebooks.py [examples/01_sft.ipynb ...] [--out examples/executed] [--timeout 900] [--seed 1]

Fails (exit 1) on the first error cell. Prints where the outputs are and how long each notebook took. `--seed` sets
RLHF_MAGIC_TUTORIAL_SEED, which every tutorial reads in its settings cell (default 0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(path: Path, out_dir: Path, timeout: int, cwd: Path | None = None) -> float:
    import nbformat
    from nbclient import NotebookClient

    book = nbformat.read(path, as_version=4)
    client = NotebookClient(
        book,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd or path.parent)}},
        store_widget_state=True,
    )
    t0 = time.perf_counter()
    try:
        client.execute()
    finally:
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(book, out_dir / path.name)
        _html(book, out_dir / path.with_suffix(".html").name)
    return time.perf_counter() - t0


def _html(book, target: Path) -> None:
    try:
        from nbconvert import HTMLExporter
    except ImportError:
        return
    body, _ = HTMLExporter().from_notebook_node(book)
    target.write_text(body, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("notebooks", nargs="*", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "examples" / "executed")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    ap.add_argument("--seed", type=int, default=None, help="RLHF_MAGIC_TUTORIAL_SEED for the tutorials (default: 0)")
    args = ap.parse_args()
    books = args.notebooks or sorted((ROOT / "examples").glob("[0-9]*.ipynb"))
    if args.seed is not None:
        os.environ["RLHF_MAGIC_TUTORIAL_SEED"] = str(args.seed)
    os.environ.setdefault("RLHF_MAGIC_HEADLESS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nbclient.exceptions import CellExecutionError

    for book in books:
        print(f"running {book} ...", flush=True)
        try:
            seconds = run(book.resolve(), args.out.resolve(), args.timeout)
        except CellExecutionError as e:
            print(f"FAILED {book}: {str(e).splitlines()[-1] if str(e) else e}", file=sys.stderr)
            print(f"the partly executed notebook is in {args.out / book.name}", file=sys.stderr)
            return 1
        print(f"  ok in {seconds:.0f} s -> {args.out / book.name} and {(args.out / book.name).with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
