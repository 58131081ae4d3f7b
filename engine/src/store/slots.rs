//! The store's slots: one per cache entry, holding the expert's buffer and where its read
//! stands, and the queues of reads for the reader threads (demand first, then prefetch).
//!
//! Buffers are counted as they come and go (`buffer_bytes`): a reader allocates a new buffer
//! only if it fits the budget beside every buffer alive, which keeps the memory promise even
//! while an evicted entry's read is still in flight. An evicted entry's buffer goes to the entry
//! that evicted it when the sizes match: a fresh allocation costs a memset and a page fault per
//! 4 KiB, which halved the read rate of multi-MiB experts.

use std::collections::VecDeque;
use std::sync::Arc;

use stevedore_cache::ExpertKey;

use crate::io::{AlignedBuf, IoError};

/// Index of a slot; the tier's value for an entry.
pub(crate) type SlotId = usize;

/// The priority of a queued read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Job {
    /// A layer waits for it.
    Demand,
    /// Read ahead of need; goes after every demand read.
    Prefetch,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    Queued(Job),
    InFlight,
    Done,
}

struct Slot {
    key: ExpertKey,
    /// Bytes of the expert's buffer.
    alloc: usize,
    /// Changes whenever the slot id is given to a new entry: a queued job of another serial is
    /// stale.
    serial: u64,
    read: Read,
    /// The bytes once read, or why not.
    data: Option<Result<Arc<AlignedBuf>, IoError>>,
    /// A recycled buffer to read into, until the read starts.
    spare: Option<AlignedBuf>,
    /// Evicted while its read was in flight: the reader frees the slot when the read ends.
    orphaned: bool,
}

/// A read handed to a reader.
pub(crate) struct ReadJob {
    pub slot: SlotId,
    pub serial: u64,
    pub key: ExpertKey,
    /// The buffer to read into; `None`: the reader allocates one (its bytes are already counted).
    pub buf: Option<AlignedBuf>,
}

/// Every slot and the read queues. See the module docs.
#[derive(Default)]
pub(crate) struct Slots {
    /// `None`: a free id (in `free_ids`).
    slots: Vec<Option<Slot>>,
    free_ids: Vec<SlotId>,
    /// Queued reads as (slot, serial); entries whose slot moved on are skipped when popped.
    demand: VecDeque<(SlotId, u64)>,
    prefetch: VecDeque<(SlotId, u64)>,
    next_serial: u64,
    /// Bytes of every buffer alive: in slots, and in readers' hands (counted when handed out).
    buffer_bytes: u64,
    peak: u64,
    cancelled: u64,
}

impl Slots {
    fn slot(&self, id: SlotId) -> &Slot {
        self.slots[id].as_ref().expect("the tier's slot ids are live")
    }

    fn slot_mut(&mut self, id: SlotId) -> &mut Slot {
        self.slots[id].as_mut().expect("the tier's slot ids are live")
    }

