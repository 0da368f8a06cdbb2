#!/usr/bin/env bash
# Set everything up, then run the main job on the default model: the OpenAI-compatible server
# on http://127.0.0.1:8000 (Ctrl-C or SIGTERM drains and stops it).
# Extra arguments go to `metroline serve` (e.g. --port 9000 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh >&2
exec "${METROLINE_VENV:-.venv}/bin/metroline" serve "$@"
