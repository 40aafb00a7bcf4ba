//! The offline audit (`kami audit --data DIR`): reads a stopped server's data
//! directory without changing it and checks what recovery would rebuild.
//!
//! Checked per shard: the newest decodable snapshot plus the journal replay
//! without contradiction (a record that does not fit the state before it is a
//! violation); I1 (no oversell), I2 (every key in one place, delivered at most once),
//! I6 (conservation), counters against a recount, and that every paid order and
//! its payment record point at each other. Per product: no key in two shards.
//! Per directory: no journal for a product or shard that does not exist. Points:
//! every ledger replays without contradiction, every balance equals its ledger, and
//! keys delivered by redemptions match the settled redemptions (plus those held).
//! Coupons: every coupon ledger replays, its counts add up, and the delivered
//! orders that used a coupon match its uses (plus those held).
//!
//! Torn tails, undecodable snapshots and interrupted trims are *findings*, not
//! violations: recovery repairs them at the next start, and none of them can hold
//! an acknowledged write (a reply waits for the flush of whole records).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::domain::audit::{Auditor, PointsTotals, ProductAudit};
use crate::domain::ShardId;
use crate::storage::{Storage, StorageError, StorageOptions};

#[derive(Debug, Clone, Serialize)]
pub struct ProductReport {
    /// `id` and the key counts, as the online audit reports them.
    #[serde(flatten)]
    pub counts: ProductAudit,
    pub shards: u16,
    pub orders: u64,
    /// Journal records after the snapshots (what a start would replay).
    pub journal_records: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OfflineReport {
    pub ok: bool,
    pub products: Vec<ProductReport>,
    pub orders: BTreeMap<String, u64>,
    /// Repairable damage that recovery will fix.
    pub findings: Vec<String>,
    /// Journal records the commit log held that their journals' own files had
    /// lost (a crash of the machine), written into them when the audit opened the
    /// directory.
    pub redone: u64,
    pub violations: Vec<String>,
    pub points: PointsTotals,
    /// The coupon shards' counts (checked against delivered orders).
    pub coupons: crate::domain::coupon::CouponAudit,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{0} is not a kami data directory (no sled database there)")]
    NotADataDir(String),
    #[error("cannot open {path}: {error} (is a server running on it?)")]
    Open { path: String, error: StorageError },
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: StorageError },
    #[error("cannot read {path}: the storage engine failed on it ({message}); the directory is damaged")]
    Damaged { path: String, message: String },
    #[error(
        "{path} keeps its stock in {backend}, not in the directory: audit a running server (GET /api/v1/admin/audit)"
    )]
    StockElsewhere { path: String, backend: String },
}

/// Audits the data directory at `path`. Opening takes sled's lock, so this fails
/// while a server uses the directory. A directory so damaged that the storage
/// engine panics reading it (a truncated `db` file) is an error, not a crash.
pub fn audit_dir(path: &Path) -> Result<OfflineReport, AuditError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| audit_dir_unguarded(path))).unwrap_or_else(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("panic")
            .to_string();
        Err(AuditError::Damaged { path: path.display().to_string(), message })
    })
}

