//! The KV cache as fixed-size token blocks plus a block table (vLLM's design).
//!
//! - [`KvBlockPool`] is the mechanism: block storage and a free list. A block holds
//!   `block_tokens` tokens of one sequence in one layer, K and V each
//!   `[kv_heads, block_tokens, head_dim] f32`. Alloc and release are O(1).
//! - [`KvBlockTable`] is the bookkeeping: for each sequence and layer, the ordered list of its
//!   blocks and how many tokens are filled. It says where a token's KV goes and hands out
//!   [`KvBlockView`]s for attention; it never decides placement (that is policy, later issues).
//!
//! Invariant: block `j` of `(seq, layer)` holds positions `j*B .. j*B + len_in_block`, filled in
//! order; a released sequence's blocks return to the free list at once.

use std::collections::HashMap;

use strata_kernels::KvBlockView;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

#[derive(Debug, thiserror::Error)]
pub enum KvError {
    #[error("the KV cache is full: {capacity} blocks of {bytes_per_block} bytes are in use")]
    OutOfBlocks {
        capacity: usize,
        bytes_per_block: usize,
    },
    #[error("sequence {0:?} is not in the block table")]
    UnknownSequence(SeqId),
    #[error("position {pos} of sequence {seq:?} written out of order (next is {next})")]
    OutOfOrder { seq: SeqId, pos: usize, next: usize },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_tokens: usize,
}

impl KvGeometry {
    /// f32 values in one block's K (and again in its V).
    pub fn block_elems(&self) -> usize {
        self.kv_heads * self.block_tokens * self.head_dim
    }
    pub fn bytes_per_block(&self) -> usize {
        2 * self.block_elems() * 4
    }
}

struct Block {
    k: Vec<f32>,
    v: Vec<f32>,
}

pub struct KvBlockPool {
    geometry: KvGeometry,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    /// At most this many blocks exist at once (`None`: bounded only by memory).
    capacity: Option<usize>,
    in_use: usize,
    peak_in_use: usize,
}

impl KvBlockPool {
    pub fn new(geometry: KvGeometry, capacity: Option<usize>) -> Self {
        Self {
            geometry,
            blocks: Vec::new(),
            free: Vec::new(),
            capacity,
            in_use: 0,
            peak_in_use: 0,
        }
    }

    pub fn geometry(&self) -> KvGeometry {
        self.geometry
    }

    pub fn alloc(&mut self) -> Result<BlockId, KvError> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                if self.capacity.is_some_and(|c| self.blocks.len() >= c) {
                    return Err(KvError::OutOfBlocks {
                        capacity: self.blocks.len(),
                        bytes_per_block: self.geometry.bytes_per_block(),
                    });
                }
                let n = self.geometry.block_elems();
                self.blocks.push(Block {
                    k: vec![0.0; n],
                    v: vec![0.0; n],
                });
                BlockId((self.blocks.len() - 1) as u32)
            }
        };
        self.in_use += 1;
        self.peak_in_use = self.peak_in_use.max(self.in_use);
        Ok(id)
    }

    pub fn release(&mut self, id: BlockId) {
        self.free.push(id);
        self.in_use -= 1;
    }

    pub fn in_use(&self) -> usize {
        self.in_use
    }

    pub fn peak_bytes(&self) -> usize {
        self.peak_in_use * self.geometry.bytes_per_block()
    }

    /// Writes one token's `k`, `v: [kv_heads, head_dim]` into slot `slot` of block `id`.
    fn write(&mut self, id: BlockId, slot: usize, k: &[f32], v: &[f32]) {
        let g = self.geometry;
        let block = &mut self.blocks[id.0 as usize];
        for h in 0..g.kv_heads {
            let dst = (h * g.block_tokens + slot) * g.head_dim;
            block.k[dst..dst + g.head_dim]
                .copy_from_slice(&k[h * g.head_dim..(h + 1) * g.head_dim]);
            block.v[dst..dst + g.head_dim]
                .copy_from_slice(&v[h * g.head_dim..(h + 1) * g.head_dim]);
        }
    }
}

/// One sequence's blocks: `blocks[layer][j]`, and tokens filled per layer.
struct SeqBlocks {
    blocks: Vec<Vec<BlockId>>,
    len: Vec<usize>,
}

