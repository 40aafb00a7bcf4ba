#!/usr/bin/env bash
# Memory per order while it is in a shard's memory, and once archived: the RSS of a
# kami server (release build) as `kami load --mode order-only` creates N orders that
# stay pending, then expire and move to the archive; twice, so the second round
# shows what archived orders cost once the memory of the first is reused. sled's
# page cache is set small (CACHE bytes, 8 MiB) so that it does not hide the orders.
#
#   bash benches/memory.sh            # N=100000
#   N=300000 bash benches/memory.sh
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-100000}
PORT=${PORT:-18099}
cargo build --release -q
dir=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; sleep 1; rm -rf "$dir"' EXIT
export KAMI_STORAGE__PATH="$dir/data" KAMI_SERVER__LISTEN="127.0.0.1:$PORT" \
    KAMI_ADMIN__TOKEN=bench-admin-token KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET=bench-secret \
    KAMI_RATE_LIMITS__ENABLED=false KAMI_ORDERS__TTL_SECS=25 KAMI_ORDERS__ARCHIVE_AFTER_SECS=1 \
    KAMI_PAYMENTS__QUERY_GRACE_SECS=0 KAMI_LOG__LEVEL=warn \
    KAMI_STORAGE__CACHE_CAPACITY_BYTES=${CACHE:-8388608}
target/release/kami >"$dir/server.log" 2>&1 &
pid=$!
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.2; done
rss() { awk '/VmRSS/ {print $2}' "/proc/$pid/status"; } # KiB
archived() {
    curl -s "http://127.0.0.1:$PORT/api/v1/admin/audit" -H "Authorization: Bearer bench-admin-token" |
        python3 -c 'import json,sys; print(sum(p["orders_archived"] for p in json.load(sys.stdin)["products"]))'
}
round() {
    target/release/kami load --url "http://127.0.0.1:$PORT" --admin-token bench-admin-token --secret bench-secret \
        --mode order-only --buyers "$N" --keys "$N" --concurrency 64 >"$dir/load.log" 2>&1 || true
}
before=$(rss)
round
active1=$(rss)
until [ "$(archived)" -ge "$N" ]; do sleep 1; done
archived1=$(rss)
round
active2=$(rss)
until [ "$(archived)" -ge "$((2 * N))" ]; do sleep 1; done
archived2=$(rss)
echo "N=$N orders per round; RSS KiB: start $before, round 1 in memory $active1, archived $archived1; round 2 in memory $active2, archived $archived2"
python3 - "$N" "$before" "$active1" "$archived1" "$active2" "$archived2" <<'EOF'
import sys
n, before, a1, r1, a2, r2 = (int(x) for x in sys.argv[1:])
print(f"per order in memory (round 1): {(a1 - before) * 1024 / n:.0f} bytes")
print(f"per order in memory (round 2, on reused memory): {(a2 - r1) * 1024 / n:.0f} bytes")
print(f"per archived order (RSS after round 2 archived vs round 1 archived): {(r2 - r1) * 1024 / n:.0f} bytes")
EOF
