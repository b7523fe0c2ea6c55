#!/usr/bin/env bash
# Set up, then run every example end to end on loopback, over tcp and sm: start the server,
# read the address from its first line, run the client, check its output, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
servers=()

# run_example NAME URI EXPECTED [SERVER_EXPECTED]: extra arguments come from SERVER_ARGS and
# CLIENT_ARGS.
run_example() {
    local name=$1 uri=$2 expected=$3 server_expected=${4:-}
    local out
    out=$(mktemp)
    "$PY" "examples/$name/server.py" "$uri" "${SERVER_ARGS[@]}" >"$out" &
    local pid=$!
    servers+=("$pid")
    local addr=""
    for _ in $(seq 100); do
        addr=$(sed -n '1s/^listening on //p' "$out")
        [ -n "$addr" ] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "FAIL $name ($uri): the server did not start"; cat "$out"
        return 1
    fi
    local result
    result=$(timeout 60 "$PY" "examples/$name/client.py" "$addr" "${CLIENT_ARGS[@]}")
    kill -TERM "$pid"
    wait "$pid"
    echo "$result" | sed "s|^|  [$name $uri] |"
    if ! grep -q -- "$expected" <<<"$result"; then
        echo "FAIL $name ($uri): expected '$expected' from the client"; return 1
    fi
    if [ -n "$server_expected" ] && ! grep -q -- "$server_expected" "$out"; then
        echo "FAIL $name ($uri): expected '$server_expected' from the server"; cat "$out"
        return 1
    fi
    sed -n '2,$p' "$out" | sed "s|^|  [$name server] |"
    rm -f "$out"
}

work=$(mktemp -d)
trap 'for p in "${servers[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"' EXIT
head -c $((8 << 20)) /dev/urandom >"$work/input.bin"
for uri in tcp://127.0.0.1:0 sm://; do
    SERVER_ARGS=()
    CLIENT_ARGS=()
    run_example na_echo "$uri" "get: 30000 bytes"
    CLIENT_ARGS=(3)
    run_example hello "$uri" "sent 3 hello" "Hello World"
    CLIENT_ARGS=()
    run_example sum "$uri" "42 + 23 = 65"
    run_example int_list "$uri" "sum = 55"
    CLIENT_ARGS=(64)
    run_example pipeline "$uri" "pipelined.*(digest ok)"
    SERVER_ARGS=("$work/out")
    CLIENT_ARGS=("$work/input.bin")
    run_example save "$uri" "saved input.bin: 8388608 bytes" "saved input.bin"
    cmp "$work/input.bin" "$work/out/input.bin" && echo "  [save $uri] the written file is byte-identical"
    rm -rf "$work/out"
done
echo "all examples passed"
# The store's main job: an embedded store with 16 MiB of DRAM takes 64 MiB, spills to disk,
# and reads every object back verified.
.venv/bin/petasus-store demo "$work/store"
# Reopen the same directory: every object that reached the disk tier survived the restart.
.venv/bin/petasus-store demo "$work/store" --total 16
# The distributed scheme: a master and two storage nodes (processes) on loopback, over tcp
# and sm; objects spill past the cluster's DRAM, then a node holding replicas is killed and
# nothing is lost. The demo stops everything it started.
for uri in tcp://127.0.0.1:0 sm://; do
    .venv/bin/petasus-store demo --cluster "$uri" --dram 16 --total 48
done
