#!/usr/bin/env bash
# Admission control under overload: p99 of *accepted* orders when far more buyers
# arrive than one hot product's actors can answer, with the time bound on the line
# (actors.max_queue_wait_ms, default 25) and without it (0: only the 2,048-request
# hard bound). `kami load --mode order-only` against a kami server in another
# process; latency is recorded for accepted requests (201) only. Two kinds of
# clients: `once` (a refused buyer gives up; the next buyer comes at once, so the
# refusals are a storm) and `wait` (`--retry-overloaded`: a refused buyer waits the
# `estimated_wait_ms` the answer gives, with jitter, and tries again, up to 20 times,
# as a storefront showing "you are in line" does).
#
# Usage: bash benches/overload.sh   (env: BUYERS=60000 CONNS="16 160 1600" WAITS="25 0"
# CLIENTS="once wait"; no variable may start with KAMI_, which kami reads as configuration)
set -euo pipefail
cd "$(dirname "$0")/.."

BUYERS=${BUYERS:-60000}
CONNS=${CONNS:-"16 160 1600"}
WAITS=${WAITS:-"25 0"}
CLIENTS=${CLIENTS:-"once wait"}
# server.max_concurrent_requests (requests in flight in the whole server; beyond: 503 at the door).
INFLIGHT=${INFLIGHT:-8192}
PORT=8093
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet --bin kami
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
KAMI="$target_dir/release/kami"
work=$(mktemp -d)
kami_pid=""
cleanup() { [ -z "$kami_pid" ] || kill "$kami_pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

echo "| max_queue_wait_ms | clients | conns | accepted/s | accepted p50 | accepted p99 | answers 503 | server RSS |"
echo "|---:|---|---:|---:|---:|---:|---:|---:|"
for w in $WAITS; do
    rm -rf "$work/data"
    KAMI_SERVER__LISTEN=127.0.0.1:$PORT KAMI_STORAGE__PATH="$work/data" KAMI_ADMIN__TOKEN=bench \
        KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET=bench KAMI_RATE_LIMITS__ENABLED=false KAMI_LOG__LEVEL=error \
        KAMI_ACTORS__MAX_QUEUE_WAIT_MS=$w KAMI_SERVER__MAX_CONCURRENT_REQUESTS=$INFLIGHT "$KAMI" >"$work/kami.log" 2>&1 &
    kami_pid=$!
    for ((i = 0; ; i++)); do
        curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break
        if ((i > 300)) || ! kill -0 $kami_pid 2>/dev/null; then echo "kami did not start:"; cat "$work/kami.log"; exit 1; fi
        sleep 0.1
    done
    for clients in $CLIENTS; do
    for c in $CONNS; do
        retry=(); [ "$clients" = once ] || retry=(--retry-overloaded)
        if ! "$KAMI" load --url "http://127.0.0.1:$PORT" --admin-token bench --secret bench --mode order-only \
            --keys "$BUYERS" --buyers "$BUYERS" --concurrency "$c" --shards "$(nproc)" "${retry[@]}" \
            --json "$work/r.json" >"$work/r.txt" 2>&1; then
            grep -v '%' "$work/r.txt"; echo "kami load verdict failed (w=$w, conns=$c)"; exit 1
        fi
        rss_mib=$(( $(awk '/VmRSS/ {print $2}' /proc/$kami_pid/status) / 1024 ))
        python3 - "$w" "$clients" "$c" "$work/r.json" "$rss_mib" <<'PY'
import json, sys
w, clients, c, path, rss = sys.argv[1:6]
r = json.load(open(path))
create = next(s for s in r["steps"] if s["step"] == "create order")
answers = r["answers"]
total = sum(answers.values())
shed = sum(n for k, n in answers.items() if k.startswith("503"))
print(f"| {w} | {clients} | {c} | {create['count'] / (r['elapsed_ms'] / 1000):,.0f} | {create['p50_ms']:.1f} ms "
      f"| {create['p99_ms']:.1f} ms | {100 * shed / total:.0f}% | {rss} MiB |")
PY
    done
    done
    kill $kami_pid; wait $kami_pid 2>/dev/null || true; kami_pid=""
done
echo "server.max_concurrent_requests = $INFLIGHT; machine: $(nproc) cores; client and server share them"
