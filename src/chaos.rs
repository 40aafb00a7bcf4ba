//! Fault injection for chaos tests. Two tools, both off unless `chaos.enabled`:
//!
//! * **Actor kills** ([`KillTarget`], used by `POST /api/v1/admin/chaos/kill` and by
//!   [`crate::core::Kami::chaos_kill`]): an actor drops its memory and stops at a
//!   message boundary; its supervisor rebuilds it from storage.
//! * **Crash points** (`chaos.crash_point` + `chaos.crash_after_hits`): the process
//!   kills itself with SIGKILL the n-th time it reaches a named point of the
//!   durability protocol, so tests can land a `kill -9` exactly during a group
//!   flush or between a snapshot and the trim that follows it — instants a kill
//!   from outside only hits by luck.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use serde::Deserialize;

/// An actor to kill, as named in the chaos API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillTarget {
    /// Every stock actor of a product (`product:<id>`), or one shard (`product:<id>#<n>`).
    Product { id: String, shard: Option<u16> },
    /// The product supervisor (`orders`: it was named for orders once; the name stays for compatibility).
    Orders,
    /// The payment supervisor (`payments`).
    Payments,
    /// Every points actor (`points`).
    Points,
    /// Every coupon actor (`coupons`).
    Coupons,
    /// One actor picked at random among all of the above (`random`).
    Random,
}

impl std::str::FromStr for KillTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<KillTarget, String> {
        match s {
            "orders" => Ok(KillTarget::Orders),
            "payments" => Ok(KillTarget::Payments),
            "points" => Ok(KillTarget::Points),
            "coupons" => Ok(KillTarget::Coupons),
            "random" => Ok(KillTarget::Random),
            _ => {
                let rest = s.strip_prefix("product:").ok_or_else(|| {
                    format!("actor: {s:?} is not one of \"product:<id>\", \"product:<id>#<shard>\", \"orders\", \"payments\", \"points\", \"coupons\", \"random\"")
                })?;
                let (id, shard) = match rest.split_once('#') {
                    None => (rest, None),
                    Some((id, n)) => {
                        (id, Some(n.parse::<u16>().map_err(|_| format!("actor: bad shard number {n:?}"))?))
                    }
                };
                crate::domain::validate::product_id(id).map_err(|e| format!("actor: {e}"))?;
                Ok(KillTarget::Product { id: id.to_string(), shard })
            }
        }
    }
}

/// A point of the durability protocol where the process can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashPoint {
    None,
    /// A group commit has collected its batch; nothing of it is flushed.
    BeforeFlush,
    /// The flush returned; nobody waiting on it has been answered yet.
    AfterFlush,
    /// A snapshot is written and flushed; the trim it allows has not started.
    AfterSnapshot,
    /// Older snapshots are removed and flushed; the journal is not trimmed yet.
    MidTrim,
}

impl std::fmt::Display for CrashPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            CrashPoint::None => "none",
            CrashPoint::BeforeFlush => "before_flush",
            CrashPoint::AfterFlush => "after_flush",
            CrashPoint::AfterSnapshot => "after_snapshot",
            CrashPoint::MidTrim => "mid_trim",
        };
        f.write_str(name)
    }
}

struct Armed {
    point: CrashPoint,
    hits_left: AtomicU64,
}

static ARMED: OnceLock<Armed> = OnceLock::new();

/// Arms a crash point for this process (once; later calls are ignored). Only the
/// binary does this: crash points end the whole process, tests included.
pub fn arm(point: CrashPoint, after_hits: u64) {
    assert!(after_hits >= 1);
    if point != CrashPoint::None {
        let _ = ARMED.set(Armed { point, hits_left: AtomicU64::new(after_hits) });
    }
}

/// Marks that `point` is reached. If it is the armed point and its hit count is
/// used up, runs `persist` (to make the state before the crash durable, where the
/// point is about a durable intermediate state) and kills the process.
pub fn reached(point: CrashPoint, persist: impl FnOnce()) {
    let Some(armed) = ARMED.get() else { return };
    if armed.point != point {
        return;
    }
    if armed.hits_left.fetch_sub(1, Ordering::SeqCst) == 1 {
        persist();
        eprintln!("kami: chaos crash point {point} reached; killing the process");
        die();
    }
}

fn die() -> ! {
    #[cfg(unix)]
    // SAFETY: kill(2) on our own pid has no memory-safety preconditions.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_as_documented() {
        assert_eq!("orders".parse(), Ok(KillTarget::Orders));
        assert_eq!("payments".parse(), Ok(KillTarget::Payments));
        assert_eq!("random".parse(), Ok(KillTarget::Random));
        assert_eq!("coupons".parse(), Ok(KillTarget::Coupons));
        assert_eq!("product:p1".parse(), Ok(KillTarget::Product { id: "p1".into(), shard: None }));
        assert_eq!("product:p1#3".parse(), Ok(KillTarget::Product { id: "p1".into(), shard: Some(3) }));
        for bad in ["", "product:", "product:P!", "product:p#x", "shard", "product:p#70000"] {
            assert!(bad.parse::<KillTarget>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn an_unarmed_or_other_point_does_nothing() {
        // No arm() in unit tests: reaching any point must return.
        let mut ran = false;
        reached(CrashPoint::BeforeFlush, || ran = true);
        assert!(!ran);
    }
}
