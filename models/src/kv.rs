//! The paged KV cache: keys and values of every running sequence in fixed-size blocks of token
//! positions, allocated from one pool sized in bytes at start (the block pools of vLLM and
//! mistral.rs). A sequence holds a block table (its blocks in position order); blocks come from
//! a free list and go back to it the moment the sequence is released, so sequences of any
//! length share the pool without fragmentation beyond each one's last, partly filled block.
//!
//! Memory: the pool's buffers are allocated zeroed once, at start; the OS maps their pages as
//! they are first written, so the resident size grows with the blocks actually used, never past
//! [`KvPool::bytes`].

use std::collections::HashMap;

use crate::{ModelConfig, SeqId};

/// Default tokens per block: small enough that a sequence wastes little of its last block,
/// large enough that block tables stay short.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("sequence {0} already holds KV blocks")]
    Exists(SeqId),
    #[error("sequence {0} holds no KV blocks")]
    Unknown(SeqId),
    #[error(
        "{positions} positions need {need} KV blocks of {block_size} tokens ({need_bytes} bytes), but only \
         {free} of the pool's {total} are free"
    )]
    OutOfBlocks {
        positions: usize,
        need: usize,
        need_bytes: u64,
        free: usize,
        total: usize,
        block_size: usize,
    },
    #[error("sequence {seq}: position {pos} is beyond its {capacity} reserved positions")]
    Beyond { seq: SeqId, pos: usize, capacity: usize },
    #[error("a KV pool of {bytes} bytes is too large for this machine's address space")]
    TooLarge { bytes: u64 },
}

/// One sequence's blocks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct BlockTable {
    /// Block ids in position order: position `p` lives in `blocks[p / block_size]` at slot
    /// `p % block_size`. Each id is in no other table and not in the free list.
    blocks: Vec<u32>,
    /// Positions whose keys and values have been written (`0..len`); `len <= capacity`.
    len: usize,
}

/// Keys and values of all sequences, in blocks. See the module docs.
pub struct KvPool {
    /// Token positions per block (> 0).
    block_size: usize,
    /// Floats per position and layer, keys and values together: KV heads x (key + value width).
    kv_dim: usize,
    kv_heads: usize,
    /// Key and value widths of one KV head (equal for GQA; MLA's latent differs).
    key_dim: usize,
    value_dim: usize,
    num_layers: usize,
    /// Blocks in the pool; block ids are `0..num_blocks`.
    num_blocks: usize,
    /// `keys[layer][((block * kv_heads + head) * block_size + slot) * key_dim..][..key_dim]`:
    /// KV head `head`'s key of the position at `slot` of `block`. A block's keys for one head are
    /// one `[block_size, key_dim]` matrix, which attention multiplies by its queries in one
    /// product. Meaningful only for positions below their sequence's `len`.
    keys: Vec<Vec<f32>>,
    /// `values[layer][((block * kv_heads + head) * value_dim + c) * block_size + slot]`: the
    /// same blocks transposed, one `[value_dim, block_size]` matrix per block and head, which
    /// attention multiplies by its weights over the block's positions.
    values: Vec<Vec<f32>>,
    /// Blocks held by no sequence, used last-in first-out (recently used pages stay warm).
    /// With the tables' blocks, every id in `0..num_blocks` appears exactly once.
    free: Vec<u32>,
    /// The block table of every sequence holding blocks.
    tables: HashMap<SeqId, BlockTable>,
}

/// Where one position's key and value live: its block and its slot in the block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Slot {
    block: usize,
    slot: usize,
}

