//! Weights on disk: the layers a policy places on NVMe, written once when the model loads and
//! read back for every forward pass into a few reusable staging buffers (page-locked on a GPU),
//! from which the backend fetches them as it fetches layers staged in host memory.
//!
//! Layout: a layer is one byte stream, its tensors end to end (each starting on a
//! [`TENSOR_ALIGN`] boundary), cut into chunks of [`CHUNK_BYTES`], one block-store slot each.
//! Every disk layer has the shapes of the staging buffers (all layers of a model do), so a read
//! scatters each chunk straight into the buffers' bytes as the chunk completes.
//!
//! Ownership: one worker thread owns the block store and with it the IO ring; it writes layers
//! while the model loads and reads them afterwards, in FIFO order. The caller owns the staging
//! buffers and lends a set to the worker for each read. Reads run ahead cyclically: when a set
//! comes back from the layer that used it, it goes to the next disk layer not yet requested,
//! wrapping to the first disk layers of the next pass, so the disk never waits for compute.
//! Weights do not change, so reading ahead across passes is always valid.

use std::collections::VecDeque;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use strata_storage::{BlockStore, BlockStoreConfig, DiskSlot, FaultConfig, StorageError};

use crate::error::ModelError;
use crate::kv::DiskTierConfig;

/// Bytes per read request: large enough for the disk's full sequential bandwidth, and what the
/// planner's cost model assumes for weight reads.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Start of every tensor in a layer's stream (a multiple of every dtype's size).
const TENSOR_ALIGN: usize = 64;
/// Chunks handed to the store per write call while the model loads.
const WRITE_BATCH_CHUNKS: usize = 16;

/// Bytes, reads and stalls of the disk weights since load.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct DiskWeightStats {
    /// Bytes written while the model loaded (the layers' streams, padding included).
    pub bytes_written: u64,
    pub bytes_read: u64,
    /// Layer reads completed.
    pub layer_reads: u64,
    /// Seconds the IO thread spent reading layers (the disk's busy time).
    pub read_seconds: f64,
    /// Seconds the forward pass waited for a layer's read (the disk's time not hidden by
    /// compute).
    pub wait_seconds: f64,
}

/// Where each tensor lies in a layer's stream, and the stream's length.
#[derive(Clone, Debug, PartialEq)]
struct StreamLayout {
    tensors: Vec<Range<usize>>,
    len: usize,
}

impl StreamLayout {
    fn new(lens: &[usize]) -> Self {
        let mut at = 0usize;
        let tensors = lens
            .iter()
            .map(|&n| {
                let start = at.next_multiple_of(TENSOR_ALIGN);
                at = start + n;
                start..at
            })
            .collect();
        Self { tensors, len: at }
    }

    fn chunks(&self) -> usize {
        self.len.div_ceil(CHUNK_BYTES)
    }

    /// The pieces of chunk `k`: `(tensor, range in the tensor, range in the chunk)`.
    fn pieces(&self, k: usize) -> impl Iterator<Item = (usize, Range<usize>, Range<usize>)> + '_ {
        let chunk = k * CHUNK_BYTES..((k + 1) * CHUNK_BYTES).min(self.len);
        self.tensors.iter().enumerate().filter_map(move |(t, r)| {
            let (s, e) = (r.start.max(chunk.start), r.end.min(chunk.end));
            (s < e).then(|| {
                (
                    t,
                    s - r.start..e - r.start,
                    s - chunk.start..e - chunk.start,
                )
            })
        })
    }

    /// Chunk `k` of the stream of `tensors` (zeros between tensors).
    fn chunk(&self, tensors: &[&[u8]], k: usize) -> Vec<u8> {
        let len = ((k + 1) * CHUNK_BYTES).min(self.len) - k * CHUNK_BYTES;
        let mut out = vec![0u8; len];
        for (t, in_tensor, in_chunk) in self.pieces(k) {
            out[in_chunk].copy_from_slice(&tensors[t][in_tensor]);
        }
        out
    }
}

