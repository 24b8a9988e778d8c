#!/usr/bin/env bash
# Sets up .venv and runs the whole test suite: fast unit tests, then integration tests that
# start their own Redis and `celery worker` processes on free loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test
.venv/bin/ruff check cipherpool tests benchmarks examples
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
