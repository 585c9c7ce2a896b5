#!/usr/bin/env bash
# Regenerate the Python stubs next to this script from hyla/v1/hyla.proto (needs grpcio-tools).
# The stubs are checked in; run this after editing the .proto.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python -m grpc_tools.protoc -I "$here" --python_out="$tmp" --pyi_out="$tmp" --grpc_python_out="$tmp" \
    "$here/hyla/v1/hyla.proto"
for f in hyla_pb2.py hyla_pb2.pyi hyla_pb2_grpc.py; do
    # protoc names the import after the proto path (hyla.v1); the stubs live in hyla.serve.proto.
    sed 's/^from hyla\.v1 import hyla_pb2/from hyla.serve.proto import hyla_pb2/' "$tmp/hyla/v1/$f" > "$here/$f"
done
