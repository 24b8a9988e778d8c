#!/usr/bin/env bash
# Creates .venv with Python 3.11 and installs cipherpool with its pinned dependencies.
#   bash scripts/bootstrap.sh           the client alone (the base install: no Celery, Redis, FastAPI, ...)
#   bash scripts/bootstrap.sh server    the platform too (scripts/demo.sh)
#   bash scripts/bootstrap.sh test      everything: server, postgres and the test tools (scripts/test.sh, CI)
# Idempotent: skips the install when pyproject.toml has not changed since the last one.
# First run: about 6 GB (torch's CUDA libraries come with concrete-ml) and 2-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${PYTHON:-}" python3.11 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "cipherpool needs Python 3.11 (concrete-ml 1.9.0); set PYTHON=/path/to/python3.11" >&2
  return 1
}

extras="${1:-}"
stamp=".venv/.cipherpool-installed${extras:+-$extras}"
if [ ! -x .venv/bin/python ]; then
  python="$(find_python)"
  if ! "$python" -m venv .venv; then
    rm -rf .venv
    echo "Could not create .venv with $python: on Debian/Ubuntu install python3.11-venv first." >&2
    exit 1
  fi
fi
wanted="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".${extras:+[$extras]}"
  echo "$wanted" > "$stamp"
fi

# The browser tests (Flower's Models page, the gateway's /docs) drive Debian's Chromium. Installed
# here where the test extra is asked for and we may (root, apt); elsewhere those tests skip, saying why.
if [ "$extras" = "test" ] && ! command -v chromedriver >/dev/null 2>&1 &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ||
    echo "Could not install chromium and chromium-driver: the browser tests will skip." >&2
fi
