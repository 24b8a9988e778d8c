#!/usr/bin/env bash
# Sets up .venv, runs the gate (lint, types), then the tests. Tiers and markers: tests/conftest.py.
#
#   bash scripts/test.sh          everything, as CI runs it (.ci/run): the gate; the unit and
#                                 security tiers, PostgreSQL variants included, on 3 processes
#                                 (-m "not integration"); then the integration tier on 2 processes
#                                 (each file starts a whole stack of its own). Unit tests come
#                                 first, so a broken one is reported before anything slow runs.
#   bash scripts/test.sh --fast   during development: the gate, then the unit and security tests
#                                 on SQLite only (-m "not integration and not postgres"), on 3
#                                 processes. Extra arguments go to pytest (a file, -k, -x).
#   bash scripts/test.sh ARGS     the gate, then `pytest ARGS` in one process, as given.
#
# CIPHERPOOL_TEST_WORKERS sets the processes of the parallel part (default 3, on 2 cores too: the
# tests wait on child processes, sockets and the disk a good part of the time; 0 runs it in one).
# The PostgreSQL variants use the server on 127.0.0.1:5432 (CIPHERPOOL_TEST_POSTGRES for
# another) and skip where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh test

# -- the gate: one check a line ----------------------------------------------------------------
.venv/bin/ruff check cipherpool tests benchmarks examples          # lint and import order
.venv/bin/ruff format --check cipherpool tests benchmarks examples # formatting
.venv/bin/mypy

# -- the tests ---------------------------------------------------------------------------------
pytest=(.venv/bin/python -m pytest)
workers="${CIPHERPOOL_TEST_WORKERS:-3}"
parallel=()
if [ "$workers" != 0 ]; then
  parallel=(-n "$workers" --dist loadfile)  # a file's tests stay in one process, in order
fi

if [ "${1:-}" = "--fast" ]; then
  shift
  exec "${pytest[@]}" "${parallel[@]}" -m "not integration and not postgres" "$@"
fi
if [ $# -gt 0 ]; then
  exec "${pytest[@]}" "$@"
fi
status=0
"${pytest[@]}" "${parallel[@]}" -m "not integration" || status=$?
# The integration tier on two processes (CIPHERPOOL_TEST_INTEGRATION_WORKERS; 0: one): its tests
# mostly wait on processes they started, each file on a stack of its own, so two files side by
# side take about the time of the longer; the longest files start first (tests/conftest.py).
iworkers="${CIPHERPOOL_TEST_INTEGRATION_WORKERS:-2}"
iparallel=()
if [ "$iworkers" != 0 ]; then
  iparallel=(-n "$iworkers" --dist loadfile)
fi
"${pytest[@]}" "${iparallel[@]}" -m integration || status=$((status ? status : $?))
exit "$status"
