use std::collections::HashMap;

use crate::{ExpertKey, Policy};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    #[error("{key} needs {bytes} bytes but the cache budget is {budget} bytes")]
    TooLarge { key: ExpertKey, bytes: u64, budget: u64 },
    #[error("no room for {key} ({bytes} bytes): {pinned} of {budget} budget bytes are pinned")]
    AllPinned { key: ExpertKey, bytes: u64, pinned: u64, budget: u64 },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
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
    pins: u32,
}

/// A byte-budgeted map from expert keys to values, with a replacement policy. Pinned entries
/// (in use by a computation) are never evicted.
pub struct Cache<V> {
    budget: u64,
    entries: HashMap<ExpertKey, Entry<V>>,
    policy: Box<dyn Policy>,
    stats: CacheStats,
}

impl<V> Cache<V> {
    pub fn new(budget: u64, policy: Box<dyn Policy>) -> Self {
        Cache { budget, entries: HashMap::new(), policy, stats: CacheStats::default() }
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

    /// Looks `key` up as a demand access: counts a hit or a miss and tells the policy.
    pub fn get(&mut self, key: &ExpertKey) -> Option<&V> {
        match self.entries.get(key) {
            Some(e) => {
                self.stats.hits += 1;
                self.policy.on_hit(*key);
                Some(&e.value)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    /// Looks `key` up without counting or reordering.
    pub fn peek(&self, key: &ExpertKey) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Pins a resident entry so that it cannot be evicted until unpinned. Returns false if absent.
    pub fn pin(&mut self, key: &ExpertKey) -> bool {
        match self.entries.get_mut(key) {
            Some(e) => {
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    pub fn unpin(&mut self, key: &ExpertKey) {
        if let Some(e) = self.entries.get_mut(key) {
            e.pins = e.pins.saturating_sub(1);
        }
    }

    /// Would `bytes` more fit after evicting unpinned entries not protected by `protect`?
    pub fn can_make_room(&self, bytes: u64, protect: &dyn Fn(&ExpertKey) -> bool) -> bool {
        self.locked_bytes(protect) + bytes <= self.budget
    }

    /// Bytes no insert may evict: pinned entries and those `protect` names.
    pub fn locked_bytes(&self, protect: &dyn Fn(&ExpertKey) -> bool) -> u64 {
        self.entries.iter().filter(|(k, e)| e.pins > 0 || protect(k)).map(|(_, e)| e.bytes).sum()
    }

    /// Inserts `value` (occupying `bytes`), evicting policy victims that are neither pinned nor
    /// protected until it fits. Returns the evicted entries. Re-inserting a resident key
    /// replaces its value.
    pub fn insert(
        &mut self,
        key: ExpertKey,
        value: V,
        bytes: u64,
        protect: &dyn Fn(&ExpertKey) -> bool,
    ) -> Result<Vec<(ExpertKey, V)>, CacheError> {
        if bytes > self.budget {
            return Err(CacheError::TooLarge { key, bytes, budget: self.budget });
        }
        let mut evicted = Vec::new();
        if let Some(old) = self.entries.remove(&key) {
            self.stats.bytes -= old.bytes;
            self.policy.on_remove(key);
            evicted.push((key, old.value));
        }
        while self.stats.bytes + bytes > self.budget {
            let entries = &self.entries;
            let skip = |k: &ExpertKey| entries.get(k).is_none_or(|e| e.pins > 0) || protect(k);
            let Some(victim) = self.policy.victim(&skip) else {
                let pinned = self.entries.values().filter(|e| e.pins > 0).map(|e| e.bytes).sum();
                return Err(CacheError::AllPinned { key, bytes, pinned, budget: self.budget });
            };
            let e = self.entries.remove(&victim).expect("policy named a key the cache lacks");
            self.policy.on_remove(victim);
            self.stats.bytes -= e.bytes;
            self.stats.evictions += 1;
            evicted.push((victim, e.value));
        }
        self.entries.insert(key, Entry { value, bytes, pins: 0 });
        self.policy.on_insert(key);
        self.stats.inserts += 1;
        self.stats.bytes += bytes;
        self.stats.peak_bytes = self.stats.peak_bytes.max(self.stats.bytes);
        Ok(evicted)
    }

    /// Removes `key` if resident.
    pub fn remove(&mut self, key: &ExpertKey) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.policy.on_remove(*key);
        self.stats.bytes -= e.bytes;
        Some(e.value)
    }
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
            assert!(c.get(&key(0, e)).is_none());
            c.insert(key(0, e), e as u32, 40, &|_| false).unwrap();
            assert!(c.stats().bytes <= 100);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&key(0, 9)), Some(&9));
        let s = c.stats();
        assert_eq!((s.hits, s.misses, s.inserts, s.evictions), (1, 10, 10, 8));
        assert_eq!(s.peak_bytes, 80);
    }

    #[test]
    fn pinned_and_protected_entries_survive() {
        let mut c: Cache<()> = Cache::new(100, Box::new(LruPolicy::new()));
        c.insert(key(0, 0), (), 50, &|_| false).unwrap();
        c.insert(key(0, 1), (), 50, &|_| false).unwrap();
        assert!(c.pin(&key(0, 0)));
        let ev = c.insert(key(0, 2), (), 50, &|_| false).unwrap();
        assert_eq!(ev.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![key(0, 1)]);
        let err = c.insert(key(0, 3), (), 50, &|k| *k == key(0, 2)).unwrap_err();
        assert!(matches!(err, CacheError::AllPinned { pinned: 50, .. }));
        c.unpin(&key(0, 0));
        c.insert(key(0, 3), (), 50, &|k| *k == key(0, 2)).unwrap();
        assert!(c.contains(&key(0, 2)) && c.contains(&key(0, 3)) && !c.contains(&key(0, 0)));
        assert_eq!(
            c.insert(key(1, 0), (), 101, &|_| false).unwrap_err(),
            CacheError::TooLarge { key: key(1, 0), bytes: 101, budget: 100 }
        );
    }
}
