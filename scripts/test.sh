#!/usr/bin/env bash
# Set up and run the whole test suite (unit, magics, slow end-to-end, notebooks, real browser). CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh   # Chromium (apt-get, as root) + jupyterlab/playwright for the real-browser tests
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check rlhf_magic tests bench scripts
.venv/bin/ruff format --check rlhf_magic tests bench scripts
.venv/bin/python -m pytest "$@"
