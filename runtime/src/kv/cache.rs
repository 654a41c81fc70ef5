//! [`KvCache`]: the block table and tier manager (bookkeeping), and the fan-out of attention to
//! the engine of each tier with the exact LSE merge of their partials.

use std::collections::HashMap;
use std::time::Instant;

use serde::Serialize;
use strata_kernels::attention::{AttentionQuery, attend_batch};
use strata_kernels::{AttentionGeometry, KvBlockView, Partial};
use strata_storage::{ArenaSlots, SlotId};

use super::disk::{DiskBlock, DiskGroup, DiskTier, DiskTierConfig};
use super::policy::PlacementPolicy;
use super::{KvError, KvGeometry, SeqId};

pub struct KvCacheConfig {
    pub geometry: KvGeometry,
    /// Host tier budget in bytes (rounded down to whole blocks).
    pub host_bytes: u64,
    pub disk: Option<DiskTierConfig>,
    pub policy: Box<dyn PlacementPolicy>,
}

/// Counters for `--stats-json`: blocks per tier, bytes per link, time per engine.
#[derive(Clone, Debug, Default, Serialize)]
pub struct KvMetrics {
    pub bytes_per_block: usize,
    pub host_capacity_blocks: usize,
    pub host_blocks_peak: usize,
    pub disk_capacity_blocks: usize,
    pub disk_blocks_peak: usize,
    pub disk_io_engine: Option<String>,
    /// Blocks moved host → disk, and their bytes (the host→disk link).
    pub spilled_blocks: u64,
    pub bytes_host_to_disk: u64,
    /// KV bytes the storage attention engine read from disk (disk→host link).
    pub bytes_disk_to_host: u64,
    /// Bytes of `(o, lse)` partials the storage engine returned instead of the KV.
    pub storage_attention_result_bytes: u64,
    /// KV bytes a computational storage drive would have kept off the host link.
    pub bytes_kept_off_host_link: u64,
    pub host_attention_seconds: f64,
    pub storage_attention_seconds: f64,
    pub disk_write_seconds: f64,
}

enum Loc {
    Host(SlotId),
    /// An index into the disk tier's slots.
    Disk(u32),
}

struct Block {
    loc: Loc,
    filled: usize,
}

struct SeqBlocks {
    /// `layers[layer][j]`: block `j` of that layer.
    layers: Vec<Vec<Block>>,
}

/// One query of a batch for one layer: `q: [n_heads, head_dim]` at `pos` of `seq`.
#[derive(Clone, Copy, Debug)]
pub struct TierQuery<'a> {
    pub seq: SeqId,
    pub pos: usize,
    pub q: &'a [f32],
}

pub struct KvCache {
    g: KvGeometry,
    host: ArenaSlots,
    disk: Option<DiskTier>,
    seqs: HashMap<SeqId, SeqBlocks>,
    policy: Box<dyn PlacementPolicy>,
    metrics: KvMetrics,
}

impl KvCache {
    pub fn new(cfg: KvCacheConfig) -> Result<Self, KvError> {
        let g = cfg.geometry;
        let bpb = g.bytes_per_block();
        let stride = bpb.next_multiple_of(strata_storage::MIN_ARENA_ALIGN) as u64;
        let slots = (cfg.host_bytes / stride) as usize;
        if slots == 0 {
            return Err(KvError::HostTooSmall {
                capacity: 0,
                needed: g.layers,
            });
        }
        let host = ArenaSlots::with_slots(slots, bpb)?;
        let disk = cfg.disk.map(|d| DiskTier::open(d, bpb)).transpose()?;
        let metrics = KvMetrics {
            bytes_per_block: bpb,
            host_capacity_blocks: host.capacity(),
            disk_capacity_blocks: disk.as_ref().map_or(0, DiskTier::capacity),
            disk_io_engine: disk.as_ref().map(|d| d.engine_name().to_string()),
            ..KvMetrics::default()
        };
        Ok(Self {
            g,
            host,
            disk,
            seqs: HashMap::new(),
            policy: cfg.policy,
            metrics,
        })
    }

    pub fn geometry(&self) -> KvGeometry {
        self.g
    }

    pub fn policy(&self) -> &dyn PlacementPolicy {
        self.policy.as_ref()
    }

    /// Current counters, with the disk worker's figures folded in.
    pub fn metrics(&self) -> KvMetrics {
        let mut m = self.metrics.clone();
        if let Some(d) = &self.disk {
            let s = d.stats();
            m.bytes_disk_to_host = s.bytes_read;
            m.storage_attention_result_bytes = s.result_bytes;
            m.bytes_kept_off_host_link = s.bytes_read.saturating_sub(s.result_bytes);
            m.storage_attention_seconds = s.attend_seconds;
            m.disk_write_seconds = s.write_seconds;
        }
        m
    }

    pub fn host_blocks_in_use(&self) -> usize {
        self.host.in_use()
    }

