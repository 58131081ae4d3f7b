//! `--shard I/N`: a deterministic slice of the input by hash of each request's key, so N machines
//! (a Kubernetes Indexed Job, a Slurm array) each run one shard and the outputs concatenate.

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// `I/N` with 0 <= I < N.
    pub fn parse(s: &str) -> Result<Shard, String> {
        let bad = || format!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) =
            (i.trim().parse::<u64>().map_err(|_| bad())?, n.trim().parse::<u64>().map_err(|_| bad())?);
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }

    /// The shard the environment says, if it says one: Slurm's `SLURM_ARRAY_TASK_ID` (minus
    /// `SLURM_ARRAY_TASK_MIN`) of `SLURM_ARRAY_TASK_COUNT`, or Kubernetes' `JOB_COMPLETION_INDEX`
    /// of `STEVEDORE_SHARD_COUNT` (the Job's `completions`, which Kubernetes does not export).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>, String> {
        let num = |name: &str| -> Result<Option<u64>, String> {
            var(name)
                .map(|v| v.trim().parse::<u64>().map_err(|_| format!("{name}={v:?} is not a whole number")))
                .transpose()
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let count = num("SLURM_ARRAY_TASK_COUNT")?
                .ok_or("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not; give --shard I/N")?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or("SLURM_ARRAY_TASK_ID is below SLURM_ARRAY_TASK_MIN")?;
            return Shard::parse(&format!("{index}/{count}")).map(Some);
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("STEVEDORE_SHARD_COUNT")?.ok_or(
                "JOB_COMPLETION_INDEX is set but STEVEDORE_SHARD_COUNT is not (set it to the Job's completions); \
                 or give --shard I/N",
            )?;
            return Shard::parse(&format!("{index}/{count}")).map(Some);
        }
        Ok(None)
    }

    /// Whether the request with `key` belongs to this shard (FNV-1a of the key, mod N: stable
    /// across machines, runs and versions).
    pub fn holds(&self, key: &str) -> bool {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h % self.count == self.index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_keys() {
        let keys: Vec<String> = (0..1000).map(|i| format!("req-{i}")).collect();
        let shards: Vec<Shard> = (0..4).map(|i| Shard { index: i, count: 4 }).collect();
        for k in &keys {
            assert_eq!(shards.iter().filter(|s| s.holds(k)).count(), 1, "{k}");
        }
        // Roughly even.
        for s in &shards {
            let n = keys.iter().filter(|k| s.holds(k)).count();
            assert!((200..300).contains(&n), "{s:?}: {n}");
        }
        assert!(keys.iter().all(|k| Shard::ALL.holds(k)));
    }

    #[test]
    fn parses_flags_and_environments() {
        assert_eq!(Shard::parse("1/3").unwrap(), Shard { index: 1, count: 3 });
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(Shard::parse(bad).is_err(), "{bad}");
        }
        fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
            move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        }
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
        let slurm =
            [("SLURM_ARRAY_TASK_ID", "5"), ("SLURM_ARRAY_TASK_MIN", "4"), ("SLURM_ARRAY_TASK_COUNT", "3")];
        assert_eq!(Shard::from_env(env(&slurm)).unwrap(), Some(Shard { index: 1, count: 3 }));
        let k8s = [("JOB_COMPLETION_INDEX", "2"), ("STEVEDORE_SHARD_COUNT", "4")];
        assert_eq!(Shard::from_env(env(&k8s)).unwrap(), Some(Shard { index: 2, count: 4 }));
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "2")]))
            .unwrap_err()
            .contains("STEVEDORE_SHARD_COUNT"));
    }
}
