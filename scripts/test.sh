#!/usr/bin/env bash
# The test command, and what CI runs: installs what is missing (venv, dev tools, PostgreSQL
# binaries), then checks generated code, the proto contract and lint, and runs the whole test suite
# (unit, integration, PostgreSQL, S3-wire and slow fault tests). Every check runs even when an
# earlier one fails; the summary at the end names the failures and sets the exit status.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/bootstrap.sh --postgres
export PATH="$PWD/.venv/bin:$PATH"

failed=()
check() {
  local name=$1
  shift
  printf '\n==> %s\n' "$name"
  "$@" || failed+=("$name")
}

run_pytest() {
  # The PostgreSQL fixture fails instead of skipping when binaries are missing; `-m ""` overrides
  # any marker selection a developer may have put in addopts, so nothing is deselected here.
  local rc=0
  RUNLEDGER_REQUIRE_POSTGRES=1 pytest tests -m "" --durations=15 || rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; the suite must never be empty" >&2
  fi
  return "$rc"
}

check "generated code is up to date with proto/" scripts/check_generated.sh
check "buf lint" buf lint
check "buf breaking against the released v1 contract" buf breaking --against api/released/runledger-v1.binpb
check "ruff" ruff check .
check "ruff format" ruff format --check .
check "mypy" mypy
check "pytest: the whole tests/ tree, slow tests included" run_pytest

echo
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all checks passed"
