#!/usr/bin/env bash
# Run the test suite. Points tiktoken and the data-hungry tests at ../shared when it is there (as in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d ../shared ]; then
  export TIKTOKEN_CACHE_DIR="${TIKTOKEN_CACHE_DIR:-$(cd ../shared/tiktoken_cache && pwd)}"
  export STORYFORGE_DATA_DIR="${STORYFORGE_DATA_DIR:-$(cd ../shared/data/tinystories && pwd)}"
fi
export STORYFORGE_CACHE_DIR="${STORYFORGE_CACHE_DIR:-$PWD/.cache/storyforge}"
exec .venv/bin/python -m pytest "$@"
