#!/usr/bin/env bash
# The whole test suite: `bash scripts/test.sh` (README.md; .ci/run calls exactly this).
# Tools the tests drive are installed here from the system packages when missing
# (Debian/Ubuntu): headless Chromium for tests/status_page.rs (chromium,
# chromium-driver), promtool for tests/metrics.rs (prometheus), nats-server for
# tests/jetstream.rs and tests/cluster.rs (the replicated journal, the cluster),
# curl, jq and openssl for the
# README's tours (tests/readme.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

updated=""
# need WHAT PACKAGE... : installs the packages unless every file in $FILES exists.
need() {
    local what=$1
    shift
    local missing=""
    for f in $FILES; do [ -x "$f" ] || missing=1; done
    [ -z "$missing" ] && return 0
    if ! command -v apt-get >/dev/null; then
        echo "test.sh: no apt-get; $what needs $FILES" >&2
        return 0
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
    echo "test.sh: installing $* (for $what)..."
    local log
    log="$(mktemp)"
    if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@" >"$log" 2>&1 ||
           { [ -z "$updated" ] && updated=1 && $sudo apt-get update >>"$log" 2>&1 &&
             DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends "$@" >>"$log" 2>&1; }; }; then
        tail -n 20 "$log"
        echo "test.sh: could not install $*; $what will skip (or fail under CI)" >&2
    fi
    rm -f "$log"
}

FILES="/usr/bin/chromium /usr/bin/chromedriver" need tests/status_page.rs chromium chromium-driver
FILES="/usr/bin/promtool" need tests/metrics.rs prometheus
FILES="/usr/sbin/nats-server" need "tests/jetstream.rs and tests/cluster.rs" nats-server
FILES="/usr/bin/curl /usr/bin/jq /usr/bin/openssl" need tests/readme.rs curl jq openssl

exec cargo test --all-targets
