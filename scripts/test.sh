#!/usr/bin/env bash
# The whole test suite: `bash scripts/test.sh` (README.md; .ci/run calls exactly this).
# The status-page test drives headless Chromium; it is installed here from the
# system packages when missing (Debian/Ubuntu: chromium, chromium-driver).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! { [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; }; then
    if command -v apt-get >/dev/null; then
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo -n"
        echo "test.sh: installing chromium and chromium-driver (for tests/status_page.rs)..."
        log="$(mktemp)"
        if ! { DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium chromium-driver >"$log" 2>&1 ||
               { $sudo apt-get update >>"$log" 2>&1 &&
                 DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium chromium-driver >>"$log" 2>&1; }; }; then
            tail -n 20 "$log"
            echo "test.sh: could not install Chromium; tests/status_page.rs will skip (or fail under CI)" >&2
        fi
        rm -f "$log"
    else
        echo "test.sh: no apt-get; tests/status_page.rs needs /usr/bin/chromium and /usr/bin/chromedriver" >&2
    fi
fi

exec cargo test --all-targets
