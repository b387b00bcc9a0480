#!/usr/bin/env bash
# Regenerates every generated file from proto/ (Python stubs + mypy-protobuf .pyi).
# CI reruns this and fails when the committed files differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=clients/python
rm -f "$OUT"/runledger/v1/*_pb2.py "$OUT"/runledger/v1/*_pb2.pyi "$OUT"/runledger/v1/*_pb2_grpc.py "$OUT"/runledger/v1/*_pb2_grpc.pyi
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  proto/runledger/v1/*.proto
echo "generated: $(ls "$OUT"/runledger/v1/*_pb2*.py* | wc -l) files under $OUT/runledger/v1"
