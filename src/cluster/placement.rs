//! Placement by rendezvous (highest random weight) hashing: a shard goes to the
//! live node whose weight with it is highest. Every node computes the same answer
//! from the same list of live nodes, with nothing to coordinate; a node that joins
//! takes only its share (each shard it wins moves to it, nothing else moves), and a
//! node that leaves gives away only its own shards.

use sha2::{Digest, Sha256};

/// The weight of `node` for `item`: the first 8 bytes of SHA-256 over both (stable
/// across builds and platforms, unlike the standard library's hasher).
pub fn weight(node: &str, item: &str) -> u64 {
    let mut hash = Sha256::new();
    hash.update((node.len() as u64).to_le_bytes());
    hash.update(node.as_bytes());
    hash.update(item.as_bytes());
    u64::from_le_bytes(hash.finalize()[..8].try_into().expect("8 bytes"))
}

/// The node among `nodes` that should own `item` (`None` when there is none). Ties
/// (equal weights) go to the smaller name, so the answer never depends on order.
pub fn owner<'a, S: AsRef<str>>(item: &str, nodes: &'a [S]) -> Option<&'a str> {
    nodes.iter().map(|n| n.as_ref()).max_by(|a, b| weight(a, item).cmp(&weight(b, item)).then_with(|| b.cmp(a)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn items(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("stock.{}.{}", i / 4, i % 4)).collect()
    }

    #[test]
    fn shards_spread_evenly_over_nodes() {
        let nodes = ["a", "b", "c"];
        let mut counts = [0usize; 3];
        for item in items(3000) {
            let o = owner(&item, &nodes).unwrap();
            counts[nodes.iter().position(|n| *n == o).unwrap()] += 1;
        }
        for c in counts {
            assert!((850..=1150).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn no_node_no_owner() {
        assert_eq!(owner::<&str>("stock.1.0", &[]), None);
    }

    proptest! {
        #[test]
        fn every_node_agrees_whatever_order_it_lists_the_others_in(
            mut nodes in proptest::collection::vec("[a-z]{1,6}", 1..8),
            item in "[a-z0-9.]{1,20}",
        ) {
            let first = owner(&item, &nodes).map(str::to_owned);
            nodes.reverse();
            prop_assert_eq!(first.as_deref(), owner(&item, &nodes));
        }

        #[test]
        fn a_node_joining_takes_only_what_it_wins_and_leaving_gives_back_only_its_own(
            nodes in proptest::collection::btree_set("[a-z]{1,6}", 1..8),
            joining in "[A-Z]{1,6}",
        ) {
            let before: Vec<String> = nodes.into_iter().collect();
            let mut after = before.clone();
            after.push(joining.clone());
            for item in items(200) {
                let was = owner(&item, &before).unwrap();
                let now = owner(&item, &after).unwrap();
                // Joining: an item moves only to the new node.
                prop_assert!(now == was || now == joining);
                // Leaving (after → before): only the leaving node's items move.
                if now != joining {
                    prop_assert_eq!(was, now);
                }
            }
        }
    }
}
