//! The operator's side of backups (`kami backup`, `kami backup verify`,
//! `kami restore`): a running server's backup downloaded into a file, checked
//! whole before it is kept; the checks and the restore are `storage::backup`'s.

use std::path::{Path, PathBuf};

pub use crate::storage::backup::{
    lower_priority, restore, restore_archive, verify, BackupError, Summary, BACKGROUND_NICE, MIN_PASSPHRASE_BYTES,
};

/// Reads a passphrase from a file (its first line), for sealing or opening secrets.
pub fn read_passphrase(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("").to_string();
    if line.len() < MIN_PASSPHRASE_BYTES {
        return Err(format!(
            "{}: a passphrase of at least {} bytes on its first line",
            path.display(),
            MIN_PASSPHRASE_BYTES
        ));
    }
    Ok(line)
}

/// Verifies the backup file at `path`.
pub fn verify_file(path: &Path) -> Result<Summary, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    verify(std::io::BufReader::with_capacity(1 << 20, file)).map_err(|e| e.to_string())
}

/// Asks the server at `url` for a backup and writes it to `to`: into `{to}.partial`
/// first, verified whole, then renamed, so `to` is only ever a whole backup.
pub async fn download(url: &str, admin_token: &str, to: &Path, passphrase: Option<String>) -> Result<Summary, String> {
    use std::io::Write;
    let partial: PathBuf = {
        let mut name = to.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".partial");
        to.with_file_name(name)
    };
    let body = serde_json::json!({ "passphrase": passphrase }).to_string();
    let endpoint = format!("{}/api/v1/admin/backup", url.trim_end_matches('/'));
    let mut response = reqwest::Client::new()
        .post(&endpoint)
        .bearer_auth(admin_token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("{endpoint}: {e}"))?;
    if !response.status().is_success() {
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        return Err(format!("{endpoint}: {status}: {text}"));
    }
    let mut file = std::fs::File::create(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => file.write_all(&chunk).map_err(|e| format!("{}: {e}", partial.display()))?,
            Ok(None) => break,
            Err(e) => return Err(format!("the backup was cut short: {e}")),
        }
    }
    file.sync_all().map_err(|e| format!("{}: {e}", partial.display()))?;
    drop(file);
    let checked = partial.clone();
    let summary = tokio::task::spawn_blocking(move || verify_file(&checked))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("the backup received does not verify ({e}); {} kept for a look", partial.display()))?;
    std::fs::rename(&partial, to).map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(summary)
}

/// One line per fact of a summary, for the commands' output.
pub fn describe(s: &Summary) -> String {
    let journals = s.manifest.cut.len();
    let taken = chrono::DateTime::from_timestamp_millis(s.manifest.taken_at_ms as i64)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    let mut out = format!(
        "cut at {taken} (kami {}, format {})\n{} journals, {} journal records, {} stored values, {} bytes, {} entries\n",
        s.manifest.kami_version, s.manifest.format, journals, s.journal_records, s.tree_values, s.bytes, s.entries
    );
    if !s.sealed.is_empty() {
        out.push_str(&format!("sealed with a passphrase: {}\n", s.sealed.join(", ")));
    }
    out
}
