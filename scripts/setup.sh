#!/usr/bin/env bash
# Create .venv and install what the app needs (or, with --dev, what the tests need too).
# torch is installed first and pinned: an unpinned torch pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0
[ "${1:-}" = "--dev" ] && dev=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
if [ "$dev" = 1 ]; then
  python -m pip install -q -r requirements-dev.txt
  # The browser test drives Debian's Chromium (Playwright cannot download its own browser here).
  if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
      echo "note: install Debian's chromium (sudo apt-get install chromium) for the browser test" >&2
    fi
  fi
else
  python -m pip install -q -r requirements.txt
fi
echo "ready: $(python -c 'import torch; print("torch", torch.__version__)')"
