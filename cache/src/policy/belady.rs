use std::collections::{BTreeSet, HashMap, VecDeque};

use super::Policy;
use crate::ExpertKey;

/// Belady's optimal replacement (MIN): evicts the resident key whose next use lies furthest in
/// the future. It needs the whole future access sequence, so it exists for the simulator, as the
/// upper bound on a demand cache's hit rate; no live engine can run it.
///
/// The policy follows the sequence it was given: every `on_insert` or `on_hit` of a key is taken
/// as that key's next access in the sequence. Driven by a demand cache (look up, insert on a
/// miss) over that same sequence, this holds by construction. With equal entry sizes, as experts
/// of one model have, the result is optimal; with unequal sizes it is the usual heuristic.
pub struct BeladyPolicy {
    /// Per key, the positions of its accesses not yet consumed, in order.
    future: HashMap<ExpertKey, VecDeque<usize>>,
    /// Resident keys -> their next use (`usize::MAX` when never used again).
    resident: HashMap<ExpertKey, usize>,
    /// Resident keys by next use; the victim is at the far end.
    order: BTreeSet<(usize, ExpertKey)>,
}

impl BeladyPolicy {
    /// A policy for the access sequence `accesses`, in the order the cache will see them.
    pub fn new(accesses: impl IntoIterator<Item = ExpertKey>) -> Self {
        let mut future: HashMap<ExpertKey, VecDeque<usize>> = HashMap::new();
        for (i, key) in accesses.into_iter().enumerate() {
            future.entry(key).or_default().push_back(i);
        }
        BeladyPolicy { future, resident: HashMap::new(), order: BTreeSet::new() }
    }

    /// Consumes `key`'s current access and places it by its next one.
    fn access(&mut self, key: ExpertKey) {
        if let Some(next) = self.resident.remove(&key) {
            self.order.remove(&(next, key));
        }
        let next = match self.future.get_mut(&key) {
            Some(q) => {
                q.pop_front();
                q.front().copied().unwrap_or(usize::MAX)
            }
            None => usize::MAX,
        };
        self.resident.insert(key, next);
        self.order.insert((next, key));
    }
}

impl Policy for BeladyPolicy {
    fn name(&self) -> &'static str {
        "belady"
    }

    fn on_insert(&mut self, key: ExpertKey) {
        self.access(key);
    }

    fn on_hit(&mut self, key: ExpertKey) {
        self.access(key);
    }

    fn on_remove(&mut self, key: ExpertKey) {
        if let Some(next) = self.resident.remove(&key) {
            self.order.remove(&(next, key));
        }
    }

    fn victim(&mut self, skip: &dyn Fn(&ExpertKey) -> bool) -> Option<ExpertKey> {
        self.order.iter().rev().map(|&(_, k)| k).find(|k| !skip(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::access;
    use crate::{Cache, LruPolicy};

    fn keys(seq: &[usize]) -> Vec<ExpertKey> {
        seq.iter().map(|&e| ExpertKey::new(0, e)).collect()
    }

    /// Misses of a demand cache holding `slots` unit-size entries under `policy`.
    fn misses(seq: &[ExpertKey], slots: u64, policy: Box<dyn Policy>) -> u64 {
        let mut c: Cache<()> = Cache::new(slots, policy);
        seq.iter().filter(|&&key| !access(&mut c, key, 1)).count() as u64
    }

    /// The fewest misses any replacement choice achieves (exhaustive search).
    fn brute_force(seq: &[ExpertKey], slots: usize, resident: &mut Vec<ExpertKey>) -> u64 {
        let Some((key, rest)) = seq.split_first() else { return 0 };
        if resident.contains(key) {
            return brute_force(rest, slots, resident);
        }
        if resident.len() < slots {
            resident.push(*key);
            let m = 1 + brute_force(rest, slots, resident);
            resident.pop();
            return m;
        }
        let mut best = u64::MAX;
        for i in 0..resident.len() {
            let old = std::mem::replace(&mut resident[i], *key);
            best = best.min(1 + brute_force(rest, slots, resident));
            resident[i] = old;
        }
        best
    }

    #[test]
    fn textbook_sequence() {
        // The classic example: 3 frames, MIN takes 9 faults where LRU takes 12.
        let seq = keys(&[7, 0, 1, 2, 0, 3, 0, 4, 2, 3, 0, 3, 2, 1, 2, 0, 1, 7, 0, 1]);
        assert_eq!(misses(&seq, 3, Box::new(BeladyPolicy::new(seq.clone()))), 9);
        assert_eq!(misses(&seq, 3, Box::new(LruPolicy::new())), 12);
    }

    #[test]
    fn optimal_against_brute_force() {
        // Deterministic pseudo-random sequences over 5 keys, 2..=3 slots.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for case in 0..40 {
            let len = 8 + case % 5;
            let seq: Vec<ExpertKey> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ExpertKey::new((state % 2) as usize, (state / 2 % 3) as usize)
                })
                .collect();
            let slots = 2 + case % 2;
            let belady = misses(&seq, slots as u64, Box::new(BeladyPolicy::new(seq.clone())));
            assert_eq!(belady, brute_force(&seq, slots, &mut Vec::new()), "case {case}: {seq:?}");
        }
    }

    #[test]
    fn never_used_again_goes_first_and_skip_is_respected() {
        let seq = keys(&[0, 1, 2, 1, 0]);
        let mut p = BeladyPolicy::new(seq.clone());
        for key in &seq[..3] {
            p.on_insert(*key);
        }
        // Next uses: 0 -> 4, 1 -> 3, 2 -> never.
        assert_eq!(p.victim(&|_| false), Some(seq[2]));
        assert_eq!(p.victim(&|k| *k == seq[2]), Some(seq[0]));
        p.on_remove(seq[2]);
        p.on_hit(seq[1]);
        // 1 is never used again now.
        assert_eq!(p.victim(&|_| false), Some(seq[1]));
    }
}
