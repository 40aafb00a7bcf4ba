//! Which payment channel a new order goes to, as a pure function.
//!
//! The healthiest channels win (breaker closed, then half-open, then open: an
//! order is still better off with a channel that may recover before it expires
//! than with none); among those, the lowest `priority` value; among equals, one
//! is drawn by `weight` with the caller's random `roll`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// 0 closed, 1 half-open, 2 open (see [`super::breaker::BreakerState::level`]).
    pub level: u8,
    pub priority: u32,
    pub weight: u32,
}

/// The index of the chosen candidate; `None` only when there are none. Takes an
/// iterator (walked a few times) so the order path builds no list per order.
pub fn choose(candidates: impl Iterator<Item = Candidate> + Clone, roll: u64) -> Option<usize> {
    let best = candidates.clone().map(|c| (c.level, c.priority)).min()?;
    let tier = || candidates.clone().enumerate().filter(move |(_, c)| (c.level, c.priority) == best);
    let total: u64 = tier().map(|(_, c)| c.weight as u64).sum();
    if total == 0 {
        return tier().map(|(i, _)| i).next();
    }
    let mut point = roll % total;
    for (i, c) in tier() {
        if point < c.weight as u64 {
            return Some(i);
        }
        point -= c.weight as u64;
    }
    unreachable!("point < total weight of the tier")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(level: u8, priority: u32, weight: u32) -> Candidate {
        Candidate { level, priority, weight }
    }

    #[test]
    fn healthiest_then_lowest_priority_wins() {
        assert_eq!(choose([].into_iter(), 7), None);
        // A is preferred by priority but open: B (closed) takes the order.
        assert_eq!(choose([c(2, 0, 1), c(0, 5, 1)].into_iter(), 0), Some(1));
        // Both closed: priority decides whatever the roll.
        for roll in 0..10 {
            assert_eq!(choose([c(0, 1, 9), c(0, 0, 1)].into_iter(), roll), Some(1));
        }
        // Half-open beats open.
        assert_eq!(choose([c(2, 0, 1), c(1, 9, 1)].into_iter(), 3), Some(1));
        // All open: still a channel.
        assert_eq!(choose([c(2, 3, 1), c(2, 1, 1)].into_iter(), 3), Some(1));
    }

    #[test]
    fn equals_share_by_weight() {
        let cands = [c(0, 0, 1), c(0, 0, 3), c(1, 0, 100)];
        let mut hits = [0; 3];
        for roll in 0..4000 {
            hits[choose(cands.into_iter(), roll).unwrap()] += 1;
        }
        assert_eq!(hits, [1000, 3000, 0]);
        // Zero weights: the first of the tier.
        assert_eq!(choose([c(0, 0, 0), c(0, 0, 0)].into_iter(), 5), Some(0));
    }
}
