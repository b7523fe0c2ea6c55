#!/usr/bin/env bash
# Idempotent set-up on a fresh Debian 12 machine (root, package registries only): the Debian
# packages petasus needs (skipped when present), a virtualenv in .venv, petasus installed
# editable with the extras named in $EXTRAS (default: test).
set -euo pipefail
cd "$(dirname "$0")/.."

# libfabric-dev: headers and library of the ofi plugin (setup.py compiles it when present).
# python3-pyverbs: rdma-core's Python binding (44 on Debian 12), for the verbs plugin.
debs=(libfabric-dev python3-pyverbs)
# redis-server: the peer bench/store.py measures the store against (bench extras only).
if [[ "${EXTRAS:-test}" == *bench* ]]; then debs+=(redis-server); fi
# python3-venv only matters when the interpreter lacks venv (Debian's own python3 does).
python3 -c "import venv, ensurepip" 2>/dev/null || debs+=(python3-venv)
missing=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
# Reinstall only when the packaging files, the ofi extension's sources or the extras change
# (an editable install follows the Python sources by itself), or when the extension is missing.
stamp=".venv/.petasus-$(cat setup.py pyproject.toml na/ofi/_cdefs.h na/ofi/_glue.c \
    na/ofi/_build.py | sha256sum | cut -c1-16)-${EXTRAS:-test}"
sources=$(find na hg bulk -maxdepth 1 \( -name "*.py" -o -name "*.pxd" \) | sort | xargs cat |
    sha256sum | cut -c1-16)
built() { [ ! -e /usr/include/rdma/fabric.h ] || compgen -G "na/ofi/_fabric*.so" >/dev/null; }
if [ ! -e "$stamp" ] || ! built; then
    log=$(mktemp)
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           env -u PETASUS_PUREPYTHON .venv/bin/python -m pip install -q -e ".[${EXTRAS:-test}]"
         } >"$log" 2>&1; then
        cat "$log"; rm -f "$log"; exit 1
    fi
    rm -f "$log" .venv/.petasus-* .venv/.compiled-*
    touch "$stamp" ".venv/.compiled-$sources"
fi

# The modules compiled with Cython (na/accel.py) follow their sources only when rebuilt: build
# again, in place and only what changed, whenever a source in na/, hg/ or bulk/ has, or a .pxd
# that declares C types for one. (Without this an edit runs as source, with a warning, never as
# stale compiled code.) The environment's PETASUS_PUREPYTHON chooses what runs, not what is built.
if [ ! -e ".venv/.compiled-$sources" ] && .venv/bin/python -c "import Cython" 2>/dev/null; then
    log=$(mktemp)
    if ! env -u PETASUS_PUREPYTHON .venv/bin/python setup.py -q build_ext --inplace >"$log" 2>&1
    then
        cat "$log"; rm -f "$log"; exit 1
    fi
    rm -f "$log" .venv/.compiled-*
    touch ".venv/.compiled-$sources"
fi

# Debian's pyverbs is built for Debian's python3.11 and installed in its dist-packages; PyPI's
# pyverbs needs Cython < 3.1 to build and rdma-core >= 59 to load, so it is no option here. The
# venv gets pyverbs and nothing else from there: a .pth file puts on its path a directory that
# holds one symlink, to the pyverbs package. Only where the extension ABI matches the venv's
# interpreter; elsewhere the verbs plugin says pyverbs is missing.
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
abi=$(.venv/bin/python -c 'import sys; print("cpython-%d%d" % sys.version_info[:2])')
debian_pyverbs=/usr/lib/python3/dist-packages/pyverbs
if compgen -G "$debian_pyverbs/base.$abi-*.so" >/dev/null; then
    mkdir -p .venv/pyverbs-only
    ln -sfn "$debian_pyverbs" .venv/pyverbs-only/pyverbs
    echo "$PWD/.venv/pyverbs-only" >"$purelib/petasus-pyverbs.pth"
else
    rm -rf .venv/pyverbs-only "$purelib/petasus-pyverbs.pth"
fi
