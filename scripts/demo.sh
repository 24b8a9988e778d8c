#!/usr/bin/env bash
# Sets up .venv and runs `cipherpool demo` on the embedded stack (own Redis, SQLite).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh server   # the demo runs the platform: the server extra
exec .venv/bin/cipherpool demo "$@"
