use std::collections::HashMap;

use crate::{ExpertKey, Policy};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("{key} needs {bytes} bytes but the cache budget is {budget} bytes")]
    TooLarge { key: ExpertKey, bytes: u64, budget: u64 },
    #[error("no room for {key} ({bytes} bytes): {locked} of {budget} budget bytes are pinned or protected")]
    NoRoom { key: ExpertKey, bytes: u64, locked: u64, budget: u64 },
    #[error("{key} is already resident")]
    Resident { key: ExpertKey },
}

/// What the cache did, as opposed to what its users asked of it (hits and misses are counted by
/// [`crate::Tier`], the one place demand accesses happen).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub inserts: u64,
    pub evictions: u64,
    /// Bytes resident now.
    pub bytes: u64,
    /// Most bytes ever resident at once.
    pub peak_bytes: u64,
}

struct Entry<V> {
    value: V,
    bytes: u64,
    /// Users computing with the entry; it is never evicted while this is above 0.
    pins: u32,
}

/// A byte-budgeted map from expert keys to values, with a replacement policy. Pinned entries
/// (in use by a computation) are never evicted.
pub struct Cache<V> {
    budget: u64,
    entries: HashMap<ExpertKey, Entry<V>>,
    policy: Box<dyn Policy>,
    stats: CacheStats,
    /// Bytes of entries with `pins > 0`, kept as pins come and go.
    pinned_bytes: u64,
}

