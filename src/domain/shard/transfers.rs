//! Keys moving between the sibling shards of one product.

use super::*;

/// Keys moving between the shards of one product: a shard that runs dry borrows
/// from a sibling. The two shards have separate journals and no shared
/// transaction, so a transfer is three journaled steps, each safe to crash after:
///
/// 1. the lender journals [`Event::KeysLent`]: the keys leave its available queue
///    and wait in `unsettled` (they are then in no shard's stock: "in transit");
/// 2. the borrower journals [`Event::KeysReceived`]: they join its available queue.
///    A borrower accepts each `(from, transfer)` once, so the lender may resend;
/// 3. the lender journals [`Event::TransferSettled`].
///
/// A crash between 1 and 3 leaves the transfer unsettled; the lender's unsettled
/// transfers are resent until settled (at start-up and periodically), so keys in
/// transit always arrive exactly once. A lent key stays known to its lender (in
/// `away`), which keeps import deduplication exact and lets the key come back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Transfers {
    /// Sequence of this shard's next outgoing transfer.
    pub(super) next: u64,
    /// Lent, not yet settled: transfer → (borrower shard, keys).
    pub(super) unsettled: BTreeMap<u64, (u16, Vec<KeyId>)>,
    /// Keys this shard knows that are now held by a sibling.
    pub(super) away: HashSet<KeyId>,
    /// `(from, transfer)` of every transfer received (one entry per transfer, not per key).
    pub(super) received: std::collections::BTreeSet<(u16, u64)>,
    /// Keys first known here by a transfer rather than an import.
    pub(super) received_new: u64,
}

/// A lent batch of keys on its way to the borrower.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OutgoingTransfer {
    pub from: u16,
    pub transfer: u64,
    pub to: u16,
    pub keys: Vec<String>,
}

impl Shard {
    /// Lends up to `max_keys` available keys to sibling `to`: half of what this shard
    /// has (rounded up), so a lender keeps stock for its own buyers. `None` when it
    /// has none to lend.
    pub fn lend(&mut self, to: u16, max_keys: usize) -> Option<(Event, OutgoingTransfer)> {
        assert!(to != self.shard && to < self.product.shards, "lend to a sibling");
        let most = self.available.len().div_ceil(2).min(max_keys).min(MAX_KEYS_PER_EVENT);
        // The borrower journals the keys themselves: at most
        // `MAX_KEY_BYTES_PER_EVENT` of them (one record within a stream message).
        let (mut n, mut bytes) = (0, 0);
        for &k in self.available.range(self.available.len() - most..).rev() {
            let len = self.stored_key(k).len();
            if n > 0 && bytes + len > MAX_KEY_BYTES_PER_EVENT {
                break;
            }
            (n, bytes) = (n + 1, bytes + len);
        }
        if n == 0 {
            return None;
        }
        let start = self.available.len() - n;
        let keys: Vec<KeyId> = self.available.range(start..).copied().collect();
        let transfer = self.transfers.next;
        let event = Event::KeysLent { transfer, to, keys };
        self.apply(&event);
        Some((event, self.outgoing(transfer)))
    }

    fn outgoing(&self, transfer: u64) -> OutgoingTransfer {
        let (to, keys) = &self.transfers.unsettled[&transfer];
        OutgoingTransfer {
            from: self.shard,
            transfer,
            to: *to,
            keys: keys.iter().map(|&k| self.stored_key(k).to_string()).collect(),
        }
    }

    /// Lent transfers not yet settled, oldest first (to resend), at most `limit`.
    pub fn unsettled(&self, limit: usize) -> Vec<OutgoingTransfer> {
        self.transfers.unsettled.keys().take(limit).map(|&t| self.outgoing(t)).collect()
    }

    /// Takes in keys lent by a sibling; a transfer already received is a repeat.
    /// Panics (a broken step: the actor rebuilds) if a key would be in stock twice.
    pub fn receive(&mut self, t: OutgoingTransfer) -> Outcome<()> {
        assert!(t.to == self.shard && t.from != self.shard && t.from < self.product.shards);
        assert!(t.keys.len() <= MAX_KEYS_PER_EVENT);
        if self.transfers.received.contains(&(t.from, t.transfer)) {
            return Outcome::Repeat(());
        }
        let event = Event::KeysReceived { from: t.from, transfer: t.transfer, keys: t.keys };
        self.apply(&event);
        Outcome::Changed(event, ())
    }

    /// The borrower holds the keys of `transfer`.
    pub fn settle(&mut self, transfer: u64) -> Outcome<()> {
        if !self.transfers.unsettled.contains_key(&transfer) {
            return Outcome::Repeat(());
        }
        let event = Event::TransferSettled { transfer };
        self.apply(&event);
        Outcome::Changed(event, ())
    }
}
