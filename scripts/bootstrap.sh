#!/usr/bin/env bash
# Installs what runledger needs on a fresh machine: the project venv (.venv) with runledger and its
# dev tools, and with --postgres also the PostgreSQL server binaries (apt) that the tests start.
# Safe to rerun: the pip step is skipped while pyproject.toml is unchanged since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

want_postgres=0
for arg in "$@"; do
  case "$arg" in
    --postgres) want_postgres=1 ;;
    *) echo "usage: scripts/bootstrap.sh [--postgres]" >&2; exit 2 ;;
  esac
done

apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
      sudo=(sudo -n)
    else
      echo "bootstrap: need root (or sudo) to install: $*" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "bootstrap: no apt-get on this machine; install these yourself: $*" >&2
    return 1
  fi
  echo "bootstrap: apt-get install $*"
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pg_bin_dir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"
    return 0
  fi
  return 1
}

# 1. The venv.
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv
  fi
  echo "bootstrap: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# 2. runledger (editable) and the dev tools, unless already installed from this pyproject.toml and C source.
# The install compiles log_metrics' fast path (clients/python/runledger/_rowbuffer.c), which needs a C compiler
# and the Python headers; without them runledger installs as pure Python (slower), with a warning here, and the
# test suite fails on it.
if ! command -v cc >/dev/null 2>&1; then
  apt_install gcc || true
fi
if [ ! -f "$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')/Python.h" ]; then
  apt_install python3-dev || true
fi
stamp=.venv/.runledger-installed
want=$(cat pyproject.toml clients/python/runledger/_rowbuffer.c | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "bootstrap: pip install -e '.[dev]'"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
  if .venv/bin/python -c 'import runledger._rowbuffer' 2>/dev/null; then
    echo "$want" >"$stamp"
  else  # no stamp: the next run tries the build again
    echo "bootstrap: WARNING: the C fast path of log_metrics was not built (no C compiler or Python headers);" \
      "runledger runs as pure Python" >&2
  fi
fi

# 3. PostgreSQL server binaries (the tests start their own throwaway cluster; nothing runs here).
if [ "$want_postgres" = 1 ] && ! pg_bin_dir >/dev/null; then
  apt_install postgresql
  pg_bin_dir >/dev/null || { echo "bootstrap: postgresql installed but initdb/pg_ctl not found" >&2; exit 1; }
fi
if [ "$want_postgres" = 1 ]; then
  echo "bootstrap: PostgreSQL binaries in $(pg_bin_dir)"
fi
