#!/usr/bin/env bash
# Set up, then lint and run the whole test suite (every plugin, both sm RMA modes), compiled and
# pure Python.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
PETASUS_EXPECT_COMPILED=1 .venv/bin/python -m pytest -q "$@"
# Again with every compiled module's pure-Python twin (na/accel.py), as msgpack's CI does.
PETASUS_PUREPYTHON=1 .venv/bin/python -m pytest -q "$@"
