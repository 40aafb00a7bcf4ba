//! A circuit breaker for one payment channel, as a pure state machine.
//!
//! * **Closed**: calls go through. It opens after `max_consecutive_failures`
//!   failures in a row, or when at least `min_calls` calls within the last
//!   `window_ms` failed at `failure_rate_percent` or more.
//! * **Open**: calls are refused until `cooldown_ms` have passed since it opened.
//! * **Half-open**: one probe call is let through; its success closes the breaker
//!   (with a fresh window), its failure opens it again for another cool-down.
//!
//! The caller asks [`Breaker::try_call`] before a call and reports the result with
//! [`Breaker::record`]. Time is passed in; nothing here reads a clock.

use std::collections::VecDeque;

use super::Millis;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerConfig {
    pub max_consecutive_failures: u32,
    pub failure_rate_percent: u32,
    pub min_calls: u32,
    pub window_ms: Millis,
    pub cooldown_ms: Millis,
    /// Most call results remembered for the rate (older ones are dropped first).
    pub max_window_calls: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open { since_ms: Millis },
    HalfOpen { probe_in_flight: bool },
}

impl BreakerState {
    pub fn name(&self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open { .. } => "open",
            BreakerState::HalfOpen { .. } => "half_open",
        }
    }

    /// For gauges: 0 closed, 1 half-open, 2 open.
    pub fn level(&self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen { .. } => 1,
            BreakerState::Open { .. } => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Breaker {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    /// (when, succeeded) of recent calls, oldest first.
    window: VecDeque<(Millis, bool)>,
    opened_total: u64,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        assert!(config.max_consecutive_failures >= 1 && config.min_calls >= 1 && config.max_window_calls >= 1);
        assert!((1..=100).contains(&config.failure_rate_percent));
        Breaker {
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            window: VecDeque::new(),
            opened_total: 0,
        }
    }

    /// The state at `now_ms` (an open breaker past its cool-down reads half-open).
    pub fn state(&self, now_ms: Millis) -> BreakerState {
        match self.state {
            BreakerState::Open { since_ms } if now_ms >= since_ms.saturating_add(self.config.cooldown_ms) => {
                BreakerState::HalfOpen { probe_in_flight: false }
            }
            s => s,
        }
    }

    /// How many times it has opened.
    pub fn opened_total(&self) -> u64 {
        self.opened_total
    }

    /// Whether new work should be routed here (closed, or half-open with no probe out).
    pub fn is_available(&self, now_ms: Millis) -> bool {
        matches!(self.state(now_ms), BreakerState::Closed | BreakerState::HalfOpen { probe_in_flight: false })
    }

    /// Asks to make a call now. `true` = go ahead (and report it with `record`).
    pub fn try_call(&mut self, now_ms: Millis) -> bool {
        self.state = self.state(now_ms);
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open { .. } | BreakerState::HalfOpen { probe_in_flight: true } => false,
            BreakerState::HalfOpen { probe_in_flight: false } => {
                self.state = BreakerState::HalfOpen { probe_in_flight: true };
                true
            }
        }
    }

    /// Reports the result of a call allowed by `try_call`.
    pub fn record(&mut self, now_ms: Millis, succeeded: bool) {
        match self.state {
            BreakerState::HalfOpen { .. } => {
                if succeeded {
                    self.state = BreakerState::Closed;
                    self.consecutive_failures = 0;
                    self.window.clear();
                } else {
                    self.open(now_ms);
                }
                return;
            }
            // A late answer to a call made before the breaker opened.
            BreakerState::Open { .. } => return,
            BreakerState::Closed => {}
        }
        self.consecutive_failures = if succeeded { 0 } else { self.consecutive_failures + 1 };
        self.window.push_back((now_ms, succeeded));
        let horizon = now_ms.saturating_sub(self.config.window_ms);
        while self.window.front().is_some_and(|&(at, _)| at < horizon)
            || self.window.len() > self.config.max_window_calls
        {
            self.window.pop_front();
        }
        let calls = self.window.len() as u64;
        let failures = self.window.iter().filter(|(_, ok)| !ok).count() as u64;
        let rate_tripped =
            calls >= self.config.min_calls as u64 && failures * 100 >= calls * self.config.failure_rate_percent as u64;
        if self.consecutive_failures >= self.config.max_consecutive_failures || rate_tripped {
            self.open(now_ms);
        }
    }

    fn open(&mut self, now_ms: Millis) {
        self.state = BreakerState::Open { since_ms: now_ms };
        self.opened_total += 1;
        self.consecutive_failures = 0;
        self.window.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            max_consecutive_failures: 3,
            failure_rate_percent: 50,
            min_calls: 10,
            window_ms: 10_000,
            cooldown_ms: 1_000,
            max_window_calls: 100,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let mut b = Breaker::new(config());
        for t in 0..2 {
            assert!(b.try_call(t));
            b.record(t, false);
        }
        assert_eq!(b.state(2), BreakerState::Closed);
        assert!(b.try_call(2));
        b.record(2, false);
        assert_eq!(b.state(3), BreakerState::Open { since_ms: 2 });
        assert!(!b.try_call(500) && !b.is_available(500));
        // Cool-down over: exactly one probe.
        assert!(b.is_available(1_002));
        assert!(b.try_call(1_002));
        assert!(!b.try_call(1_003), "one probe at a time");
        assert!(!b.is_available(1_003));
        b.record(1_010, false);
        assert_eq!(b.state(1_011), BreakerState::Open { since_ms: 1_010 });
        assert!(b.try_call(2_010));
        b.record(2_020, true);
        assert_eq!(b.state(2_021), BreakerState::Closed);
        assert_eq!(b.opened_total(), 2);
    }

    #[test]
    fn opens_on_failure_rate_within_the_window_only() {
        let mut b = Breaker::new(config());
        // Alternating: never 3 in a row, but 50 % failures once 10 calls are seen.
        for i in 0..9u64 {
            assert!(b.try_call(i));
            b.record(i, i % 2 == 0);
        }
        assert_eq!(b.state(9), BreakerState::Closed, "fewer than min_calls");
        b.record(9, false);
        assert!(matches!(b.state(10), BreakerState::Open { .. }));

        // The same failures spread beyond the window never trip it.
        let mut slow = Breaker::new(config());
        for i in 0..40u64 {
            let at = i * 6_000;
            assert!(slow.try_call(at));
            slow.record(at, i % 2 == 0);
        }
        assert_eq!(slow.state(240_000), BreakerState::Closed);
    }

    #[test]
    fn a_late_answer_while_open_changes_nothing() {
        let mut b = Breaker::new(config());
        for t in 0..3 {
            b.try_call(t);
            b.record(t, false);
        }
        b.record(4, true);
        assert_eq!(b.state(5), BreakerState::Open { since_ms: 2 });
    }
}