    /// A new slot for `key` (`alloc` bytes) with its read queued as `job`, taking the buffer of
    /// one of the `evicted` slots when one matches, and freeing the rest.
    pub fn admit(
        &mut self,
        key: ExpertKey,
        alloc: usize,
        evicted: impl Iterator<Item = SlotId>,
        job: Job,
    ) -> SlotId {
        let mut spare = None;
        for id in evicted {
            match self.vacate(id) {
                Some(buf) if spare.is_none() && buf.len() == alloc => spare = Some(buf),
                Some(buf) => self.free_buf(buf),
                None => {}
            }
        }
        self.next_serial += 1;
        let slot = Slot {
            key,
            alloc,
            serial: self.next_serial,
            read: Read::Queued(job),
            data: None,
            spare,
            orphaned: false,
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.slots[id] = Some(slot);
                id
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.queue(id, job);
        id
    }

    /// Queues `id`'s read.
    fn queue(&mut self, id: SlotId, job: Job) {
        let s = self.slot_mut(id);
        s.read = Read::Queued(job);
        let entry = (id, s.serial);
        match job {
            Job::Demand => self.demand.push_back(entry),
            Job::Prefetch => self.prefetch.push_back(entry),
        }
    }

    /// A layer asks for `id`: a queued prefetch becomes a demand read (its stale prefetch-queue
    /// entry is skipped later).
    pub fn raise(&mut self, id: SlotId) {
        if self.slot(id).read == Read::Queued(Job::Prefetch) {
            self.queue(id, Job::Demand);
        }
    }

    /// Takes `id` out of use and returns its buffer, if it has one to give: an entry whose read
    /// is in flight is orphaned instead (its reader frees it); a queued read is cancelled.
    fn vacate(&mut self, id: SlotId) -> Option<AlignedBuf> {
        let s = self.slot_mut(id);
        match s.read {
            Read::InFlight => {
                s.orphaned = true;
                return None;
            }
            Read::Queued(_) => self.cancelled += 1,
            Read::Done => {}
        }
        let s = self.slots[id].take().expect("checked above");
        self.free_ids.push(id);
        let data = match s.data {
            Some(Ok(arc)) => match Arc::try_unwrap(arc) {
                Ok(buf) => Some(buf),
                Err(arc) => {
                    // Unpinned entries are referenced by nobody else; should a reference
                    // remain, its buffer is freed when it goes, outside our count.
                    debug_assert!(false, "evicted {} while its buffer was referenced", s.key);
                    self.buffer_bytes -= arc.len() as u64;
                    None
                }
            },
            _ => None,
        };
        data.or(s.spare)
    }

    /// Frees `id` (removed from the tier), with its buffer.
    pub fn free(&mut self, id: SlotId) {
        if let Some(buf) = self.vacate(id) {
            self.free_buf(buf);
        }
    }

    fn free_buf(&mut self, buf: AlignedBuf) {
        self.buffer_bytes -= buf.len() as u64;
    }

    /// The next read to do, demand first: with its recycled buffer, or with room counted for
    /// one that fits `budget` beside every buffer alive. `None` when nothing is queued, or the
    /// first read must wait for a buffer to be freed.
    pub fn next_job(&mut self, budget: u64) -> Option<ReadJob> {
        loop {
            let (queue, (id, serial)) = match (self.demand.front(), self.prefetch.front()) {
                (Some(&e), _) => (Job::Demand, e),
                (None, Some(&e)) => (Job::Prefetch, e),
                (None, None) => return None,
            };
            let live =
                matches!(&self.slots[id], Some(s) if s.serial == serial && s.read == Read::Queued(queue));
            if live {
                let (alloc, has_spare) = {
                    let s = self.slot(id);
                    (s.alloc as u64, s.spare.is_some())
                };
                if !has_spare && self.buffer_bytes + alloc > budget {
                    return None;
                }
                if !has_spare {
                    self.buffer_bytes += alloc;
                    self.peak = self.peak.max(self.buffer_bytes);
                }
            }
            match queue {
                Job::Demand => self.demand.pop_front(),
                Job::Prefetch => self.prefetch.pop_front(),
            };
            if live {
                let s = self.slot_mut(id);
                s.read = Read::InFlight;
                return Some(ReadJob { slot: id, serial, key: s.key, buf: s.spare.take() });
            }
        }
    }

    /// A read ended: its bytes go to the slot, or, for an orphan, the slot and its buffer are
    /// freed (whether the read succeeded or not).
    pub fn land(&mut self, job: ReadJob, result: Result<AlignedBuf, IoError>) {
        let s = self.slot_mut(job.slot);
        debug_assert!(s.serial == job.serial && s.read == Read::InFlight);
        let alloc = s.alloc as u64;
        if s.orphaned {
            self.slots[job.slot] = None;
            self.free_ids.push(job.slot);
            self.buffer_bytes -= alloc;
            return;
        }
        s.read = Read::Done;
        s.data = Some(result.map(Arc::new));
        if matches!(s.data, Some(Err(_))) {
            self.buffer_bytes -= alloc;
        }
    }

    /// `id`'s bytes: `None` until read.
    pub fn data(&self, id: SlotId) -> Option<&Result<Arc<AlignedBuf>, IoError>> {
        self.slot(id).data.as_ref()
    }

    /// Whether `id`'s read failed.
    pub fn failed(&self, id: SlotId) -> bool {
        matches!(self.slot(id).data, Some(Err(_)))
    }

    /// Most bytes of buffers alive at once.
    pub fn peak_bytes(&self) -> u64 {
        self.peak
    }

    /// Queued reads cancelled by eviction.
    pub fn cancelled(&self) -> u64 {
        self.cancelled
    }

    /// Whether any read is queued or in flight.
    #[cfg(test)]
    pub fn busy(&self) -> bool {
        self.slots.iter().flatten().any(|s| matches!(s.read, Read::Queued(_) | Read::InFlight))
    }

    /// Bytes of buffers alive now.
    #[cfg(test)]
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: usize = 4096;

    fn key(e: usize) -> ExpertKey {
        ExpertKey::new(0, e)
    }

    /// Runs `job` as a reader would, with a fresh buffer when it brought none.
    fn read(slots: &mut Slots, mut job: ReadJob) {
        let buf = job.buf.take().unwrap_or_else(|| AlignedBuf::zeroed(A).unwrap());
        slots.land(job, Ok(buf))
    }

    #[test]
    fn an_orphaned_read_frees_its_buffer_before_another_is_allocated() {
        let mut s = Slots::default();
        let a = s.admit(key(0), A, std::iter::empty(), Job::Demand);
        let job_a = s.next_job(A as u64).unwrap();
        assert!(job_a.buf.is_none());
        assert_eq!(s.buffer_bytes(), A as u64);
        // `a` is evicted while its read is in flight: orphaned, its buffer still counted.
        let b = s.admit(key(1), A, [a].into_iter(), Job::Demand);
        assert_ne!(a, b);
        // A budget of one buffer: `b` waits until the orphan's read ends.
        assert!(s.next_job(A as u64).is_none());
        read(&mut s, job_a);
        assert_eq!(s.buffer_bytes(), 0);
        let job_b = s.next_job(A as u64).unwrap();
        assert_eq!(job_b.key, key(1));
        read(&mut s, job_b);
        assert!(matches!(s.data(b), Some(Ok(_))));
        assert!((s.peak_bytes(), s.buffer_bytes()) == (A as u64, A as u64));
    }

    #[test]
    fn an_evicted_queued_read_is_cancelled_and_a_read_buffer_recycled() {
        let mut s = Slots::default();
        let a = s.admit(key(0), A, std::iter::empty(), Job::Demand);
        let job = s.next_job(u64::MAX).unwrap();
        read(&mut s, job);
        // `b` takes `a`'s buffer (same size): no new allocation.
        let b = s.admit(key(1), A, [a].into_iter(), Job::Prefetch);
        // `c` evicts `b` before its read starts: cancelled, and `c` inherits the buffer.
        let c = s.admit(key(2), A, [b].into_iter(), Job::Demand);
        assert_eq!(s.cancelled(), 1);
        let job = s.next_job(A as u64).unwrap();
        assert_eq!((job.key, job.buf.is_some()), (key(2), true));
        read(&mut s, job);
        assert!(matches!(s.data(c), Some(Ok(_))));
        assert!(s.next_job(u64::MAX).is_none(), "the stale prefetch of b is skipped");
        assert_eq!((s.buffer_bytes(), s.peak_bytes()), (A as u64, A as u64));
    }

    #[test]
    fn a_raised_prefetch_goes_before_older_prefetches() {
        let mut s = Slots::default();
        let ids: Vec<SlotId> =
            (0..3).map(|e| s.admit(key(e), A, std::iter::empty(), Job::Prefetch)).collect();
        s.raise(ids[2]);
        let order: Vec<ExpertKey> = std::iter::from_fn(|| {
            let job = s.next_job(u64::MAX)?;
            let k = job.key;
            read(&mut s, job);
            Some(k)
        })
        .collect();
        assert_eq!(order, [key(2), key(0), key(1)]);
        assert!(!s.busy());
    }

    #[test]
    fn a_failed_read_keeps_no_buffer() {
        let mut s = Slots::default();
        let a = s.admit(key(0), A, std::iter::empty(), Job::Demand);
        let job = s.next_job(u64::MAX).unwrap();
        s.land(job, Err(IoError::Alloc { bytes: A }));
        assert!(s.failed(a));
        assert_eq!(s.buffer_bytes(), 0);
        s.free(a);
        assert_eq!(s.buffer_bytes(), 0);
    }
}
