#!/usr/bin/env bash
# Set up, then run the tutorial notebooks headless on the embedded model; executed copies and HTML pages are kept.
#   bash scripts/demo.sh                      # the core path: the whole pipeline in examples/03_ppo.ipynb
#   bash scripts/demo.sh examples/*.ipynb     # the whole tutorial series
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "$#" -eq 0 ]; then set -- examples/03_ppo.ipynb; fi
.venv/bin/python scripts/run_notebooks.py "$@"
echo "Open the executed notebooks (or the .html pages) in examples/executed/."