impl<V> Cache<V> {
    pub fn new(budget: u64, policy: Box<dyn Policy>) -> Self {
        Cache { budget, entries: HashMap::new(), policy, stats: CacheStats::default(), pinned_bytes: 0 }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    pub fn policy_name(&self) -> &'static str {
        self.policy.name()
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn contains(&self, key: &ExpertKey) -> bool {
        self.entries.contains_key(key)
    }

    /// Looks `key` up without telling the policy.
    pub fn peek(&self, key: &ExpertKey) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Bytes `key` occupies, if resident.
    pub fn bytes_of(&self, key: &ExpertKey) -> Option<u64> {
        self.entries.get(key).map(|e| e.bytes)
    }

    /// Tells the policy that resident `key` was used (a demand hit). Returns false if absent.
    pub fn touch(&mut self, key: &ExpertKey) -> bool {
        let present = self.entries.contains_key(key);
        if present {
            self.policy.on_hit(*key);
        }
        present
    }

    /// Pins a resident entry so that it cannot be evicted until unpinned. Returns false if absent.
    pub fn pin(&mut self, key: &ExpertKey) -> bool {
        match self.entries.get_mut(key) {
            Some(e) => {
                if e.pins == 0 {
                    self.pinned_bytes += e.bytes;
                }
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    pub fn unpin(&mut self, key: &ExpertKey) {
        if let Some(e) = self.entries.get_mut(key) {
            if e.pins == 1 {
                self.pinned_bytes -= e.bytes;
            }
            e.pins = e.pins.saturating_sub(1);
        }
    }

    pub fn is_pinned(&self, key: &ExpertKey) -> bool {
        self.entries.get(key).is_some_and(|e| e.pins > 0)
    }

    /// Bytes of pinned entries.
    pub fn pinned_bytes(&self) -> u64 {
        self.pinned_bytes
    }

    /// Evicts policy victims, neither pinned nor named by `protect`, until `bytes` more fit.
    /// All or nothing: when the unpinned, unprotected entries cannot free enough, nothing is
    /// evicted and the error says so. Returns the evicted entries.
    pub fn evict_for(
        &mut self,
        key: ExpertKey,
        bytes: u64,
        protect: &dyn Fn(&ExpertKey) -> bool,
    ) -> Result<Vec<(ExpertKey, V)>, CacheError> {
        if bytes > self.budget {
            return Err(CacheError::TooLarge { key, bytes, budget: self.budget });
        }
        let mut chosen: Vec<ExpertKey> = Vec::new();
        let mut freed = 0;
        while self.stats.bytes - freed + bytes > self.budget {
            let entries = &self.entries;
            let skip =
                |k: &ExpertKey| chosen.contains(k) || entries.get(k).is_none_or(|e| e.pins > 0) || protect(k);
            let Some(victim) = self.policy.victim(&skip) else {
                let locked = self.stats.bytes - freed;
                return Err(CacheError::NoRoom { key, bytes, locked, budget: self.budget });
            };
            freed += self.entries[&victim].bytes;
            chosen.push(victim);
        }
        let mut evicted = Vec::with_capacity(chosen.len());
        for victim in chosen {
            let e = self.entries.remove(&victim).expect("victims are resident");
            self.policy.on_remove(victim);
            self.stats.bytes -= e.bytes;
            self.stats.evictions += 1;
            evicted.push((victim, e.value));
        }
        Ok(evicted)
    }

    /// Inserts `value` (occupying `bytes`), which must fit without evicting anything (see
    /// [`Cache::evict_for`]), unpinned.
    pub fn insert(&mut self, key: ExpertKey, value: V, bytes: u64) -> Result<(), CacheError> {
        if self.entries.contains_key(&key) {
            return Err(CacheError::Resident { key });
        }
        if self.stats.bytes + bytes > self.budget {
            return Err(CacheError::NoRoom { key, bytes, locked: self.stats.bytes, budget: self.budget });
        }
        self.entries.insert(key, Entry { value, bytes, pins: 0 });
        self.policy.on_insert(key);
        self.stats.inserts += 1;
        self.stats.bytes += bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
        Ok(())
    }

    /// Removes `key` if resident (pinned or not).
    pub fn remove(&mut self, key: &ExpertKey) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.policy.on_remove(*key);
        self.stats.bytes -= e.bytes;
        if e.pins > 0 {
            self.pinned_bytes -= e.bytes;
        }
        Some(e.value)
    }
}

/// A demand access as a plain demand cache makes it (for policy tests): a hit touches the
/// entry; a miss evicts what it must and inserts. Returns whether it hit.
#[cfg(test)]
pub(crate) fn access(c: &mut Cache<()>, key: ExpertKey, bytes: u64) -> bool {
    if c.touch(&key) {
        return true;
    }
    c.evict_for(key, bytes, &|_| false).unwrap();
    c.insert(key, (), bytes).unwrap();
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LruPolicy;

    fn key(l: usize, e: usize) -> ExpertKey {
        ExpertKey::new(l, e)
    }

    #[test]
    fn stays_within_budget_and_counts() {
        let mut c: Cache<u32> = Cache::new(100, Box::new(LruPolicy::new()));
        for e in 0..10 {
            assert!(!c.touch(&key(0, e)));
            c.evict_for(key(0, e), 40, &|_| false).unwrap();
            c.insert(key(0, e), e as u32, 40).unwrap();
            assert!(c.stats().bytes <= 100);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.peek(&key(0, 9)), Some(&9));
        let s = c.stats();
        assert_eq!((s.inserts, s.evictions, s.peak_bytes), (10, 8, 80));
        assert_eq!(c.insert(key(0, 9), 1, 1), Err(CacheError::Resident { key: key(0, 9) }));
        assert!(matches!(c.insert(key(0, 1), 1, 40), Err(CacheError::NoRoom { .. })));
    }

    #[test]
    fn pinned_and_protected_entries_survive_and_failed_evictions_take_nothing() {
        let mut c: Cache<()> = Cache::new(100, Box::new(LruPolicy::new()));
        for e in 0..2 {
            c.insert(key(0, e), (), 50).unwrap();
        }
        assert!(c.pin(&key(0, 0)) && c.pin(&key(0, 0)));
        assert_eq!(c.pinned_bytes(), 50);
        let ev = c.evict_for(key(0, 2), 50, &|_| false).unwrap();
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![key(0, 1)]);
        c.insert(key(0, 2), (), 50).unwrap();
        // 0 is pinned, 2 protected: no room, and nothing was evicted trying.
        let err = c.evict_for(key(0, 3), 50, &|k| *k == key(0, 2)).unwrap_err();
        assert!(matches!(err, CacheError::NoRoom { locked: 100, .. }), "{err}");
        assert_eq!(c.len(), 2);
        c.unpin(&key(0, 0));
        assert!(c.is_pinned(&key(0, 0)));
        c.unpin(&key(0, 0));
        assert_eq!(c.pinned_bytes(), 0);
        c.evict_for(key(0, 3), 50, &|k| *k == key(0, 2)).unwrap();
        c.insert(key(0, 3), (), 50).unwrap();
        assert!(c.contains(&key(0, 2)) && c.contains(&key(0, 3)) && !c.contains(&key(0, 0)));
        assert_eq!(
            c.evict_for(key(1, 0), 101, &|_| false).unwrap_err(),
            CacheError::TooLarge { key: key(1, 0), bytes: 101, budget: 100 }
        );
        // Removing a pinned entry releases its pinned bytes.
        c.pin(&key(0, 3));
        c.remove(&key(0, 3));
        assert_eq!((c.pinned_bytes(), c.stats().bytes), (0, 50));
    }

    /// Several victims for one large entry: all chosen before any is removed.
    #[test]
    fn evicts_as_many_victims_as_needed_in_policy_order() {
        let mut c: Cache<u8> = Cache::new(100, Box::new(LruPolicy::new()));
        for e in 0..4 {
            c.insert(key(0, e), e as u8, 25).unwrap();
        }
        c.touch(&key(0, 0));
        let ev = c.evict_for(key(0, 9), 60, &|_| false).unwrap();
        assert_eq!(ev, vec![(key(0, 1), 1), (key(0, 2), 2), (key(0, 3), 3)]);
        assert_eq!(c.stats().bytes, 25);
    }
}