    pub fn disk_blocks_in_use(&self) -> usize {
        self.disk.as_ref().map_or(0, DiskTier::in_use)
    }

    pub fn add_sequence(&mut self, seq: SeqId) {
        let layers = (0..self.g.layers).map(|_| Vec::new()).collect();
        self.seqs.insert(seq, SeqBlocks { layers });
    }

    /// Frees every block of `seq`, in every tier.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<(), KvError> {
        let Some(s) = self.seqs.remove(&seq) else {
            return Ok(());
        };
        for b in s.layers.into_iter().flatten() {
            match b.loc {
                Loc::Host(slot) => self.host.free(slot)?,
                Loc::Disk(i) => {
                    if let Some(d) = &mut self.disk {
                        d.free(i);
                    }
                }
            }
        }
        Ok(())
    }

    /// Tokens stored for `(seq, layer)`.
    pub fn len(&self, seq: SeqId, layer: usize) -> usize {
        // Every block but the last is full (blocks fill in order), so this is O(1).
        let blocks = self
            .seqs
            .get(&seq)
            .map_or(&[][..], |s| &s.layers[layer][..]);
        blocks
            .last()
            .map_or(0, |b| (blocks.len() - 1) * self.g.block_tokens + b.filled)
    }

    /// Appends the KV of the token at `pos` (the next position) of `seq` in `layer`;
    /// `k`, `v: [kv_heads, head_dim]`. A token that starts a block gets a new host block,
    /// spilling colder blocks to disk first when the host tier is full.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
    ) -> Result<(), KvError> {
        let next = self.len(seq, layer);
        if !self.seqs.contains_key(&seq) {
            return Err(KvError::UnknownSequence(seq));
        }
        if pos != next {
            return Err(KvError::OutOfOrder { seq, pos, next });
        }
        let g = self.g;
        if pos.is_multiple_of(g.block_tokens) {
            let slot = self.host_slot()?;
            self.seqs
                .get_mut(&seq)
                .ok_or(KvError::UnknownSequence(seq))?
                .layers[layer]
                .push(Block {
                    loc: Loc::Host(slot),
                    filled: 0,
                });
        }
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let Some(block) = s.layers[layer].last_mut() else {
            return Err(KvError::UnknownSequence(seq));
        };
        let Loc::Host(slot) = block.loc else {
            unreachable!("the writable block of a sequence is always host-resident");
        };
        let t = block.filled;
        block.filled += 1;
        let data = self.host.slot_f32_mut(slot);
        let (kd, vd) = data.split_at_mut(g.block_elems());
        for h in 0..g.kv_heads {
            let dst = (h * g.block_tokens + t) * g.head_dim;
            kd[dst..dst + g.head_dim].copy_from_slice(&k[h * g.head_dim..(h + 1) * g.head_dim]);
            vd[dst..dst + g.head_dim].copy_from_slice(&v[h * g.head_dim..(h + 1) * g.head_dim]);
        }
        Ok(())
    }

    fn host_slot(&mut self) -> Result<SlotId, KvError> {
        if let Some(s) = self.host.alloc() {
            self.note_peaks();
            return Ok(s);
        }
        self.spill()?;
        let slot = self.host.alloc().ok_or_else(|| KvError::HostTooSmall {
            capacity: self.host.capacity(),
            needed: self.seqs.len() * self.g.layers,
        })?;
        self.note_peaks();
        Ok(slot)
    }

    fn note_peaks(&mut self) {
        self.metrics.host_blocks_peak = self.metrics.host_blocks_peak.max(self.host.in_use());
        let disk = self.disk_blocks_in_use();
        self.metrics.disk_blocks_peak = self.metrics.disk_blocks_peak.max(disk);
    }

    /// Moves the coldest host blocks (by policy; never a sequence's writable last block) to the
    /// disk tier: reserve disk slots, hand the bytes to the disk worker, free the host slots.
    /// The write itself happens on the worker, overlapping compute.
    fn spill(&mut self) -> Result<(), KvError> {
        let bpb = self.g.bytes_per_block();
        let Some(disk) = self.disk.as_mut() else {
            return Err(KvError::HostFull {
                blocks: self.host.capacity(),
                bytes_per_block: bpb,
            });
        };
        let mut candidates: Vec<(u64, SeqId, usize, usize)> = Vec::new();
        for (&seq, s) in &self.seqs {
            for (layer, blocks) in s.layers.iter().enumerate() {
                for (j, b) in blocks
                    .iter()
                    .enumerate()
                    .take(blocks.len().saturating_sub(1))
                {
                    if matches!(b.loc, Loc::Host(_)) {
                        candidates.push((self.policy.keep_rank(j, blocks.len()), seq, layer, j));
                    }
                }
            }
        }
        if candidates.is_empty() {
            return Err(KvError::HostTooSmall {
                capacity: self.host.capacity(),
                needed: self.seqs.len() * self.g.layers + 1,
            });
        }
        candidates.sort_unstable();
        // Spill a batch (1/16 of the tier) so writes are large and spills are rare, but never
        // more than the disk tier has room for: every moved block gets its slot before it moves.
        let room = disk.capacity() - disk.in_use();
        if room == 0 {
            return Err(KvError::DiskFull {
                blocks: disk.capacity(),
                bytes_per_block: bpb,
            });
        }
        let batch = (self.host.capacity() / 16)
            .clamp(1, candidates.len())
            .min(room);
        let t0 = Instant::now();
        let mut writes = Vec::with_capacity(batch);
        for &(_, seq, layer, j) in &candidates[..batch] {
            let Some(block) = self
                .seqs
                .get_mut(&seq)
                .and_then(|s| s.layers[layer].get_mut(j))
            else {
                continue;
            };
            let Loc::Host(hslot) = block.loc else {
                continue;
            };
            let Some(dslot) = disk.reserve() else { break };
            writes.push((dslot, self.host.slot(hslot)[..bpb].to_vec()));
            self.host.free(hslot)?;
            block.loc = Loc::Disk(dslot);
        }
        self.metrics.spilled_blocks += writes.len() as u64;
        self.metrics.bytes_host_to_disk += (writes.len() * bpb) as u64;
        disk.write(writes)?;
        tracing::debug!(
            blocks = batch,
            seconds = t0.elapsed().as_secs_f64(),
            "spilled host -> disk"
        );
        self.note_peaks();
        Ok(())
    }

    /// Attends every query over its sequence's blocks in `layer`, each tier where its blocks
    /// live, and merges the partials. Returns one partial per query, in order.
    pub fn attend(
        &mut self,
        layer: usize,
        queries: &[TierQuery<'_>],
        ag: &AttentionGeometry,
    ) -> Result<Vec<Partial>, KvError> {
        let mut seqs: Vec<SeqId> = queries.iter().map(|q| q.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();

        // Storage attention: ship the queries to the disk worker first, so it streams and
        // attends while the host engine works below.
        let mut groups = Vec::new();
        for &seq in &seqs {
            let blocks = &self
                .seqs
                .get(&seq)
                .ok_or(KvError::UnknownSequence(seq))?
                .layers[layer];
            let disk_blocks: Vec<DiskBlock> = blocks
                .iter()
                .enumerate()
                .filter_map(|(j, b)| match b.loc {
                    Loc::Disk(slot) => Some(DiskBlock {
                        slot,
                        start_pos: j * self.g.block_tokens,
                        len: b.filled,
                    }),
                    Loc::Host(_) => None,
                })
                .collect();
            if !disk_blocks.is_empty() {
                let rows = queries
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| q.seq == seq)
                    .map(|(i, q)| (i, q.q.to_vec(), q.pos))
                    .collect();
                groups.push(DiskGroup {
                    rows,
                    blocks: disk_blocks,
                });
            }
        }
        let pending = match (&mut self.disk, groups.is_empty()) {
            (Some(d), false) => Some(d.attend(groups, *ag)?),
            _ => None,
        };

        // Host attention over host-resident blocks.
        let t0 = Instant::now();
        let views: Vec<Vec<KvBlockView<'_>>> =
            seqs.iter().map(|s| self.host_views(*s, layer)).collect();
        let host_queries: Vec<AttentionQuery<'_>> = queries
            .iter()
            .map(|q| {
                let si = seqs.binary_search(&q.seq).unwrap_or(0);
                AttentionQuery {
                    q: q.q,
                    pos: q.pos,
                    blocks: &views[si],
                }
            })
            .collect();
        let threads = rayon::current_num_threads().max(1);
        let max_blocks = views.iter().map(Vec::len).max().unwrap_or(1).max(1);
        let splits = (2 * threads).div_ceil(queries.len().max(1)).max(1);
        let mut partials = attend_batch(&host_queries, ag, max_blocks.div_ceil(splits));
        self.metrics.host_attention_seconds += t0.elapsed().as_secs_f64();

        if let Some(rx) = pending {
            for (row, p) in rx.recv().map_err(|_| KvError::WorkerGone)?? {
                partials[row].merge_in(p);
            }
        }
        Ok(partials)
    }

    fn host_views(&self, seq: SeqId, layer: usize) -> Vec<KvBlockView<'_>> {
        let e = self.g.block_elems();
        let Some(s) = self.seqs.get(&seq) else {
            return Vec::new();
        };
        s.layers[layer]
            .iter()
            .enumerate()
            .filter_map(|(j, b)| match b.loc {
                Loc::Host(slot) => {
                    let data = self.host.slot_f32(slot);
                    Some(KvBlockView {
                        k: &data[..e],
                        v: &data[e..2 * e],
                        start_pos: j * self.g.block_tokens,
                        len: b.filled,
                    })
                }
                Loc::Disk(_) => None,
            })
            .collect()
    }
}
