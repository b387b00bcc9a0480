#!/usr/bin/env bash
# The main command: installs what is missing, then starts a runledger server on embedded defaults
# (SQLite + a local artifact directory in a fresh temporary data dir) and runs a simulated
# post-training sweep against it. Extra arguments go to `runledger demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/runledger demo "$@"
