#!/usr/bin/env bash
# A kami cluster on this machine, for demos and load tests: three nats-servers
# (clustered on loopback, the stream kept in three copies) and three kami nodes on
# http://127.0.0.1:8081, :8082 and :8083, each with its own data directory under
# $KAMI_CLUSTER_DIR (default ./cluster-data). Ctrl-C stops everything; the data
# stays (run it again to start on it, delete the directory to start afresh).
#
#   bash scripts/cluster.sh
#   kami load --url http://127.0.0.1:8081,http://127.0.0.1:8082,http://127.0.0.1:8083 \
#             --admin-token cluster-admin-token --secret cluster-sandbox-secret
#
# Kill one node (kill -9 of its pid, printed below) and watch the others take its
# shards over within the lease's 3 s: GET /status.json on any node shows what it serves.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v nats-server >/dev/null || { echo "cluster.sh: needs nats-server (apt-get install nats-server)" >&2; exit 1; }
dir="${KAMI_CLUSTER_DIR:-./cluster-data}"
mkdir -p "$dir"
cargo build --release --quiet
# Every node has the same admin token and payment channel secrets: a request or a
# gateway's notification may reach any node and be checked again on its shard's.
token="${KAMI_ADMIN__TOKEN:-cluster-admin-token}"
sandbox="${KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET:-cluster-sandbox-secret}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

urls=""
for i in 1 2 3; do
    cat > "$dir/nats-$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:424$i
jetstream { store_dir: "$dir/nats-$i" }
cluster { name: kami, listen: 127.0.0.1:624$i,
  routes: [nats-route://127.0.0.1:6241, nats-route://127.0.0.1:6242, nats-route://127.0.0.1:6243] }
CONF
    nats-server -c "$dir/nats-$i.conf" 2> "$dir/nats-$i.log" &
    pids+=($!)
    urls="${urls:+$urls,}nats://127.0.0.1:424$i"
done

for i in 1 2 3; do
    KAMI_SERVER__LISTEN="127.0.0.1:808$i" \
    KAMI_STORAGE__PATH="$dir/kami-$i" \
    KAMI_STORAGE__BACKEND=jetstream \
    KAMI_STORAGE__JETSTREAM__URLS="$urls" \
    KAMI_CLUSTER__NODE="node$i" \
    KAMI_CLUSTER__ADVERTISE="http://127.0.0.1:808$i" \
    KAMI_ADMIN__TOKEN="$token" \
    KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET="$sandbox" \
        ./target/release/kami > "$dir/kami-$i.log" 2>&1 &
    pids+=($!)
    echo "node$i: http://127.0.0.1:808$i (pid $!, log $dir/kami-$i.log)"
done
echo "admin token: $token   sandbox secret: $sandbox   stop: Ctrl-C"
wait
