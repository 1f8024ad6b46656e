#!/usr/bin/env bash
# Install what the real-browser tests need (tests/browser/, marker `browser`). Idempotent.
#   - Debian's Chromium and fonts-liberation through apt-get, when missing and running as root;
#   - jupyterlab, notebook and playwright into .venv (the Playwright driver ships in the wheel).
# Never runs `playwright install`: the tests drive /usr/bin/chromium through executable_path.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "install_browser: .venv is missing; run scripts/setup.sh first" >&2
  exit 1
fi

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -d /usr/share/fonts/truetype/liberation ] || missing+=(fonts-liberation)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_browser: chromium and fonts-liberation already installed"
elif [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
  echo "install_browser: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "install_browser: skipped ${missing[*]} (needs root and apt-get); the browser tests will skip" >&2
fi

if .venv/bin/python -c 'import jupyterlab, notebook, playwright' 2>/dev/null; then
  echo "install_browser: jupyterlab, notebook and playwright already in .venv"
else
  .venv/bin/python -m pip --disable-pip-version-check -q install \
    "jupyterlab>=4,<5" "notebook>=7,<8" "playwright>=1.45,<2"
fi
.venv/bin/python - <<'EOF'
import importlib.metadata as md
import subprocess

versions = {p: md.version(p) for p in ("jupyterlab", "notebook", "playwright", "ipywidgets")}
try:
    chromium = subprocess.run(["/usr/bin/chromium", "--version"], capture_output=True, text=True).stdout.strip()
except OSError:
    chromium = "not installed"
print("install_browser:", ", ".join(f"{k} {v}" for k, v in versions.items()), "|", chromium)
EOF
