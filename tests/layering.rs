//! Dependencies point one way: http → core → actors → storage / payments → domain,
//! and core → cluster → storage / domain (the shared catalogue, leases).
//! Reads every source file of a layer and checks which of kami's modules it names
//! (`crate::<module>` outside comments): a layer may name only the layers below it
//! and the shared leaves (configuration, clock, chaos switches, telemetry, the error
//! type). The sandbox gateway, the load generator and start-up (`app`) are used by
//! nothing in the request path.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// A layer: its files (a module file and its directory), and the modules it may name.
const LAYERS: &[(&str, &[&str])] = &[
    ("domain", &["domain"]),
    ("storage", &["storage", "domain", "chaos"]),
    ("payments", &["payments", "domain", "config"]),
    ("actors", &["actors", "domain", "storage", "payments", "chaos", "clock", "config", "telemetry"]),
    (
        "core",
        &[
            "core",
            "actors",
            "cluster",
            "domain",
            "storage",
            "payments",
            "chaos",
            "clock",
            "config",
            "telemetry",
            "error",
        ],
    ),
    ("http", &["http", "core", "actors", "domain", "chaos", "config", "telemetry", "error"]),
    ("webhooks", &["webhooks", "http", "core", "actors", "domain", "storage", "config", "telemetry", "error"]),
    ("telemetry", &["telemetry", "config"]),
    ("clock", &[]),
    ("cluster", &["cluster", "storage", "domain"]),
];

fn files_of(layer: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let single = src.join(format!("{layer}.rs"));
    if single.exists() {
        files.push(single);
    }
    files.extend(rs_files_under(src.join(layer)));
    files
}

/// Every `.rs` file in `dir` and its subdirectories (none if `dir` does not exist).
fn rs_files_under(dir: PathBuf) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files
}

/// The kami modules `text` names as `crate::<module>`, comments left out.
fn named_modules(text: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let module: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !module.is_empty() {
                named.insert(module);
            }
        }
    }
    named
}

#[test]
fn each_layer_names_only_the_layers_below_it() {
    let mut broken = Vec::new();
    for (layer, allowed) in LAYERS {
        let files = files_of(layer);
        assert!(!files.is_empty(), "no source for layer {layer}");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for module in named_modules(&text) {
                if !allowed.contains(&module.as_str()) {
                    broken.push(format!("{} names crate::{module}", file.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "dependencies against the layering:\n{}", broken.join("\n"));
}

#[test]
fn the_check_sees_a_forbidden_name_and_ignores_comments() {
    let named = named_modules(
        "use crate::http::Json;\n// crate::sandbox in a comment\nlet x = crate::core::Kami::new(); // crate::app",
    );
    assert_eq!(named.into_iter().collect::<Vec<_>>(), ["core", "http"]);
}

/// sled calls that take sled's process-wide write lock, after which every sled
/// operation of the process goes through one `RwLock` (see `storage`'s doc).
const PROCESS_WIDE_LOCKS: &[&str] = &[".apply_batch(", ".transaction(", ".checksum("];

/// The calls of [`PROCESS_WIDE_LOCKS`] in `text`, comments left out.
fn process_wide_locks(text: &str) -> Vec<&'static str> {
    let mut found = Vec::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        found.extend(PROCESS_WIDE_LOCKS.iter().filter(|call| code.contains(*call)));
    }
    found
}

#[test]
fn nothing_takes_sleds_process_wide_lock() {
    let mut found = Vec::new();
    for file in rs_files_under(Path::new(env!("CARGO_MANIFEST_DIR")).join("src")) {
        let text = std::fs::read_to_string(&file).unwrap();
        for call in process_wide_locks(&text) {
            found.push(format!("{} calls {call}", file.display()));
        }
    }
    assert!(found.is_empty(), "sled calls that serialise every sled operation of the process:\n{}", found.join("\n"));
}

#[test]
fn the_lock_check_sees_a_batch_and_ignores_comments() {
    let text = "tree.apply_batch(batch)?; // db.transaction(|t| ..)\n// tree.checksum()\nlet c = db.checksum()?;";
    assert_eq!(process_wide_locks(text), [".apply_batch(", ".checksum("]);
}
