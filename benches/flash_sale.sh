#!/usr/bin/env bash
# Side-by-side flash-sale benchmark on this machine, in one run:
#   * Redis 7 + the Lua reserve script shops use (benches/reserve.lua: check stock,
#     DECR, LPOP a key), driven by redis-benchmark, without persistence and with
#     `appendfsync always` (every reply durable, as kami's are);
#   * the shop kami replaces (examples/redis_shop.rs: axum, one Lua step per order
#     over a multiplexed connection, Redis with `appendfsync always`),
#   * a bare axum handler (examples/bare_axum.rs) and kami's durable order-create
#     (one hot product, shards = arbiters), both driven by wrk (benches/order.lua);
#   * the full purchase (create + signed notification + read) through the shop
#     and through kami, driven by one load client (`kami load --url`);
# at the same connection counts, then prints a table and the ratios.
#
# Usage: bash benches/flash_sale.sh   (env: SECS=10 CONNS="256 5000" FULL_CONNS="256 5000"
# REDIS_OPS STOCK_KEYS FULL_KEYS_PER_SEC; no variable may start with KAMI_, which kami reads as configuration)
# Installs redis-server, redis-tools and wrk from the system packages if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/stock.sh

SECS=${SECS:-10}
CONNS=${CONNS:-"256 5000"}
REDIS_OPS=${REDIS_OPS:-300000}
# Enough that the fastest system does not sell out in its runs (kami sold 958,820 of 1M in one).
STOCK_KEYS=${STOCK_KEYS:-2000000}
FULL_CONNS=${FULL_CONNS:-"256 5000"}
# Keys per second of run imported for the full purchase (more than either sells).
FULL_KEYS_PER_SEC=${FULL_KEYS_PER_SEC:-20000}
PORT_REDIS=6391 PORT_BARE=8091 PORT_KAMI=8092 PORT_PEER=8093

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v redis-benchmark >/dev/null || need+=(redis-tools)
command -v wrk >/dev/null || need+=(wrk)
if ((${#need[@]})); then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y "${need[@]}" >/dev/null
fi
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet --bin kami --example bare_axum --example redis_shop --example purchase_client
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
KAMI="$target_dir/release/kami"
BARE="$target_dir/release/examples/bare_axum"
PEER="$target_dir/release/examples/redis_shop"
CLIENT="$target_dir/release/examples/purchase_client"

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

results=()   # "system|conns|ops_per_sec|p99"
record() { results+=("$1|$2|$3|$4"); printf '  %-34s %6s conns %10s ops/s  p99 %s\n' "$1" "$2" "$3" "$4"; }

# ---- Redis + Lua ----
redis_run() { # $1 = label, rest = redis-server persistence flags
    local label=$1; shift
    rm -rf "$work/redis"; mkdir -p "$work/redis"
    redis-server --port $PORT_REDIS --dir "$work/redis" --save '' --maxclients 20000 "$@" >"$work/redis.log" 2>&1 &
    local pid=$!; pids+=("$pid")
    until redis-cli -p $PORT_REDIS ping >/dev/null 2>&1; do sleep 0.1; done
    local sha; sha=$(redis-cli -p $PORT_REDIS SCRIPT LOAD "$(cat benches/reserve.lua)")
    for c in $CONNS; do
        redis-cli -p $PORT_REDIS DEL stock keys >/dev/null
        redis-cli -p $PORT_REDIS SET stock $((REDIS_OPS + 1000)) >/dev/null
        seq 1 $((REDIS_OPS + 1000)) | awk '{ if ((NR-1) % 1000 == 0) { if (NR > 1) print ""; printf "RPUSH keys" } printf " key-%d", $1 } END { print "" }' \
            | redis-cli -p $PORT_REDIS >/dev/null
        local out; out=$(redis-benchmark -p $PORT_REDIS -c "$c" -n "$REDIS_OPS" --precision 2 EVALSHA "$sha" 2 stock keys 2>/dev/null | tr '\r' '\n')
        local rps; rps=$(echo "$out" | sed -n 's/^ *throughput summary: \([0-9.]*\) requests per second.*/\1/p' | tail -1)
        local p99; p99=$(echo "$out" | awk '/latency summary/ {getline; getline; print $5 " ms"}' | tail -1)
        local left; left=$(redis-cli -p $PORT_REDIS LLEN keys)
        [ "$left" -eq 1000 ] || echo "  (redis: $left keys left, expected 1000)"
        record "$label" "$c" "${rps%.*}" "$p99"
    done
    kill "$pid"; wait "$pid" 2>/dev/null || true
}
echo "Redis + Lua reserve ($REDIS_OPS ops per run)"
redis_run "redis+lua (no persistence)" --appendonly no
redis_run "redis+lua (appendfsync always)" --appendonly yes --appendfsync always

# ---- wrk against an HTTP server ----
wrk_run() { # $1 = label, $2 = url
    for c in $CONNS; do
        local out; out=$(wrk -t2 -c "$c" -d "${SECS}s" --latency -s benches/order.lua "$2/api/v1/orders" 2>&1)
        local created; created=$(echo "$out" | sed -n 's/^answers: created \([0-9]*\) other \([0-9]*\)/\1/p')
        local other; other=$(echo "$out" | sed -n 's/^answers: created [0-9]* other \([0-9]*\)/\1/p')
        local p99; p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
        record "$1" "$c" "$((created / SECS))" "$p99"
        [ "$other" -eq 0 ] || echo "  ($1: $other answers were not 201)"
    done
}
echo "axum + Redis Lua reserve shop, appendfsync always (examples/redis_shop.rs; wrk, ${SECS}s per run)"
rm -rf "$work/redis-shop"; mkdir -p "$work/redis-shop"
redis-server --port $PORT_REDIS --dir "$work/redis-shop" --save '' --maxclients 20000 --appendonly yes --appendfsync always \
    >"$work/redis-shop.log" 2>&1 & redis_pid=$!; pids+=($redis_pid)
until redis-cli -p $PORT_REDIS ping >/dev/null 2>&1; do sleep 0.1; done
redis-cli -p $PORT_REDIS SET stock:flash "$STOCK_KEYS" >/dev/null
seq 0 $((STOCK_KEYS - 1)) | awk '{ if ((NR-1) % 1000 == 0) { if (NR > 1) print ""; printf "RPUSH keys:flash" } printf " flash-key-%d", $1 } END { print "" }' \
    | redis-cli -p $PORT_REDIS >/dev/null
"$PEER" 127.0.0.1:$PORT_PEER "redis://127.0.0.1:$PORT_REDIS/" bench >/dev/null & peer_pid=$!; pids+=($peer_pid)
until curl -s -o /dev/null "http://127.0.0.1:$PORT_PEER/"; do sleep 0.1; done
wrk_run "axum+redis shop (always)" "http://127.0.0.1:$PORT_PEER"
kill $peer_pid $redis_pid; wait $redis_pid 2>/dev/null || true

echo "bare axum handler (wrk, ${SECS}s per run)"
"$BARE" 127.0.0.1:$PORT_BARE >/dev/null & pids+=($!)
until curl -s -o /dev/null -X POST "http://127.0.0.1:$PORT_BARE/api/v1/orders"; do sleep 0.1; done
wrk_run "bare axum handler" "http://127.0.0.1:$PORT_BARE"

echo "kami durable order-create (wrk, ${SECS}s per run, $STOCK_KEYS keys)"
# kami as a server of its own, with a fresh data directory ($1).
start_kami() {
    KAMI_SERVER__LISTEN=127.0.0.1:$PORT_KAMI KAMI_STORAGE__PATH="$1" KAMI_ADMIN__TOKEN=bench \
        KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET=bench KAMI_RATE_LIMITS__ENABLED=false KAMI_LOG__LEVEL=warn \
        "$KAMI" >"$work/kami.log" 2>&1 & kami_pid=$!; pids+=($kami_pid)
    for ((i = 0; ; i++)); do
        curl -sf "http://127.0.0.1:$PORT_KAMI/readyz" >/dev/null && break
        if ((i > 300)) || ! kill -0 $kami_pid 2>/dev/null; then echo "kami did not start:"; cat "$work/kami.log"; exit 1; fi
        sleep 0.1
    done
}
start_kami "$work/kami"
stock_flash "http://127.0.0.1:$PORT_KAMI" "$STOCK_KEYS"
rss_kib=$(awk '/VmRSS/ {print $2}' /proc/$kami_pid/status)
# Stock-actor turn counts per histogram bucket ("le count" lines).
turn_buckets() {
    curl -sf "http://127.0.0.1:$PORT_KAMI/metrics" | grep '^kami_actor_turn_seconds_bucket{actor="stock"' \
        | sed 's/.*le="\([^"]*\)"} \([0-9]*\).*/\1 \2/'
}
turn_buckets >"$work/turns.before"
wrk_run "kami order-create (durable)" "http://127.0.0.1:$PORT_KAMI"
# The longest stock-actor turn while wrk ran (the key imports before are not
# counted): the smallest histogram bucket holding every turn of the runs.
turn_buckets | paste -d' ' "$work/turns.before" - | awk '
    { le[NR] = $1; n[NR] = $4 - $2; if ($1 == "+Inf") total = $4 - $2; if ($1 == "0.005") upto5 = $4 - $2 }
    END { for (i = 1; i <= NR; i++) if (n[i] == total) { longest = le[i]; break }
          printf "  stock actor turns while wrk ran: %d, longest <= %s s, over 5 ms: %d\n", total, longest, total - upto5 }'
audit=$(curl -sf -H 'Authorization: Bearer bench' "http://127.0.0.1:$PORT_KAMI/api/v1/admin/audit")
echo "  audit: $(echo "$audit" | tr -d '\n' | sed 's/.*"ok":\([a-z]*\).*/ok=\1/')  $(echo "$audit" | grep -o '"products":\[[^]]*\]')"
echo "  RSS after loading $STOCK_KEYS keys: $((rss_kib / 1024)) MiB"
kill $kami_pid; wait $kami_pid 2>/dev/null || true

# ---- full purchase, one load client for both ----
# examples/purchase_client.rs (its own process, hand-written HTTP/1.1 so that it
# costs little) drives the shop and kami alike: per connection, in a loop, create
# an order for a new buyer, send the signed notification, read the key. It fails
# on any refused step and on a key delivered twice.
full_run() { # $1 = label, $2 = host:port
    for c in $FULL_CONNS; do
        local out
        if ! out=$("$CLIENT" "$2" flash bench "$c" "$SECS" 2>&1); then
            echo "$out"; echo "  the full purchase failed for $1 at $c connections"; exit 1
        fi
        local rps p99
        rps=$(echo "$out" | sed -n 's/.* per_sec \([0-9]*\) .*/\1/p')
        p99=$(echo "$out" | sed -n 's/.* create_p99_ms \([0-9.]*\) .*/\1/p')
        record "$1" "$c" "$rps" "create ${p99}ms"
    done
}
echo "full purchase (examples/purchase_client.rs: create + signed notification + read, ${SECS}s per run)"
full_keys=$((FULL_KEYS_PER_SEC * SECS * $(echo $FULL_CONNS | wc -w)))
rm -rf "$work/redis-full"; mkdir -p "$work/redis-full"
redis-server --port $PORT_REDIS --dir "$work/redis-full" --save '' --maxclients 20000 --appendonly yes --appendfsync always \
    >"$work/redis-full.log" 2>&1 & redis_pid=$!; pids+=($redis_pid)
until redis-cli -p $PORT_REDIS ping >/dev/null 2>&1; do sleep 0.1; done
"$PEER" 127.0.0.1:$PORT_PEER "redis://127.0.0.1:$PORT_REDIS/" bench >/dev/null & peer_pid=$!; pids+=($peer_pid)
until curl -s -o /dev/null "http://127.0.0.1:$PORT_PEER/"; do sleep 0.1; done
stock_flash "http://127.0.0.1:$PORT_PEER" "$full_keys"
full_run "axum+redis shop full purchase" "127.0.0.1:$PORT_PEER"
kill $peer_pid $redis_pid; wait $peer_pid $redis_pid 2>/dev/null || true
start_kami "$work/kami-full"
stock_flash "http://127.0.0.1:$PORT_KAMI" "$full_keys"
full_run "kami full purchase" "127.0.0.1:$PORT_KAMI"
kill $kami_pid; wait $kami_pid 2>/dev/null || true

# ---- table and ratios ----
get() { for r in "${results[@]}"; do IFS='|' read -r s c v _ <<<"$r"; if [ "$s" = "$1" ] && [ "$c" = "$2" ]; then echo "$v"; fi; done; }
get_p99() { for r in "${results[@]}"; do IFS='|' read -r s c _ p <<<"$r"; if [ "$s" = "$1" ] && [ "$c" = "$2" ]; then echo "$p"; fi; done; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "-" }'; }
echo
echo "| system | conns | ops/s | p99 |"
echo "|---|---:|---:|---:|"
for r in "${results[@]}"; do IFS='|' read -r s c v p <<<"$r"; echo "| $s | $c | $v | $p |"; done
echo
for c in $CONNS; do
    k=$(get "kami order-create (durable)" "$c")
    echo "$c conns: kami order-create / axum+redis shop (always) $(ratio "$k" "$(get "axum+redis shop (always)" "$c")"); kami p99 $(get_p99 "kami order-create (durable)" "$c") vs shop $(get_p99 "axum+redis shop (always)" "$c") vs bare $(get_p99 "bare axum handler" "$c")"
    echo "$c conns: kami order-create / redis-always $(ratio "$k" "$(get "redis+lua (appendfsync always)" "$c")"), / redis-none $(ratio "$k" "$(get "redis+lua (no persistence)" "$c")"), / bare axum $(ratio "$k" "$(get "bare axum handler" "$c")")"
done
for c in $FULL_CONNS; do
    echo "$c conns: kami full purchase / axum+redis shop full purchase $(ratio "$(get "kami full purchase" "$c")" "$(get "axum+redis shop full purchase" "$c")"); create p99 $(get_p99 "kami full purchase" "$c") vs shop $(get_p99 "axum+redis shop full purchase" "$c")"
done
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
