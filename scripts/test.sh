#!/usr/bin/env bash
# Set everything up with the test dependencies, then run the whole test suite.
# Extra arguments go to pytest (e.g. -m "not slow", -k scheduler).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
exec "${METROLINE_VENV:-.venv}/bin/python" -m pytest "$@"
