#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine (root, package registries only): the Debian
# packages petasus needs (skipped when present), a virtualenv in .venv, petasus installed
# editable with the extras named in $EXTRAS (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(python3-venv)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
# python3-venv only matters when the interpreter lacks venv (Debian's own python3 does).
if ((${#missing[@]})) && ! python3 -c "import venv, ensurepip" 2>/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"
