//! Which KV blocks stay hot. A [`PlacementPolicy`] ranks a sequence's blocks; when a tier is full,
//! the tier manager moves the lowest-ranked resident blocks down. Policy only ranks — it never
//! moves bytes (that is the tier manager's mechanism).

/// Ranks block `index` of a sequence (per layer) that currently has `blocks` blocks. Higher
/// means keep in the faster tier longer.
pub trait PlacementPolicy: Send + Sync {
    fn keep_rank(&self, index: usize, blocks: usize) -> u64;
    fn describe(&self) -> String;
}

/// Keep the first `sink_blocks` (attention sinks: the first tokens draw attention at every step)
/// and the most recent `recent_blocks` (the local window) hot; spill the middle, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SinkAndRecent {
    pub sink_blocks: usize,
    pub recent_blocks: usize,
}

impl Default for SinkAndRecent {
    fn default() -> Self {
        Self {
            sink_blocks: 1,
            recent_blocks: 4,
        }
    }
}

impl PlacementPolicy for SinkAndRecent {
    fn keep_rank(&self, index: usize, blocks: usize) -> u64 {
        let from_end = blocks - 1 - index.min(blocks - 1);
        if from_end < self.recent_blocks {
            // Most recent first: the tail block outranks everything.
            u64::MAX - from_end as u64
        } else if index < self.sink_blocks {
            u64::MAX / 2 - index as u64
        } else {
            // The middle: newer blocks rank higher, so the oldest go first.
            index as u64
        }
    }

    fn describe(&self) -> String {
        format!(
            "keep {} sink block(s) and the {} most recent block(s) hot",
            self.sink_blocks, self.recent_blocks
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_and_recent_blocks_outrank_the_middle() {
        let p = SinkAndRecent {
            sink_blocks: 1,
            recent_blocks: 2,
        };
        let ranks: Vec<u64> = (0..6).map(|i| p.keep_rank(i, 6)).collect();
        // Eviction order: 1, 2, 3 (oldest middle first), then the sink, then the recent window.
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by_key(|&i| ranks[i]);
        assert_eq!(order, vec![1, 2, 3, 0, 4, 5]);
    }
}
