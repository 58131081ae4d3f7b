//! Replacement policies. A policy tracks the resident keys and names a victim when the cache
//! needs room; the [`crate::Cache`] owns the values and the byte accounting.

mod lru;

pub use lru::LruPolicy;

use crate::ExpertKey;

pub trait Policy: Send {
    /// Name used in configs and reports (`lru`, `lfu`, ...).
    fn name(&self) -> &'static str;
    /// A key became resident.
    fn on_insert(&mut self, key: ExpertKey);
    /// A resident key was used.
    fn on_hit(&mut self, key: ExpertKey);
    /// A key left the cache (evicted or removed).
    fn on_remove(&mut self, key: ExpertKey);
    /// The resident key to evict next, skipping keys for which `skip` is true; `None` if every
    /// resident key is skipped.
    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey>;
}
