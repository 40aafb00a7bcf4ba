#!/usr/bin/env bash
# Does a webhook endpoint slow the sale? The full purchase (create + signed
# notification + read, examples/purchase_client.rs) against kami with no webhook
# endpoint, with a healthy receiver taking every event, and with a receiver that
# never answers (`kami webhook-sink`, mode "hang"): side by side in one run,
# ROUNDS times (the order turning each round), then the table: mean and median,
# each with its ratio to "none".
#
# Usage: bash benches/webhooks.sh   (env: SECS=10 CONNS=256 ROUNDS=2 KEYS_PER_SEC=20000)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/stock.sh

SECS=${SECS:-10}
CONNS=${CONNS:-256}
ROUNDS=${ROUNDS:-2}
KEYS_PER_SEC=${KEYS_PER_SEC:-20000}
PORT_KAMI=8094 PORT_SINK=8095

cargo build --release --quiet --bin kami --example purchase_client
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
KAMI="$target_dir/release/kami"
CLIENT="$target_dir/release/examples/purchase_client"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$KAMI" webhook-sink --listen 127.0.0.1:$PORT_SINK --secret bench-webhook-secret >"$work/sink.log" 2>&1 & pids+=($!)
until curl -sf "http://127.0.0.1:$PORT_SINK/stats" >/dev/null; do sleep 0.1; done

results=()
run() { # $1 = label, $2 = sink mode ("" = no endpoint)
    local dir="$work/kami-$RANDOM" env=()
    if [ -n "$2" ]; then
        curl -sf -H 'Content-Type: application/json' -d "{\"mode\":\"$2\"}" "http://127.0.0.1:$PORT_SINK/mode" >/dev/null
        env=(KAMI_WEBHOOKS__ENDPOINTS__BENCH__URL="http://127.0.0.1:$PORT_SINK/"
             KAMI_WEBHOOKS__ENDPOINTS__BENCH__SECRET=bench-webhook-secret)
    fi
    env "${env[@]}" KAMI_SERVER__LISTEN=127.0.0.1:$PORT_KAMI KAMI_STORAGE__PATH="$dir" KAMI_ADMIN__TOKEN=bench \
        KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET=bench KAMI_RATE_LIMITS__ENABLED=false KAMI_LOG__LEVEL=warn \
        "$KAMI" >"$work/kami.log" 2>&1 & local pid=$!; pids+=($pid)
    for ((i = 0; ; i++)); do
        curl -sf "http://127.0.0.1:$PORT_KAMI/readyz" >/dev/null && break
        if ((i > 300)); then echo "kami did not start:"; cat "$work/kami.log"; exit 1; fi
        sleep 0.1
    done
    stock_flash "http://127.0.0.1:$PORT_KAMI" $((KEYS_PER_SEC * SECS))
    local out rps p99 pending
    out=$("$CLIENT" "127.0.0.1:$PORT_KAMI" flash bench "$CONNS" "$SECS" 2>&1) || { echo "$out"; exit 1; }
    rps=$(echo "$out" | sed -n 's/.* per_sec \([0-9]*\) .*/\1/p')
    p99=$(echo "$out" | sed -n 's/.* create_p99_ms \([0-9.]*\) .*/\1/p')
    pending=$(curl -sf "http://127.0.0.1:$PORT_KAMI/metrics" | sed -n 's/^kami_webhook_pending{endpoint="bench"} \(.*\)/\1/p')
    results+=("$1|$rps|$p99")
    printf '  %-28s %8s purchases/s  create p99 %6s ms  records waiting at the end: %s\n' "$1" "$rps" "$p99" "${pending:--}"
    kill $pid; wait $pid 2>/dev/null || true
}

echo "full purchase, $CONNS connections, ${SECS}s per run, $ROUNDS rounds"
# The order turns every round, so a drift of the machine does not favour one case.
cases=("no endpoint|" "healthy receiver|ok" "hanging receiver|hang")
for ((r = 0; r < ROUNDS; r++)); do
    for ((c = 0; c < 3; c++)); do
        IFS='|' read -r label mode <<<"${cases[$(((r + c) % 3))]}"
        run "$label" "$mode"
    done
done

values() { for x in "${results[@]}"; do IFS='|' read -r l v _ <<<"$x"; if [ "$l" = "$1" ]; then echo "$v"; fi; done; }
mean() { values "$1" | awk '{ s += $1; n++ } END { printf "%d", s / n }'; }
median() { values "$1" | sort -n | awk '{ v[n++] = $1 } END { printf "%d", n % 2 ? v[(n - 1) / 2] : (v[n / 2 - 1] + v[n / 2]) / 2 }'; }
echo
echo "| webhook endpoint | purchases/s (mean) | vs none | purchases/s (median) | vs none |"
echo "|---|---:|---:|---:|---:|"
none=$(mean "no endpoint") none_median=$(median "no endpoint")
for l in "no endpoint" "healthy receiver" "hanging receiver"; do
    m=$(mean "$l") md=$(median "$l")
    echo "| $l | $m | $(awk -v a="$m" -v b="$none" 'BEGIN { printf "%.3f", a / b }') | $md | $(awk -v a="$md" -v b="$none_median" 'BEGIN { printf "%.3f", a / b }') |"
done
