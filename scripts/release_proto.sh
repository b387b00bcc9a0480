#!/usr/bin/env bash
# Run at a release of the v1 API: records the released contract as a buf image in
# api/released/runledger-v1.binpb. CI checks every later proto change against it with
# `buf breaking`. Commit the refreshed image together with the release.
#
# The new contract must itself be compatible with the previously released one; pass
# --allow-breaking only for a deliberate, announced break (which really calls for a v2 package).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=${BUF:-.venv/bin/buf}
IMAGE=api/released/runledger-v1.binpb

allow_breaking=0
for arg in "$@"; do
  case "$arg" in
    --allow-breaking) allow_breaking=1 ;;
    *) echo "usage: scripts/release_proto.sh [--allow-breaking]" >&2; exit 2 ;;
  esac
done

"$BUF" lint
if [ -f "$IMAGE" ] && [ "$allow_breaking" = 0 ]; then
  "$BUF" breaking --against "$IMAGE"
fi
mkdir -p "$(dirname "$IMAGE")"
"$BUF" build --exclude-source-info -o "$IMAGE"
echo "release_proto: wrote $IMAGE ($(wc -c <"$IMAGE") bytes); commit it with the release"
