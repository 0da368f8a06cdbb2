#!/usr/bin/env bash
# The long reliability run (issue 16): set up with the test dependencies, then a soak of
# `metroline serve` on the default model (streams, aborts, chat, structured outputs, agent
# runs and bad inputs of every kind, several minutes), a restart on the same port with step /
# kernel / detokenizer faults armed, and the figures: benchmarks/results/reliability.{json,png}.
# The extremes, fault, regression, short soak and parser property tests run first.
# Arguments go to benchmarks/reliability.py (e.g. --duration 600).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PY="${METROLINE_VENV:-.venv}/bin/python"
"$PY" -m pytest -q tests/server/test_extremes.py tests/server/test_faults.py tests/server/test_regressions.py \
    tests/server/test_soak.py tests/unit/test_parser_properties.py
exec "$PY" benchmarks/reliability.py "$@"
