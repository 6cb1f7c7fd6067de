#!/usr/bin/env bash
# One entry point that sets up everything on a fresh machine, then runs a job.
#   ./run.sh demo    the toy convergence study, quick (5 seeds; --full: the published 20 seeds into experiments/results/toy)
#   ./run.sh test    the whole test suite
#   ./run.sh setup   only create .venv and install
# GPU machines: set TORCH_SPEC to the torch you want (e.g. TORCH_SPEC=torch), or TORCH_SPEC=skip
# when torch (and its triton) is already installed in the interpreter named by PYTHON.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}   # the CPU build on this project's machines
# Triton for the GPU kernel's tests in Triton's CPU interpreter (the version torch 2.11's CUDA build ships with)
TRITON_SPEC=${TRITON_SPEC:-triton==3.6.0}
VENV=${VENV:-.venv}

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local stamp="$VENV/.installed-$(cat pyproject.toml run.sh | sha1sum | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    if [ "$TORCH_SPEC" != "skip" ]; then "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"; fi
    if [ "$TORCH_SPEC" != "skip" ] && [ "$TRITON_SPEC" != "skip" ] && [ "$(uname -sm)" = "Linux x86_64" ]; then
      "$VENV/bin/python" -m pip install -q "$TRITON_SPEC"
    fi
    "$VENV/bin/python" -m pip install -q -e ".[test,llm]"
    touch "$stamp"
  fi
}

job=${1:-demo}
shift || true
case "$job" in
  setup) setup ;;
  demo)  setup; exec "$VENV/bin/python" -m experiments.toy_study "$@" ;;
  test)  setup; exec "$VENV/bin/python" -m pytest "$@" ;;
  *) echo "usage: ./run.sh demo|test|setup [args]" >&2; exit 2 ;;
esac