impl KvPool {
    /// Bytes one block occupies over all layers (keys and values, f32).
    pub fn block_bytes(cfg: &ModelConfig, block_size: usize) -> u64 {
        let (heads, k, v) = cfg.kv_layout();
        [cfg.num_hidden_layers, block_size, heads, k + v, 4]
            .iter()
            .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    /// Bytes of the blocks `positions` tokens of one sequence take (whole blocks).
    pub fn bytes_for(cfg: &ModelConfig, block_size: usize, positions: usize) -> u64 {
        (positions.div_ceil(block_size.max(1)) as u64).saturating_mul(Self::block_bytes(cfg, block_size))
    }

    /// A pool of as many whole blocks of `block_size` positions as `bytes` holds.
    pub fn new(cfg: &ModelConfig, bytes: u64, block_size: usize) -> Result<Self, KvError> {
        let block_size = block_size.max(1);
        let block_bytes = Self::block_bytes(cfg, block_size).max(1);
        let num_blocks = (bytes / block_bytes).min(u32::MAX as u64) as usize;
        let (kv_heads, key_dim, value_dim) = cfg.kv_layout();
        let kv_dim = kv_heads * (key_dim + value_dim);
        let floats = |width: usize| {
            num_blocks
                .checked_mul(block_size)
                .and_then(|p| p.checked_mul(kv_heads * width))
                .filter(|&f| f <= isize::MAX as usize / 4)
                .ok_or(KvError::TooLarge { bytes })
        };
        let (key_floats, value_floats) = (floats(key_dim)?, floats(value_dim)?);
        Ok(KvPool {
            block_size,
            kv_dim,
            kv_heads,
            key_dim,
            value_dim,
            num_layers: cfg.num_hidden_layers,
            num_blocks,
            keys: (0..cfg.num_hidden_layers).map(|_| vec![0.0f32; key_floats]).collect(),
            values: (0..cfg.num_hidden_layers).map(|_| vec![0.0f32; value_floats]).collect(),
            free: (0..num_blocks as u32).rev().collect(),
            tables: HashMap::new(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Bytes of the whole pool.
    pub fn bytes(&self) -> u64 {
        self.bytes_of(self.num_blocks)
    }

    /// Bytes of `blocks` blocks over all layers (keys and values, f32).
    fn bytes_of(&self, blocks: usize) -> u64 {
        [blocks, self.block_size, self.kv_dim, self.num_layers, 4]
            .iter()
            .fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
    }

    /// Blocks that `positions` positions occupy.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    /// Whether a new sequence of `positions` positions would get its blocks now.
    pub fn can_allocate(&self, positions: usize) -> bool {
        self.blocks_for(positions) <= self.free.len()
    }

    /// Gives `seq` blocks for `positions` positions (its reservation; it can grow with
    /// [`KvPool::reserve`]). Takes nothing when the pool has too few free blocks.
    pub fn allocate(&mut self, seq: SeqId, positions: usize) -> Result<(), KvError> {
        if self.tables.contains_key(&seq) {
            return Err(KvError::Exists(seq));
        }
        let need = self.blocks_for(positions);
        self.check_free(positions, need)?;
        let blocks = self.free.split_off(self.free.len() - need);
        self.tables.insert(seq, BlockTable { blocks, len: 0 });
        Ok(())
    }

    /// Grows `seq`'s reservation to at least `positions` positions; nothing changes when the
    /// pool has too few free blocks.
    pub fn reserve(&mut self, seq: SeqId, positions: usize) -> Result<(), KvError> {
        let need = self.blocks_for(positions);
        let have = self.tables.get(&seq).ok_or(KvError::Unknown(seq))?.blocks.len();
        if need > have {
            self.check_free(positions, need - have)?;
            let more = self.free.split_off(self.free.len() - (need - have));
            self.tables.get_mut(&seq).expect("checked above").blocks.extend(more);
        }
        Ok(())
    }

    fn check_free(&self, positions: usize, need: usize) -> Result<(), KvError> {
        if need > self.free.len() {
            return Err(KvError::OutOfBlocks {
                positions,
                need,
                need_bytes: self.bytes_of(need),
                free: self.free.len(),
                total: self.num_blocks,
                block_size: self.block_size,
            });
        }
        Ok(())
    }

    /// Returns `seq`'s blocks to the pool. Returns false if it held none.
    pub fn release(&mut self, seq: SeqId) -> bool {
        match self.tables.remove(&seq) {
            Some(t) => {
                self.free.extend(t.blocks.into_iter().rev());
                true
            }
            None => false,
        }
    }

    /// Positions of `seq` whose keys and values are written, or `None` if it holds no blocks.
    pub fn len(&self, seq: SeqId) -> Option<usize> {
        self.tables.get(&seq).map(|t| t.len)
    }

    /// Positions `seq`'s blocks can hold.
    pub fn capacity(&self, seq: SeqId) -> Option<usize> {
        self.tables.get(&seq).map(|t| t.blocks.len() * self.block_size)
    }

    pub fn contains(&self, seq: SeqId) -> bool {
        self.tables.contains_key(&seq)
    }

    /// Marks positions `..len` of `seq` as written (after a forward pass wrote them).
    pub(crate) fn set_len(&mut self, seq: SeqId, len: usize) {
        if let Some(t) = self.tables.get_mut(&seq) {
            debug_assert!(len <= t.blocks.len() * self.block_size);
            t.len = len;
        }
    }

    /// The slot of position `pos` of `seq`, which must be within its reservation.
    pub(crate) fn slot(&self, seq: SeqId, pos: usize) -> Result<Slot, KvError> {
        let t = self.tables.get(&seq).ok_or(KvError::Unknown(seq))?;
        let block = t.blocks.get(pos / self.block_size).ok_or(KvError::Beyond {
            seq,
            pos,
            capacity: t.blocks.len() * self.block_size,
        })?;
        Ok(Slot { block: *block as usize, slot: pos % self.block_size })
    }

    /// `seq`'s block table, to walk its positions without a map look-up each.
    pub(crate) fn table(&self, seq: SeqId) -> Option<&[u32]> {
        self.tables.get(&seq).map(|t| t.blocks.as_slice())
    }

    /// Writes one position's key and value (all KV heads: `kv_heads * key_dim` and
    /// `kv_heads * value_dim` floats) in `layer`.
    pub(crate) fn write(&mut self, layer: usize, slot: Slot, key: &[f32], value: &[f32]) {
        let (bs, dk, dv) = (self.block_size, self.key_dim, self.value_dim);
        for h in 0..self.kv_heads {
            let at = ((slot.block * self.kv_heads + h) * bs + slot.slot) * dk;
            self.keys[layer][at..at + dk].copy_from_slice(&key[h * dk..(h + 1) * dk]);
            let base = (slot.block * self.kv_heads + h) * dv * bs + slot.slot;
            for (c, &v) in value[h * dv..(h + 1) * dv].iter().enumerate() {
                self.values[layer][base + c * bs] = v;
            }
        }
    }

    /// KV head `head`'s keys of `block` in `layer`: `[block_size, key_dim]`, row = slot.
    #[inline]
    pub(crate) fn key_block(&self, layer: usize, block: u32, head: usize) -> &[f32] {
        let n = self.block_size * self.key_dim;
        let at = (block as usize * self.kv_heads + head) * n;
        &self.keys[layer][at..at + n]
    }

    /// KV head `head`'s values of `block` in `layer`, transposed: `[value_dim, block_size]`.
    #[inline]
    pub(crate) fn value_block(&self, layer: usize, block: u32, head: usize) -> &[f32] {
        let n = self.block_size * self.value_dim;
        let at = (block as usize * self.kv_heads + head) * n;
        &self.values[layer][at..at + n]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ModelConfig {
        ModelConfig::from_json(
            r#"{"architectures":["MixtralForCausalLM"],"vocab_size":32,"hidden_size":16,
            "intermediate_size":24,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "num_local_experts":4,"num_experts_per_tok":2}"#,
        )
        .unwrap()
    }

    /// A pool of `blocks` blocks of 4 positions (kv_dim 8, 2 layers).
    fn pool(blocks: u64) -> KvPool {
        let c = cfg();
        KvPool::new(&c, blocks * KvPool::block_bytes(&c, 4), 4).unwrap()
    }

    /// Every block is free or in exactly one table.
    fn assert_partition(p: &KvPool) {
        let mut seen = vec![0u32; p.total_blocks()];
        for &b in p.free.iter().chain(p.tables.values().flat_map(|t| &t.blocks)) {
            seen[b as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n == 1), "blocks not partitioned: {seen:?}");
    }

    #[test]
    fn sizes_in_bytes_and_blocks() {
        let c = cfg();
        // 2 layers x 4 positions x (2 heads x 4 dims) x (k, v) x 4 bytes.
        assert_eq!(KvPool::block_bytes(&c, 4), 2 * 4 * 8 * 2 * 4);
        assert_eq!(KvPool::bytes_for(&c, 4, 9), 3 * 512);
        let p = KvPool::new(&c, 10 * 512 + 511, 4).unwrap();
        assert_eq!((p.total_blocks(), p.free_blocks(), p.bytes()), (10, 10, 10 * 512));
        assert_eq!((p.blocks_for(0), p.blocks_for(4), p.blocks_for(5)), (0, 1, 2));
    }

    #[test]
    fn allocate_write_read_and_release() {
        let mut p = pool(4);
        p.allocate(1, 6).unwrap();
        assert_eq!((p.len(1), p.capacity(1), p.free_blocks()), (Some(0), Some(8), 2));
        let (k, v) = ([1.0; 8], [2.0; 8]);
        for pos in 0..6 {
            let s = p.slot(1, pos).unwrap();
            p.write(1, s, &k.map(|x| x + pos as f32), &v);
        }
        p.set_len(1, 6);
        let table = p.table(1).unwrap().to_vec();
        let d = p.key_dim;
        for pos in 0..6 {
            let block = table[pos / p.block_size];
            for h in 0..p.kv_heads {
                let keys = p.key_block(1, block, h);
                assert_eq!(keys[(pos % p.block_size) * d], 1.0 + pos as f32);
                let values = p.value_block(1, block, h);
                assert!((0..d).all(|c| values[c * p.block_size + pos % p.block_size] == 2.0));
            }
        }
        assert_eq!(p.slot(1, 8), Err(KvError::Beyond { seq: 1, pos: 8, capacity: 8 }));
        assert_eq!(p.allocate(1, 1), Err(KvError::Exists(1)));
        assert!(p.release(1));
        assert!(!p.release(1));
        assert_eq!((p.free_blocks(), p.len(1)), (4, None));
        assert_partition(&p);
    }

    #[test]
    fn out_of_blocks_takes_nothing_and_names_the_sizes() {
        let mut p = pool(3);
        p.allocate(1, 8).unwrap();
        let err = p.allocate(2, 5).unwrap_err();
        assert!(
            matches!(err, KvError::OutOfBlocks { positions: 5, need: 2, free: 1, total: 3, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("need 2 KV blocks"), "{err}");
        assert!(!p.contains(2) && p.free_blocks() == 1 && !p.can_allocate(5) && p.can_allocate(4));
        let err = p.reserve(1, 13).unwrap_err();
        assert!(matches!(err, KvError::OutOfBlocks { need: 2, free: 1, .. }));
        assert_eq!(p.capacity(1), Some(8));
        p.reserve(1, 12).unwrap();
        assert_eq!((p.capacity(1), p.free_blocks()), (Some(12), 0));
        assert_eq!(p.reserve(9, 1), Err(KvError::Unknown(9)));
        assert_partition(&p);
    }

    /// Sequences of mixed lengths come and go; freed blocks are reused by longer sequences even
    /// when they are scattered through the pool (no fragmentation beyond last blocks).
    #[test]
    fn fragmented_free_blocks_serve_a_long_sequence() {
        let mut p = pool(8);
        for seq in 0..8 {
            p.allocate(seq, 3).unwrap();
        }
        assert!(!p.can_allocate(1));
        for seq in [1, 3, 4, 6] {
            p.release(seq);
        }
        // Four single free blocks, not adjacent: one sequence of 16 positions takes them all.
        p.allocate(100, 16).unwrap();
        let mut blocks = p.table(100).unwrap().to_vec();
        blocks.sort();
        assert_eq!(blocks.len(), 4);
        assert_eq!(p.free_blocks(), 0);
        for pos in 0..16 {
            let s = p.slot(100, pos).unwrap();
            p.write(0, s, &[pos as f32; 8], &[0.0; 8]);
        }
        let table = p.table(100).unwrap().to_vec();
        for pos in 0..16 {
            let keys = p.key_block(0, table[pos / p.block_size], 1);
            assert_eq!(keys[(pos % p.block_size) * p.key_dim + 3], pos as f32);
        }
        assert_partition(&p);
        for seq in (0..8).chain([100]) {
            p.release(seq);
        }
        assert_eq!(p.free_blocks(), 8);
        assert_partition(&p);
    }

    #[test]
    fn an_empty_pool_refuses_everything_but_empty_sequences() {
        let c = cfg();
        let mut p = KvPool::new(&c, 100, 16).unwrap();
        assert_eq!(p.total_blocks(), 0);
        assert!(p.allocate(1, 1).is_err());
        p.allocate(2, 0).unwrap();
        assert_eq!(p.capacity(2), Some(0));
    }
}
