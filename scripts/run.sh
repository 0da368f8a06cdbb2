#!/usr/bin/env bash
# Set everything up, then run the main job on the default model: an interactive chat.
# Extra arguments go to `metroline chat` (e.g. --max-tokens 128).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec "${METROLINE_VENV:-.venv}/bin/metroline" chat "$@"
