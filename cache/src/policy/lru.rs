use lru::LruCache;

use super::Policy;
use crate::ExpertKey;

/// Least-recently-used: evicts the resident key whose last use is oldest.
pub struct LruPolicy {
    order: LruCache<ExpertKey, ()>,
}

impl LruPolicy {
    pub fn new() -> Self {
        LruPolicy { order: LruCache::unbounded() }
    }
}

impl Default for LruPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl Policy for LruPolicy {
    fn name(&self) -> &'static str {
        "lru"
    }

    fn on_insert(&mut self, key: ExpertKey) {
        self.order.put(key, ());
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.order.promote(&key);
    }

    fn on_remove(&mut self, key: ExpertKey) {
        self.order.pop(&key);
    }

    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey> {
        // `iter().rev()` walks from least to most recently used.
        self.order.iter().rev().map(|(k, _)| *k).find(|k| !skip(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recent_and_respects_skip() {
        let mut p = LruPolicy::new();
        let (a, b, c) = (ExpertKey::new(0, 0), ExpertKey::new(0, 1), ExpertKey::new(1, 0));
        p.on_insert(a);
        p.on_insert(b);
        p.on_insert(c);
        p.on_hit(a);
        assert_eq!(p.victim(&|_| false), Some(b));
        assert_eq!(p.victim(&|k| *k == b), Some(c));
        p.on_remove(b);
        p.on_remove(c);
        assert_eq!(p.victim(&|_| false), Some(a));
        assert_eq!(p.victim(&|_| true), None);
    }
}
