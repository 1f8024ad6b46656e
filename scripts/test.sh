#!/usr/bin/env bash
# Set up and run the whole test suite (unit, magics, slow end-to-end, notebooks, real browser), then the fast suite
# and the SFT -> reward -> PPO tutorial again with the CPU fast path off (the plain path a GPU runs). CI runs exactly
# this. With arguments, the given selection runs in both modes instead.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh   # Chromium (apt-get, as root) + jupyterlab/playwright for the real-browser tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check rlhf_magic tests bench scripts
.venv/bin/ruff format --check rlhf_magic tests bench scripts
if [ $# -gt 0 ]; then
  .venv/bin/python -m pytest "$@"
  echo "== the same tests with the fast path off (RLHF_MAGIC_FASTPATH=0)"
  RLHF_MAGIC_FASTPATH=0 .venv/bin/python -m pytest "$@"
else
  .venv/bin/python -m pytest
  echo "== the fast suite with the fast path off (RLHF_MAGIC_FASTPATH=0)"
  RLHF_MAGIC_FASTPATH=0 .venv/bin/python -m pytest -m "not slow and not browser"
  echo "== the SFT -> reward -> PPO tutorial with the fast path off"
  RLHF_MAGIC_FASTPATH=0 .venv/bin/python -m pytest "tests/test_notebooks.py::test_notebook_runs_without_error_cells[03_ppo]"
fi