/// A layer's tensors, owned by the IO thread while it writes them.
type Tensors = Vec<Box<dyn AsRef<[u8]> + Send>>;

enum Command<S> {
    Write {
        layer: usize,
        tensors: Tensors,
        reply: Sender<Result<u64, StorageError>>,
    },
    Read {
        layer: usize,
        bufs: Vec<S>,
    },
}

struct ReadDone<S> {
    layer: usize,
    bufs: Vec<S>,
    result: Result<u64, StorageError>,
    seconds: f64,
}

/// The disk layers of one model. See the module header.
pub struct DiskWeights<S: Send + 'static> {
    /// Disk layers in pass order.
    order: Vec<usize>,
    layout: StreamLayout,
    tx: Option<Sender<Command<S>>>,
    done: Receiver<ReadDone<S>>,
    worker: Option<JoinHandle<()>>,
    /// Buffer sets not lent to the worker or in use.
    free: Vec<Vec<S>>,
    /// Layers requested and not yet taken, in request order.
    queued: VecDeque<usize>,
    /// Index in `order` of the next layer to request.
    cursor: usize,
    /// The write sent last, not yet confirmed.
    writing: Option<(usize, Receiver<Result<u64, StorageError>>)>,
    dir: PathBuf,
    pub stats: DiskWeightStats,
}

