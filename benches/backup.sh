#!/usr/bin/env bash
# What backups cost a flash sale: durable order-create on one hot product (shards =
# cores, STOCK_KEYS keys) driven by wrk at CONNS connections, in alternating runs
#   none     no backup
#   once     one `kami backup` taken 2 s into the run (a scheduled backup meeting a sale)
#   online   `kami backup` taken back to back for the whole run
#   archive  continuous archiving on (an increment every second, a full backup first)
# with the bare axum handler's p99 measured in every round for the speed issue's
# bound (kami's p99 at most 3x the bare handler's). Prints each run, then per case
# the median 2xx/s and p99 over the rounds, the backups' sizes and times, and the
# stock-actor turns of each run over 5 ms, and the group flushes over 25 ms.
#
# Usage: ROUNDS=3 SECS=10 CONNS=256 STOCK_KEYS=1000000 bash benches/backup.sh
# Installs wrk and bc from the system packages if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/stock.sh
ROUNDS=${ROUNDS:-3}
SECS=${SECS:-10}
CONNS=${CONNS:-256}
STOCK_KEYS=${STOCK_KEYS:-1000000}
PORT_KAMI=${PORT_KAMI:-18481}
PORT_BARE=${PORT_BARE:-18482}

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v bc >/dev/null || need+=(bc)
if ((${#need[@]})); then
    (apt-get update -qq && apt-get install -y -qq "${need[@]}") >/dev/null
fi
cargo build --release --bin kami --example bare_axum -q
KAMI=target/release/kami
work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT

# wrk at $CONNS against $1; prints "2xx/s p99_ms".
wrk_once() {
    local out; out=$(wrk -t2 -c "$CONNS" -d "${SECS}s" --latency -s benches/order.lua "$1/api/v1/orders" 2>&1)
    local created p99 unit
    created=$(echo "$out" | awk '/^answers:/ {print $3}')
    read -r p99 unit < <(echo "$out" | awk '$1 == "99%" {v=$2; u=v; gsub(/[0-9.]/, "", u); gsub(/[a-z]/, "", v); print v, u}')
    case $unit in us) p99=$(echo "$p99 / 1000" | bc -l) ;; s) p99=$(echo "$p99 * 1000" | bc -l) ;; esac
    printf '%.0f %.1f\n' "$(echo "$created / $SECS" | bc -l)" "$p99"
}

target/release/examples/bare_axum "127.0.0.1:$PORT_BARE" >/dev/null 2>&1 & pids+=($!)
sleep 1

start_kami() { # $1 = data dir, $2 = archive dir or ""
    KAMI_SERVER__LISTEN=127.0.0.1:$PORT_KAMI KAMI_STORAGE__PATH="$1" KAMI_ADMIN__TOKEN=bench \
        KAMI_PAYMENTS__CHANNELS__SANDBOX__SECRET=bench KAMI_RATE_LIMITS__ENABLED=false KAMI_LOG__LEVEL=warn \
        KAMI_BACKUP__ARCHIVE_DIR="$2" "$KAMI" >"$work/kami.log" 2>&1 & kami_pid=$!; pids+=($kami_pid)
    for ((i = 0; ; i++)); do
        curl -sf "http://127.0.0.1:$PORT_KAMI/readyz" >/dev/null && break
        if ((i > 600)) || ! kill -0 $kami_pid 2>/dev/null; then echo "kami did not start:"; cat "$work/kami.log"; exit 1; fi
        sleep 0.1
    done
}
stop_kami() { kill "$kami_pid"; wait "$kami_pid" 2>/dev/null || true; }
turn_buckets() { # each stock-actor turn bucket: "le count" (cumulative, over every stock actor)
    curl -sf "http://127.0.0.1:$PORT_KAMI/metrics" | grep '^kami_actor_turn_seconds_bucket{actor="stock"' \
        | sed 's/.*le="\([^"]*\)"} \([0-9]*\).*/\1 \2/' | awk '{c[$1]+=$2} END {for (b in c) print b, c[b]}' | sort -g
}
slow_flushes() { # group flushes so far that took over 25 ms, and the longest flush's bucket
    curl -sf "http://127.0.0.1:$PORT_KAMI/metrics" | grep '^kami_commit_flush_seconds_bucket' \
        | sed 's/.*le="\([^"]*\)"} \([0-9]*\).*/\1 \2/' | sort -g | awk '{le[NR] = $1; n[NR] = $2; if ($1 == "0.025") fast = $2}
            END {for (i = 1; i <= NR; i++) if (n[i] == n[NR]) {longest = le[i]; break}
                 printf "flushes over 25 ms: %d of %d, longest <= %ss", n[NR] - fast, n[NR], longest}'
}
turns_during() { # $1 = the buckets before the run: the run's turns over 5 ms, of all, and the longest bucket
    echo "$1" >"$work/turns-before"
    turn_buckets | awk 'NR == FNR {before[$1] = $2; next}
        {le[++n] = $1; d[n] = $2 - before[$1]; if ($1 == "0.005") fast = d[n]}
        END {for (i = 1; i <= n; i++) if (d[i] == d[n]) {longest = le[i]; break}
             printf "stock-actor turns during the run over 5 ms: %d of %d, longest <= %ss", d[n] - fast, d[n], longest}' \
        "$work/turns-before" -
}

declare -A results
bare_p99s=""
for ((round = 1; round <= ROUNDS; round++)); do
    bare=$(wrk_once "http://127.0.0.1:$PORT_BARE")
    echo "round $round bare axum handler: $bare (2xx/s, p99 ms)"
    bare_p99s+="${bare#* }"$'\n'
    for case in none once online archive; do
        data="$work/data-$case-$round"; archive=""
        [ "$case" = archive ] && archive="$work/archive-$round"
        start_kami "$data" "$archive"
        stock_flash "http://127.0.0.1:$PORT_KAMI" "$STOCK_KEYS"
        curl -sf -XPOST -H 'Authorization: Bearer bench' "http://127.0.0.1:$PORT_KAMI/api/v1/admin/snapshot" >/dev/null
        note=""
        turns_before=$(turn_buckets)
        if [ "$case" = once ]; then
            ( sleep 2
              s=$(date +%s%N)
              "$KAMI" backup --url "http://127.0.0.1:$PORT_KAMI" --admin-token bench --to "$work/b.kamibak" >/dev/null
              echo "$(( ($(date +%s%N) - s) / 1000000 )) $(stat -c %s "$work/b.kamibak")" >"$work/once-$round" ) & bpid=$!
        fi
        if [ "$case" = online ]; then
            ( n=0; end=$((SECONDS + SECS)); while ((SECONDS < end)); do
                  s=$(date +%s%N)
                  "$KAMI" backup --url "http://127.0.0.1:$PORT_KAMI" --admin-token bench --to "$work/b.kamibak" >/dev/null
                  echo "$(( ($(date +%s%N) - s) / 1000000 )) $(stat -c %s "$work/b.kamibak")" >>"$work/backups-$round"
              done ) & bpid=$!
        fi
        r=$(wrk_once "http://127.0.0.1:$PORT_KAMI")
        if [ "$case" = once ]; then
            wait $bpid
            note=$(awk '{printf "one backup of %.1f MB in %d ms", $2/1e6, $1}' "$work/once-$round")
        fi
        if [ "$case" = online ]; then
            wait $bpid
            note=$(awk '{n++; t+=$1; if ($1>m) m=$1; b=$2} END {printf "%d backups, mean %.0f ms, longest %d ms, %.1f MB each", n, t/n, m, b/1e6}' "$work/backups-$round")
        fi
        if [ "$case" = archive ]; then
            note="$(ls "$archive" | grep -c '^inc-') increments, $(du -sm "$archive" | cut -f1) MB archived, lag $(curl -sf "http://127.0.0.1:$PORT_KAMI/metrics" | awk '/^kami_backup_lag_seconds/ {print $2}') s"
        fi
        turns="$(turns_during "$turns_before"); $(slow_flushes)"
        stop_kami
        echo "round $round $case: $r (2xx/s, p99 ms); $turns; $note"
        results[$case]+="$r"$'\n'
    done
done
echo
bare_p99=$(echo -n "$bare_p99s" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
echo "bare     median p99 $bare_p99 ms (the bound: kami's p99 at most 3x that)"
for case in none once online archive; do
    # The median of the rounds (of an even number, the mean of the middle two).
    med=$(echo -n "${results[$case]}" | sort -n -k1 | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
    p99=$(echo -n "${results[$case]}" | sort -n -k2 | awk '{a[NR]=$2} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
    printf '%-8s median %6.0f 2xx/s, median p99 %6.1f ms = %.1fx the bare handler p99\n' "$case" "$med" "$p99" "$(echo "$p99 / $bare_p99" | bc -l)"
done