fn audit_dir_unguarded(path: &Path) -> Result<OfflineReport, AuditError> {
    let shown = path.display().to_string();
    if !path.join("conf").is_file() {
        return Err(AuditError::NotADataDir(shown));
    }
    let storage = Storage::open(&StorageOptions {
        path: path.to_path_buf(),
        cache_capacity_bytes: 64 << 20,
        max_pending_commits: 1,
        max_commit_batch: 1,
        commit_linger: Duration::ZERO,
        commit_busy_linger: Duration::ZERO,
    })
    .map_err(|error| AuditError::Open { path: shown.clone(), error })?;
    let read_err = |error| AuditError::Read { path: shown.clone(), error };
    match storage.stock_backend().map_err(read_err)? {
        Some(backend) if backend != "local" => return Err(AuditError::StockElsewhere { path: shown, backend }),
        _ => {}
    }
    let mut products = storage.load_products().map_err(read_err)?;
    products.sort_by(|a, b| a.id.cmp(&b.id));

    let (mut findings, mut violations) = (Vec::new(), Vec::new());
    // Points first (see `Auditor` for why the order matters).
    let points = ledger_audits(
        &storage,
        crate::actors::points::POINTS_SHARDS,
        &mut findings,
        &mut violations,
        |b: &crate::domain::points::PointsBook| b.audit(),
    );
    let coupons = ledger_audits(
        &storage,
        crate::actors::coupons::COUPON_SHARDS,
        &mut findings,
        &mut violations,
        |b: &crate::domain::coupon::CouponBook| b.audit(),
    );
    let mut auditor = Auditor::new();
    auditor.add_coupons(coupons);
    violations.into_iter().for_each(|v| auditor.violation(v));
    let mut extras = Vec::new();
    for product in &products {
        let mut journal_records = 0;
        let mut audits = Vec::with_capacity(product.shards as usize);
        for shard in 0..product.shards {
            let id = ShardId::new(product.id.clone(), shard);
            match storage.inspect(&id, product) {
                Ok(r) => {
                    findings.extend(r.findings.iter().map(|f| format!("{id}: {f}")));
                    journal_records += r.replayed;
                    audits.push(r.shard.audit());
                }
                Err(e) => auditor.violation(format!("{id}: {e}")),
            }
        }
        let complete = audits.len() == product.shards as usize;
        auditor.add_product(&product.id, audits, complete);
        extras.push((product.shards, journal_records));
    }
    for id in storage.journal_shards() {
        let known = products.iter().any(|p| p.id == id.product && id.shard < p.shards);
        if !known {
            auditor.violation(format!("journal {id} belongs to no product"));
        }
    }
    let report = auditor.finish(points);
    Ok(OfflineReport {
        ok: report.ok,
        products: report
            .products
            .into_iter()
            .zip(extras)
            .map(|(counts, (shards, journal_records))| ProductReport {
                orders: counts.orders,
                counts,
                shards,
                journal_records,
            })
            .collect(),
        orders: report.orders.into_iter().map(|(status, n)| (status.as_str().to_string(), n)).collect(),
        findings,
        redone: storage.redone_at_open(),
        violations: report.violations,
        points: report.points,
        coupons: report.coupons,
    })
}

/// Every shard of one kind of ledger (points, coupons) inspected and audited; a
/// torn tail is a finding, a ledger that cannot be read a violation.
fn ledger_audits<B: crate::storage::Ledger, A>(
    storage: &Storage,
    shards: u16,
    findings: &mut Vec<String>,
    violations: &mut Vec<String>,
    audit: impl Fn(&B) -> A,
) -> Vec<A> {
    let mut audits = Vec::with_capacity(shards as usize);
    for shard in 0..shards {
        match storage.inspect_ledger::<B>(shard) {
            Ok(crate::storage::LedgerRecovered { book, torn, .. }) => {
                if let Some((seq, error)) = torn {
                    findings.push(format!("{}/{shard}: torn tail from record {seq}: {error}", B::NAME));
                }
                audits.push(audit(&book));
            }
            Err(e) => violations.push(format!("{}/{shard}: {e}", B::NAME)),
        }
    }
    audits
}

impl std::fmt::Display for OfflineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for p in &self.products {
            let c = &p.counts;
            writeln!(
                f,
                "product {}: {} shard(s); imported {} = available {} + reserved {} + sold {} + in transit {}; {} orders ({} archived); {} journal records after snapshots",
                c.id, p.shards, c.imported, c.available, c.reserved, c.sold, c.in_transit, p.orders, c.orders_archived, p.journal_records
            )?;
        }
        let orders: Vec<String> = self.orders.iter().map(|(s, n)| format!("{s} {n}")).collect();
        writeln!(f, "orders: {}", orders.join(", "))?;
        let p = &self.points;
        writeln!(
            f,
            "points: {} buyers, balance {} (held {}), {} redemptions settled",
            p.buyers, p.total_balance, p.total_held, p.redemptions_settled
        )?;
        let c = &self.coupons;
        writeln!(f, "coupons: {}, uses held {}, used {}, released {}", c.coupons, c.held, c.used, c.released)?;
        if self.redone > 0 {
            writeln!(f, "commit log: {} journal record(s) the journals' files lacked, written into them", self.redone)?;
        }
        for x in &self.findings {
            writeln!(f, "finding (repaired at next start): {x}")?;
        }
        for v in &self.violations {
            writeln!(f, "VIOLATION: {v}")?;
        }
        if self.ok {
            writeln!(
                f,
                "ok: no oversell, no key sold twice, stock adds up, every payment accounted for, journals consistent"
            )
        } else {
            writeln!(f, "FAILED: {} violation(s)", self.violations.len())
        }
    }
}