impl<S: Send + 'static> DiskWeights<S> {
    /// Opens a store under `cfg.dir/weights` for `layers` (in pass order), read into the
    /// buffer sets `bufs` (at least one; each holds one layer's tensors in the order the caller
    /// writes them). `bytes_of` gives a buffer's bytes to fill.
    pub fn open(
        cfg: &DiskTierConfig,
        layers: Vec<usize>,
        mut bufs: Vec<Vec<S>>,
        bytes_of: fn(&mut S) -> &mut [u8],
    ) -> Result<Self, ModelError> {
        let first = bufs.first_mut().ok_or_else(|| {
            ModelError::DiskWeights("weights on disk need at least one staging buffer".into())
        })?;
        let lens: Vec<usize> = first.iter_mut().map(|b| bytes_of(b).len()).collect();
        let layout = StreamLayout::new(&lens);
        let dir = cfg.dir.join("weights");
        let capacity = (layout.chunks() * layers.len()) as u64 * CHUNK_BYTES as u64;
        let faults = cfg
            .faults
            .as_deref()
            .map(FaultConfig::parse)
            .transpose()
            .map_err(|e| ModelError::DiskWeights(e.to_string()))?;
        let store = BlockStore::open(BlockStoreConfig {
            dir: dir.clone(),
            capacity_bytes: capacity,
            slot_bytes: CHUNK_BYTES,
            engine: cfg.engine,
            queue_depth: cfg.queue_depth,
            faults,
        })
        .map_err(|e| storage_err(&dir, e))?;
        let (tx, rx) = channel();
        let (done_tx, done) = channel();
        let worker_layout = layout.clone();
        let worker = std::thread::Builder::new()
            .name("strata-weights".into())
            .spawn(move || {
                Worker {
                    store,
                    layout: worker_layout,
                    slots: Vec::new(),
                    bytes_of,
                }
                .run(rx, done_tx)
            })
            .map_err(|e| ModelError::DiskWeights(format!("cannot start the IO thread: {e}")))?;
        Ok(Self {
            order: layers,
            layout,
            tx: Some(tx),
            done,
            worker: Some(worker),
            free: bufs,
            queued: VecDeque::new(),
            cursor: 0,
            writing: None,
            dir,
            stats: DiskWeightStats::default(),
        })
    }

    /// Bytes of store one layer takes.
    pub fn layer_bytes(&self) -> u64 {
        (self.layout.chunks() * CHUNK_BYTES) as u64
    }

    /// Bytes of store all the layers take.
    pub fn store_bytes(&self) -> u64 {
        self.layer_bytes() * self.order.len() as u64
    }

    /// Hands layer `layer`'s tensors (in the buffers' order and shapes) to the IO thread to
    /// write, after waiting for the write before it, so loading one layer overlaps writing the
    /// last. The IO thread cuts the stream into chunks a batch at a time: the layer is not
    /// copied whole.
    pub fn write_layer<T: AsRef<[u8]> + Send + 'static>(
        &mut self,
        layer: usize,
        tensors: Vec<T>,
    ) -> Result<(), ModelError> {
        let lens: Vec<usize> = tensors.iter().map(|t| t.as_ref().len()).collect();
        let want: Vec<usize> = self.layout.tensors.iter().map(|r| r.len()).collect();
        if lens != want {
            return Err(ModelError::DiskWeights(format!(
                "layer {layer}: tensor sizes {lens:?} differ from the staging buffers' {want:?}: \
                 every layer on disk must have the same shapes"
            )));
        }
        let tensors: Tensors = tensors
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn AsRef<[u8]> + Send>)
            .collect();
        self.wait_write()?;
        let (reply, rx) = channel();
        self.send(Command::Write {
            layer,
            tensors,
            reply,
        })?;
        self.writing = Some((layer, rx));
        Ok(())
    }

    /// Waits for the last write, then starts reading the first layers ahead of the first pass.
    pub fn finish_writes(&mut self) -> Result<(), ModelError> {
        self.wait_write()?;
        self.request_ahead()
    }

    fn wait_write(&mut self) -> Result<(), ModelError> {
        if let Some((layer, rx)) = self.writing.take() {
            let written = rx
                .recv()
                .map_err(|_| gone())?
                .map_err(|e| self.layer_err(layer, e))?;
            self.stats.bytes_written += written;
        }
        Ok(())
    }

    /// Lends every free buffer set to the next layers in cyclic order.
    fn request_ahead(&mut self) -> Result<(), ModelError> {
        while !self.order.is_empty() {
            let Some(bufs) = self.free.pop() else {
                return Ok(());
            };
            let layer = self.order[self.cursor];
            self.cursor = (self.cursor + 1) % self.order.len();
            self.send(Command::Read { layer, bufs })?;
            self.queued.push_back(layer);
        }
        Ok(())
    }

    /// Layer `layer`'s tensors, waiting for its read. Give them back with
    /// [`DiskWeights::give_back`] once nothing reads them any more.
    pub fn take(&mut self, layer: usize) -> Result<Vec<S>, ModelError> {
        self.finish_writes()?;
        if self.queued.front() != Some(&layer) {
            // Out of the cyclic order (an earlier pass stopped on an error): drop what was
            // read ahead and start again from this layer.
            while let Some(l) = self.queued.pop_front() {
                let done = self.recv()?;
                debug_assert_eq!(done.layer, l);
                self.stats.read_seconds += done.seconds;
                self.free.push(done.bufs);
            }
            self.cursor =
                self.order.iter().position(|&l| l == layer).ok_or_else(|| {
                    ModelError::DiskWeights(format!("layer {layer} is not on disk"))
                })?;
        }
        self.request_ahead()?;
        if self.queued.is_empty() {
            return Err(ModelError::DiskWeights(format!(
                "layer {layer}: no staging buffers left to read it into (a pass that failed \
                 kept them)"
            )));
        }
        let t0 = Instant::now();
        let done = self.recv()?;
        self.stats.wait_seconds += t0.elapsed().as_secs_f64();
        self.queued.pop_front();
        debug_assert_eq!(done.layer, layer);
        self.stats.read_seconds += done.seconds;
        match done.result {
            Ok(bytes) => {
                self.stats.bytes_read += bytes;
                self.stats.layer_reads += 1;
                Ok(done.bufs)
            }
            Err(e) => {
                self.free.push(done.bufs);
                Err(self.layer_err(layer, e))
            }
        }
    }

    /// Returns a buffer set taken with [`DiskWeights::take`], which goes straight to the next
    /// layer to read.
    pub fn give_back(&mut self, bufs: Vec<S>) -> Result<(), ModelError> {
        self.free.push(bufs);
        self.request_ahead()
    }

    fn recv(&self) -> Result<ReadDone<S>, ModelError> {
        self.done.recv().map_err(|_| gone())
    }

    fn send(&self, c: Command<S>) -> Result<(), ModelError> {
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(c)
            .map_err(|_| gone())
    }

    fn layer_err(&self, layer: usize, e: StorageError) -> ModelError {
        ModelError::DiskWeights(format!("layer {layer} in {}: {e}", self.dir.display()))
    }
}

