#!/usr/bin/env bash
# Fails when the committed generated code under clients/python/runledger/v1 differs from what
# scripts/gen_protos.sh produces from proto/. Generates into a temporary copy, so the work tree is
# never touched; fix a failure by running scripts/gen_protos.sh and committing the result.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
GEN=clients/python/runledger/v1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/scripts" "$tmp/$GEN"
cp scripts/gen_protos.sh "$tmp/scripts/"
cp -R proto "$tmp/proto"
cp "$GEN/__init__.py" "$tmp/$GEN/"
if ! PYTHON="$root/.venv/bin/python" bash "$tmp/scripts/gen_protos.sh" >"$tmp/gen.log" 2>&1; then
  cat "$tmp/gen.log" >&2
  echo "check_generated: scripts/gen_protos.sh failed" >&2
  exit 1
fi

if ! diff -r -u -x __pycache__ "$GEN" "$tmp/$GEN"; then
  echo "check_generated: $GEN is stale; run scripts/gen_protos.sh and commit the result" >&2
  exit 1
fi
echo "check_generated: $GEN matches proto/"
