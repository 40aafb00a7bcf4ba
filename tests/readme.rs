//! The README's tours, pasted in order as a newcomer would: every block opened by
//! ```` ```sh tour ```` runs, as written, in one bash session against a fresh data
//! directory. The harness only stands in for what a person does by hand:
//! `cargo run --release` (re)starts the kami binary this suite built (stopping the
//! one started before, as Ctrl-C would), `kami ...` is that binary, a line starting
//! `# Stop the server` stops it, and the ports 8080, 8090 and 8091 become free ones. Every
//! `curl` fails the tour on an HTTP error (`--fail-with-body`), every command on a
//! non-zero exit (`set -e`): a tour that breaks when pasted fails here.

use std::process::Command;

/// The bodies of the README's `sh tour` blocks, in order.
fn tours(readme: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match current.as_mut() {
            None if line.trim_end() == "```sh tour" => current = Some(String::new()),
            None => {}
            Some(_) if line.trim_end() == "```" => blocks.extend(current.take()),
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
        }
    }
    assert!(current.is_none(), "a tour block is not closed");
    blocks
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// What a person does by hand, as shell functions (see the module comment).
const PRELUDE: &str = r#"set -euo pipefail
export KAMI_SERVER__LISTEN="127.0.0.1:$PORT" KAMI_LOG__LEVEL=info
KAMI_PID=""
shopt -s inherit_errexit
curl() { local rc=0; command curl --fail-with-body --max-time 30 "$@" || rc=$?; echo; return $rc; }
kami() {
    if [ "$1" = sandbox-gateway ]; then
        shift
        touch gateway.started
        exec "$KAMI_BIN" sandbox-gateway --listen "127.0.0.1:$GW_PORT" "$@"
    else
        "$KAMI_BIN" "$@"
    fi
}
stop_kami() {
    if [ -n "$KAMI_PID" ]; then
        kill "$KAMI_PID" 2>/dev/null || true
        wait "$KAMI_PID" 2>/dev/null || true
        KAMI_PID=""
    fi
}
cargo() {
    [ "$*" = "run --release" ] || { echo "tour: cargo $* is not a tour step" >&2; return 1; }
    stop_kami
    "$KAMI_BIN" >>kami.log 2>&1 &
    KAMI_PID=$!
    until command curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do
        kill -0 "$KAMI_PID" 2>/dev/null || { echo "tour: kami did not start" >&2; return 1; }
        sleep 0.1
    done
    if [ -e gateway.started ]; then
        until command curl -sf "http://127.0.0.1:$GW_PORT/api/health" >/dev/null; do sleep 0.1; done
    fi
}
trap 'stop_kami; kill $(jobs -p) 2>/dev/null || true' EXIT
"#;

#[test]
fn the_readme_tours_work_pasted_in_order() {
    let missing: Vec<&str> = ["bash", "curl", "jq", "openssl", "timeout"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().unwrap().status.success()
        })
        .collect();
    if !missing.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "missing in CI: {missing:?} (scripts/test.sh installs them)");
        eprintln!("SKIPPED: the README tours need {missing:?}");
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let blocks = tours(&readme);
    assert!(blocks.len() >= 8, "only {} tour blocks found", blocks.len());
    let (port, gateway_port, sink_port) = (free_port(), free_port(), free_port());
    let mut script = PRELUDE.to_string();
    for (i, block) in blocks.iter().enumerate() {
        script.push_str(&format!("echo '>>> tour block {}'\n", i + 1));
        let block = block
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
            .replace("localhost:8080", &format!("127.0.0.1:{port}"))
            .replace("127.0.0.1:8090", &format!("127.0.0.1:{gateway_port}"))
            .replace("127.0.0.1:8091", &format!("127.0.0.1:{sink_port}"));
        for line in block.lines() {
            if line.trim_start().starts_with("# Stop the server") {
                script.push_str("stop_kami\n");
            }
            script.push_str(line);
            script.push('\n');
        }
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tours.sh"), &script).unwrap();
    // Output to a file, not a pipe: a server the script left behind cannot hold the test.
    let output = std::fs::File::create(dir.path().join("output.txt")).unwrap();
    let status = Command::new("timeout")
        .args(["300", "bash", "tours.sh"])
        .current_dir(dir.path())
        .env("KAMI_BIN", env!("CARGO_BIN_EXE_kami"))
        .env("PORT", port.to_string())
        .env("GW_PORT", gateway_port.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .status()
        .unwrap();
    // Whatever still listens on the tour's ports (after a timeout): stopped.
    for p in [port, gateway_port, sink_port] {
        let _ = Command::new("pkill").args(["-f", &format!("127.0.0.1:{p}")]).status();
    }
    let stdout = std::fs::read_to_string(dir.path().join("output.txt")).unwrap_or_default();
    let report = || {
        let log = std::fs::read_to_string(dir.path().join("kami.log")).unwrap_or_default();
        format!("output:\n{stdout}\nkami.log:\n{log}")
    };
    assert!(status.success(), "the tours stopped ({status:?}):\n{}", report());
    assert_eq!(stdout.matches(">>> tour block").count(), blocks.len(), "{}", report());
    // The purchase tour's buyer and the gateway tour's buyer read their keys.
    assert!(
        stdout.contains("AAAA-1111") || stdout.contains("BBBB-2222") || stdout.contains("CCCC-3333"),
        "{}",
        report()
    );
    assert!(stdout.contains("GW-000"), "the gateway's payment delivered no key:\n{}", report());
    assert!(stdout.contains("\"points_spent\":200"), "{}", report());
    // The server's human log, written to a file, carries no terminal colour codes.
    let log = std::fs::read_to_string(dir.path().join("kami.log")).unwrap();
    assert!(log.contains("INFO"), "the server logged nothing at info:\n{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file:\n{log}");
}
