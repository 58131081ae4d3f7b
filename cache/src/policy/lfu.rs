use std::collections::{BTreeSet, HashMap};

use super::Policy;
use crate::ExpertKey;

/// Least-frequently-used: evicts the resident key with the fewest uses, the least recently used
/// of those on a tie.
///
/// Use counts outlive eviction: an expert's popularity is a property of the model and the text,
/// not of its time in the cache, so a popular expert that was squeezed out comes back with its
/// history (this is "perfect" LFU; the key space, layers x experts, is small and bounded).
pub struct LfuPolicy {
    /// Uses of every key ever seen: inserts (a demand miss is a use) plus hits.
    counts: HashMap<ExpertKey, u64>,
    /// Resident keys -> their `(count, tick)` in `order`.
    resident: HashMap<ExpertKey, (u64, u64)>,
    /// Resident keys, least frequent (then least recent) first.
    order: BTreeSet<(u64, u64, ExpertKey)>,
    /// Increases on every insert or hit; orders ties by recency.
    tick: u64,
}

impl LfuPolicy {
    pub fn new() -> Self {
        LfuPolicy { counts: HashMap::new(), resident: HashMap::new(), order: BTreeSet::new(), tick: 0 }
    }

    /// Records one use of `key` and (re)places it in the order.
    fn touch(&mut self, key: ExpertKey) {
        if let Some((count, tick)) = self.resident.remove(&key) {
            self.order.remove(&(count, tick, key));
        }
        let count = self.counts.entry(key).or_insert(0);
        *count += 1;
        self.tick += 1;
        self.resident.insert(key, (*count, self.tick));
        self.order.insert((*count, self.tick, key));
    }
}

impl Default for LfuPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for LfuPolicy {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn on_insert(&mut self, key: ExpertKey) {
        self.touch(key);
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.touch(key);
    }

    fn on_remove(&mut self, key: ExpertKey) {
        if let Some((count, tick)) = self.resident.remove(&key) {
            self.order.remove(&(count, tick, key));
        }
    }

    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey> {
        self.order.iter().map(|&(_, _, k)| k).find(|k| !skip(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::access;
    use crate::Cache;

    fn k(e: usize) -> ExpertKey {
        ExpertKey::new(0, e)
    }

    #[test]
    fn evicts_least_frequent_then_least_recent() {
        let mut p = LfuPolicy::new();
        for key in [k(0), k(1), k(2)] {
            p.on_insert(key);
        }
        p.on_hit(k(0));
        p.on_hit(k(2));
        // Counts: 0 -> 2, 1 -> 1, 2 -> 2.
        assert_eq!(p.victim(&|_| false), Some(k(1)));
        // Tie between 0 and 2 at count 2: 0 was used longer ago.
        assert_eq!(p.victim(&|key| *key == k(1)), Some(k(0)));
        assert_eq!(p.victim(&|_| true), None);
    }

    #[test]
    fn counts_survive_eviction() {
        // Capacity two entries of one byte each.
        let mut c: Cache<()> = Cache::new(2, Box::new(LfuPolicy::new()));
        let (mut hits, mut misses) = (0, 0);
        let mut demand = |c: &mut Cache<()>, key: ExpertKey| {
            if access(c, key, 1) {
                hits += 1;
            } else {
                misses += 1;
            }
        };
        // 0 is used three times, then pushed out by 1 and 2 (count 1 each, 2 evicts 1).
        for key in [k(0), k(0), k(0), k(1), k(2)] {
            demand(&mut c, key);
        }
        assert!(c.contains(&k(0)) && c.contains(&k(2)));
        // 3 evicts 2, the only count-1 entry: 0 stays.
        demand(&mut c, k(3));
        assert!(c.contains(&k(0)) && c.contains(&k(3)));
        // Force 0 out through removal, bring it back: it returns with count 4 and outlives 3 and 4.
        c.remove(&k(0));
        demand(&mut c, k(0));
        demand(&mut c, k(4));
        assert!(c.contains(&k(0)) && c.contains(&k(4)) && !c.contains(&k(3)));
        assert_eq!((hits, misses), (2, 6));
    }
}