impl<S: Send + 'static> Drop for DiskWeights<S> {
    fn drop(&mut self) {
        self.tx.take();
        // Reads ahead of a pass that will not come: with nobody to hear them, the worker stops
        // after the read in progress instead of doing the rest.
        drop(std::mem::replace(&mut self.done, channel().1));
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // The store removed its files with the worker; the folder goes too when nothing else
        // is in it.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn gone() -> ModelError {
    ModelError::DiskWeights("the weights' IO thread stopped".into())
}

fn storage_err(dir: &std::path::Path, e: StorageError) -> ModelError {
    ModelError::DiskWeights(format!("{}: {e}", dir.display()))
}

struct Worker<S> {
    store: BlockStore,
    layout: StreamLayout,
    /// Each layer's chunk slots, by layer index.
    slots: Vec<Vec<DiskSlot>>,
    bytes_of: fn(&mut S) -> &mut [u8],
}

impl<S> Worker<S> {
    fn run(mut self, rx: Receiver<Command<S>>, done: Sender<ReadDone<S>>) {
        while let Ok(c) = rx.recv() {
            match c {
                Command::Write {
                    layer,
                    tensors,
                    reply,
                } => {
                    let _ = reply.send(self.write(layer, &tensors));
                }
                Command::Read { layer, mut bufs } => {
                    let t0 = Instant::now();
                    let result = self.read(layer, &mut bufs);
                    if done
                        .send(ReadDone {
                            layer,
                            bufs,
                            result,
                            seconds: t0.elapsed().as_secs_f64(),
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    }

    fn write(&mut self, layer: usize, tensors: &Tensors) -> Result<u64, StorageError> {
        let bytes: Vec<&[u8]> = tensors.iter().map(|t| (**t).as_ref()).collect();
        let slots = (0..self.layout.chunks())
            .map(|_| self.store.alloc_slot())
            .collect::<Result<Vec<_>, _>>()?;
        let mut written = 0u64;
        for (b, batch) in slots.chunks(WRITE_BATCH_CHUNKS).enumerate() {
            let first = b * WRITE_BATCH_CHUNKS;
            let chunks: Vec<Vec<u8>> = (first..first + batch.len())
                .map(|k| self.layout.chunk(&bytes, k))
                .collect();
            let items: Vec<(DiskSlot, &[u8])> = batch
                .iter()
                .zip(&chunks)
                .map(|(&s, c)| (s, c.as_slice()))
                .collect();
            self.store.write_blocks(&items)?;
            written += chunks.iter().map(|c| c.len() as u64).sum::<u64>();
        }
        if self.slots.len() <= layer {
            self.slots.resize(layer + 1, Vec::new());
        }
        self.slots[layer] = slots;
        Ok(written)
    }

    fn read(&mut self, layer: usize, bufs: &mut [S]) -> Result<u64, StorageError> {
        let slots =
            self.slots
                .get(layer)
                .filter(|s| !s.is_empty())
                .ok_or(StorageError::InvalidConfig(format!(
                    "layer {layer} was never written"
                )))?;
        let bytes_of = self.bytes_of;
        let mut dst: Vec<&mut [u8]> = bufs.iter_mut().map(bytes_of).collect();
        let layout = &self.layout;
        let mut read = 0u64;
        self.store.read_blocks(slots, |k, bytes: &[u8]| {
            for (t, in_tensor, in_chunk) in layout.pieces(k) {
                dst[t][in_tensor].copy_from_slice(&bytes[in_chunk]);
            }
            read += bytes.len() as u64;
            Ok::<_, StorageError>(())
        })?;
        Ok(read)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use strata_storage::IoEngine;

    /// A directory of its own under the system's temporary directory, removed on drop.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("strata-disk-weights-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            Self(dir)
        }
        fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(dir: &std::path::Path, faults: Option<&str>) -> DiskTierConfig {
        DiskTierConfig {
            dir: dir.to_path_buf(),
            bytes: 0,
            engine: IoEngine::Auto,
            queue_depth: 8,
            faults: faults.map(str::to_string),
        }
    }

    fn bytes_of(v: &mut Vec<u8>) -> &mut [u8] {
        v
    }

    /// A layer of tensors that straddle chunks: one larger than a chunk, two small ones.
    fn layer(seed: u8) -> Vec<Vec<u8>> {
        [CHUNK_BYTES + 4093, 12, 2 * CHUNK_BYTES - 100]
            .iter()
            .enumerate()
            .map(|(t, &n)| {
                (0..n)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ t as u8)
                    .collect()
            })
            .collect()
    }

    fn open(dir: &std::path::Path, faults: Option<&str>, sets: usize) -> DiskWeights<Vec<u8>> {
        let shape = layer(0).iter().map(|t| vec![0xEE; t.len()]).collect();
        let bufs = vec![shape; sets];
        DiskWeights::open(&cfg(dir, faults), vec![1, 4, 6], bufs, bytes_of).unwrap()
    }

    #[test]
    fn layers_read_back_what_was_written_pass_after_pass() {
        let dir = Scratch::new("passes");
        let mut d = open(dir.path(), None, 2);
        for l in [1u8, 4, 6] {
            d.write_layer(l as usize, layer(l)).unwrap();
        }
        for _pass in 0..3 {
            for l in [1usize, 4, 6] {
                let got = d.take(l).unwrap();
                for (t, want) in got.iter().zip(layer(l as u8)) {
                    assert!(*t == want, "layer {l}");
                }
                d.give_back(got).unwrap();
            }
        }
        assert_eq!(d.stats.layer_reads, 9);
        let stream = d.layer_bytes();
        assert_eq!(d.stats.bytes_written, 3 * d.layout.len as u64);
        assert!(stream >= d.layout.len as u64);
        // Reads run ahead into the next pass: one set is always lent out.
        assert_eq!(d.queued.len(), 2);
    }

    #[test]
    fn a_layer_taken_out_of_order_restarts_the_cycle() {
        let dir = Scratch::new("order");
        let mut d = open(dir.path(), None, 2);
        for l in [1u8, 4, 6] {
            d.write_layer(l as usize, layer(l)).unwrap();
        }
        let got = d.take(6).unwrap();
        assert!(got[2] == layer(6)[2]);
        d.give_back(got).unwrap();
        let got = d.take(1).unwrap();
        assert!(got[0] == layer(1)[0]);
        d.give_back(got).unwrap();
        assert!(d.take(3).unwrap_err().to_string().contains("not on disk"));
    }

    #[test]
    fn a_layer_of_another_shape_is_refused_with_its_sizes() {
        let dir = Scratch::new("shape");
        let mut d = open(dir.path(), None, 1);
        let err = d
            .write_layer(1, vec![vec![0u8; 3]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("layer 1") && err.contains("same shapes"),
            "{err}"
        );
    }

    #[test]
    fn a_read_that_keeps_failing_names_the_layer_and_keeps_the_buffers() {
        let dir = Scratch::new("fail");
        // Every read comes back corrupt, more times than the store re-reads.
        let mut d = open(dir.path(), Some("corrupt=1.0,seed=7"), 2);
        for l in [1u8, 4, 6] {
            d.write_layer(l as usize, layer(l)).unwrap();
        }
        let err = d.take(1).unwrap_err().to_string();
        assert!(err.contains("layer 1") && err.contains("weights"), "{err}");
        // The failed read's buffers came back: the next take can still lend a set.
        assert!(d.take(4).is_err());
        assert_eq!(d.free.len() + d.queued.len(), 2);
    }
}
