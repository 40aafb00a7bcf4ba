//! The last minutes of the process, second by second, for the status page's
//! charts: orders, deliveries and refusals per second, order-creation latency and
//! paid-to-delivered latency (p50, p99). One sampler thread for the process takes
//! a sample every second into a ring of [`HISTORY_SECS`] samples (bounded: about
//! 30 KB), so a page opened in the middle of a sale shows the minutes before.
//!
//! Latencies are counted lock-free into log-scale buckets (four per power of two
//! of microseconds, so a quantile is known within 19 %); a sample's quantiles are
//! those of the requests answered during its second.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Samples kept: five minutes at one a second.
pub const HISTORY_SECS: usize = 300;
const SUB_BUCKETS: usize = 4;
/// Up to 2^32 µs (71 minutes): anything longer is counted in the last bucket.
const BUCKETS: usize = 32 * SUB_BUCKETS;

/// A latency distribution counted into log-scale buckets.
pub struct Latencies {
    buckets: [AtomicU64; BUCKETS],
}

impl Latencies {
    pub const fn new() -> Latencies {
        Latencies { buckets: [const { AtomicU64::new(0) }; BUCKETS] }
    }

    pub fn record(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    fn counts(&self) -> [u64; BUCKETS] {
        std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed))
    }
}

impl Default for Latencies {
    fn default() -> Self {
        Self::new()
    }
}

/// Bucket `4·e + m` holds [2^e·(4+m)/4, 2^e·(5+m)/4) µs, for e ≥ 2; below 4 µs one bucket per µs.
fn bucket_of(us: u64) -> usize {
    if us < SUB_BUCKETS as u64 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    let m = ((us >> (e - 2)) & 3) as usize;
    (e * SUB_BUCKETS + m).min(BUCKETS - 1)
}

/// The upper end of bucket `i`, in milliseconds.
fn bucket_upper_ms(i: usize) -> f64 {
    let (e, m) = (i / SUB_BUCKETS, i % SUB_BUCKETS);
    let us = if i < SUB_BUCKETS {
        (i + 1) as f64
    } else if e < 2 {
        SUB_BUCKETS as f64 // not used: below 4 µs every µs has its own bucket
    } else {
        (1u64 << e) as f64 * (SUB_BUCKETS + m + 1) as f64 / SUB_BUCKETS as f64
    };
    us / 1000.0
}

/// The `q` quantile (0..=1) of what `counts` holds, in ms; `None` when it is empty.
fn quantile(counts: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
    let mut seen = 0;
    for (i, &n) in counts.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bucket_upper_ms(i));
        }
    }
    Some(bucket_upper_ms(BUCKETS - 1))
}

/// Order creation, from the request's arrival to its answer (every answer).
pub static CREATE_LATENCY: Latencies = Latencies::new();
/// From hearing of a payment to its durable delivery.
pub static PAID_TO_DELIVERED: Latencies = Latencies::new();

/// One second of the process.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// The end of the second, Unix ms.
    pub at_ms: u64,
    pub orders_per_sec: f64,
    pub delivered_per_sec: f64,
    /// Requests refused for limits and capacity (`kami_rejected_total`).
    pub refused_per_sec: f64,
    pub create_p50_ms: Option<f64>,
    pub create_p99_ms: Option<f64>,
    pub paid_to_delivered_p50_ms: Option<f64>,
    pub paid_to_delivered_p99_ms: Option<f64>,
}

/// What the previous sample saw, to take differences from.
struct Seen {
    at: Instant,
    created: u64,
    delivered: u64,
    refused: u64,
    create: [u64; BUCKETS],
    paid: [u64; BUCKETS],
}

impl Seen {
    fn now() -> Seen {
        let (created, delivered) = super::order_totals();
        Seen {
            at: Instant::now(),
            created,
            delivered,
            refused: super::rejections().map(|(_, n)| n).sum(),
            create: CREATE_LATENCY.counts(),
            paid: PAID_TO_DELIVERED.counts(),
        }
    }
}

struct History {
    seen: Option<Seen>,
    samples: VecDeque<Sample>,
}

static HISTORY: Mutex<History> = Mutex::new(History { seen: None, samples: VecDeque::new() });

/// Starts the process's sampler thread (once; later calls do nothing).
pub fn start_sampler() {
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        sample();
        std::thread::Builder::new()
            .name("kami-history".into())
            .spawn(|| loop {
                std::thread::sleep(Duration::from_secs(1));
                sample();
            })
            .expect("spawn the history sampler");
    });
}

/// Takes one sample: the differences since the last one, per second.
fn sample() {
    let now = Seen::now();
    let mut h = HISTORY.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(before) = h.seen.replace(now) {
        let now = h.seen.as_ref().expect("just set");
        let secs = now.at.duration_since(before.at).as_secs_f64().max(0.001);
        let per_sec = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
        let delta = |a: &[u64; BUCKETS], b: &[u64; BUCKETS]| -> [u64; BUCKETS] {
            std::array::from_fn(|i| a[i].saturating_sub(b[i]))
        };
        let create = delta(&now.create, &before.create);
        let paid = delta(&now.paid, &before.paid);
        let at_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let s = Sample {
            at_ms,
            orders_per_sec: per_sec(now.created, before.created),
            delivered_per_sec: per_sec(now.delivered, before.delivered),
            refused_per_sec: per_sec(now.refused, before.refused),
            create_p50_ms: quantile(&create, 0.50),
            create_p99_ms: quantile(&create, 0.99),
            paid_to_delivered_p50_ms: quantile(&paid, 0.50),
            paid_to_delivered_p99_ms: quantile(&paid, 0.99),
        };
        if h.samples.len() == HISTORY_SECS {
            h.samples.pop_front();
        }
        h.samples.push_back(s);
    }
}

/// The samples kept, oldest first.
pub fn history() -> Vec<Sample> {
    HISTORY.lock().unwrap_or_else(|e| e.into_inner()).samples.iter().cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_falls_in_a_bucket_whose_upper_end_is_within_a_quarter_above_it() {
        for us in [0u64, 1, 3, 4, 5, 7, 8, 1_000, 1_234, 99_999, 1_000_000, 5_000_000_000] {
            let i = bucket_of(us);
            let upper_us = bucket_upper_ms(i) * 1000.0;
            assert!(upper_us > us as f64 || i == BUCKETS - 1, "{us} µs in bucket {i} ending at {upper_us}");
            assert!(upper_us <= (us as f64 * 1.25).max(us as f64 + 1.0) || i == BUCKETS - 1, "{us} µs: {upper_us}");
            if i > 0 {
                assert!(bucket_upper_ms(i - 1) * 1000.0 <= us as f64, "{us} µs belongs to an earlier bucket");
            }
        }
    }

    #[test]
    fn quantiles_are_read_from_the_buckets() {
        let l = Latencies::new();
        assert_eq!(quantile(&l.counts(), 0.5), None);
        for _ in 0..98 {
            l.record(Duration::from_micros(1_000));
        }
        l.record(Duration::from_millis(200));
        l.record(Duration::from_millis(200));
        let c = l.counts();
        let p50 = quantile(&c, 0.5).unwrap();
        assert!((1.0..=1.25).contains(&p50), "{p50}");
        let p99 = quantile(&c, 0.99).unwrap();
        assert!((200.0..=250.0).contains(&p99), "{p99}");
    }
}