#[derive(Default)]
pub struct KvBlockTable {
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl KvBlockTable {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_sequence(&mut self, seq: SeqId, layers: usize) {
        self.seqs.insert(
            seq,
            SeqBlocks {
                blocks: vec![Vec::new(); layers],
                len: vec![0; layers],
            },
        );
    }

    /// Frees every block of `seq`.
    pub fn remove_sequence(&mut self, seq: SeqId, pool: &mut KvBlockPool) {
        if let Some(s) = self.seqs.remove(&seq) {
            for id in s.blocks.into_iter().flatten() {
                pool.release(id);
            }
        }
    }

    pub fn len(&self, seq: SeqId, layer: usize) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len[layer])
    }

    /// Appends the KV of the token at `pos` (which must be the next position) for `layer`,
    /// allocating a block when `pos` starts one.
    pub fn append(
        &mut self,
        pool: &mut KvBlockPool,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let bt = pool.geometry().block_tokens;
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        if pos != s.len[layer] {
            return Err(KvError::OutOfOrder {
                seq,
                pos,
                next: s.len[layer],
            });
        }
        if pos.is_multiple_of(bt) {
            let id = pool.alloc()?;
            s.blocks[layer].push(id);
        }
        let id = s.blocks[layer][pos / bt];
        pool.write(id, pos % bt, k, v);
        s.len[layer] += 1;
        Ok(())
    }

    /// Views of `(seq, layer)`'s blocks in position order, for attention.
    pub fn views<'p>(
        &self,
        pool: &'p KvBlockPool,
        seq: SeqId,
        layer: usize,
    ) -> Vec<KvBlockView<'p>> {
        let bt = pool.geometry().block_tokens;
        let Some(s) = self.seqs.get(&seq) else {
            return Vec::new();
        };
        let len = s.len[layer];
        s.blocks[layer]
            .iter()
            .enumerate()
            .map(|(j, id)| {
                let b = &pool.blocks[id.0 as usize];
                KvBlockView {
                    k: &b.k,
                    v: &b.v,
                    start_pos: j * bt,
                    len: bt.min(len - j * bt),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> KvGeometry {
        KvGeometry {
            layers: 2,
            kv_heads: 2,
            head_dim: 3,
            block_tokens: 4,
        }
    }

    #[test]
    fn blocks_fill_in_order_and_return_to_the_pool() {
        let mut pool = KvBlockPool::new(geometry(), Some(6));
        let mut table = KvBlockTable::new();
        let s = SeqId(1);
        table.add_sequence(s, 2);
        for pos in 0..9 {
            let k: Vec<f32> = (0..6).map(|i| (pos * 10 + i) as f32).collect();
            table.append(&mut pool, s, 0, pos, &k, &k).expect("append");
        }
        let views = table.views(&pool, s, 0);
        assert_eq!(
            views
                .iter()
                .map(|v| (v.start_pos, v.len))
                .collect::<Vec<_>>(),
            vec![(0, 4), (4, 4), (8, 1)]
        );
        // Token 5, KV head 1 lives at [1, slot 1, :] of block 1.
        assert_eq!(
            &views[1].k[(4 + 1) * 3..(4 + 1) * 3 + 3],
            &[53.0, 54.0, 55.0]
        );
        assert_eq!(pool.in_use(), 3);
        assert!(
            table
                .append(&mut pool, s, 0, 3, &[0.0; 6], &[0.0; 6])
                .is_err(),
            "out of order"
        );
        table.remove_sequence(s, &mut pool);
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn a_full_pool_is_an_error_not_a_panic() {
        let mut pool = KvBlockPool::new(geometry(), Some(1));
        let mut table = KvBlockTable::new();
        table.add_sequence(SeqId(0), 2);
        table
            .append(&mut pool, SeqId(0), 0, 0, &[0.0; 6], &[0.0; 6])
            .expect("first");
        let err = table.append(&mut pool, SeqId(0), 1, 0, &[0.0; 6], &[0.0; 6]);
        assert!(matches!(err, Err(KvError::OutOfBlocks { .. })));
    }
}
